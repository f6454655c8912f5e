"""Merged Hugging Face export options: bfloat16 tensors, sharded safetensors, int8 backbones
(dequantized, LoRA merged), the model card, and atomic writes. Checked in transformers."""

import json

import numpy as np
import pytest

from kerasft.config import LoraConfig, ModelConfig
from kerasft.errors import KerasftError
from kerasft.export.hf import export_hf, keras_logits
from kerasft.models.lora import LORA_TARGETS, apply_lora, lora_layers
from kerasft.models.presets import load_model

TOKENS = np.array([[2, 5, 17, 40, 41, 99, 7, 3, 250, 12, 13, 14, 300, 301, 8, 9, 10, 11]], dtype=np.int32)


def _randomize_lora(backbone, seed=3):
    rng = np.random.default_rng(seed)
    for layer in lora_layers(backbone):
        for variable in (layer.lora_kernel_a, layer.lora_kernel_b):
            variable.assign(rng.normal(0, 0.2, size=variable.shape).astype("float32"))


@pytest.fixture(scope="module")
def lora_gemma3(tiny_preset):
    loaded = load_model(ModelConfig(preset=str(tiny_preset)))
    apply_lora(loaded.backbone, LoraConfig(rank=4, alpha=8.0, targets=("query", "value", "ffw_linear")))
    _randomize_lora(loaded.backbone)
    return loaded, keras_logits(loaded.backbone, TOKENS)


def _transformers_logits(path, dtype="float32"):
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=getattr(torch, dtype), attn_implementation="eager"
    ).eval()
    with torch.no_grad():
        return model(torch.from_numpy(TOKENS.astype(np.int64))).logits.float().numpy(), model


def test_bfloat16_export_loads_in_transformers(lora_gemma3, tmp_path):
    import torch
    from safetensors import safe_open

    loaded, logits = lora_gemma3
    out = export_hf(loaded.backbone, loaded.tokenizer, tmp_path / "bf16", dtype="bfloat16")
    with safe_open(str(out / "model.safetensors"), "np") as f:
        assert {str(f.get_slice(name).get_dtype()) for name in f.keys()} == {"BF16"}
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    theirs, model = _transformers_logits(out, "bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    # bfloat16 keeps 8 mantissa bits (relative step 2**-8 = 0.4%): weights and activations are
    # rounded at that step, so logits move by a few percent of their scale, not more.
    scale = np.abs(logits).max()
    diff = np.abs(theirs - logits).max()
    print(f"\nbfloat16 export in transformers (bf16 compute): max |logit diff| {diff:.3g} at logit scale {scale:.2f}")
    assert diff < 0.05 * scale
    # The same bf16 weights computed in float32 isolate the weight rounding: well inside it.
    theirs32, _ = _transformers_logits(out, "float32")
    diff32 = np.abs(theirs32 - logits).max()
    print(f"bfloat16 weights computed in float32: max |logit diff| {diff32:.3g}")
    assert diff32 < 0.02 * scale


def test_sharded_export_reloads_in_transformers_and_keras_hub(lora_gemma3, tmp_path):
    import keras_hub

    loaded, logits = lora_gemma3
    out = export_hf(loaded.backbone, loaded.tokenizer, tmp_path / "sharded", max_shard_bytes=40_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (out / "model.safetensors").exists()
    assert sorted(set(index["weight_map"].values())) == shards
    assert index["weight_map"]["model.embed_tokens.weight"] == shards[0]
    sizes = [p.stat().st_size for p in out.glob("model-*.safetensors")]
    # Only the 65 kB embedding table is allowed past the limit, in a shard of its own.
    assert sorted(sizes)[-2] < 40_000 + 1_000
    theirs, _ = _transformers_logits(out)
    assert np.abs(theirs - logits).max() < 1e-4
    reloaded = keras_hub.models.Backbone.from_preset(str(out))
    assert np.abs(keras_logits(reloaded, TOKENS) - logits).max() < 1e-4


def test_int8_backbone_exports_dequantized_with_lora_merged(tiny_presets, tmp_path):
    family = "gemma3"  # the embedded model's family; quantizing takes ~15 s a model on CPU
    from keras.quantizers import Int8QuantizationConfig

    loaded = load_model(ModelConfig(preset=str(tiny_presets[family])))
    backbone = loaded.backbone
    float_logits = keras_logits(backbone, TOKENS)
    # Weight-only int8, the mode kerasft trains LoRA on (see DESIGN.md).
    backbone.quantize("int8", config=Int8QuantizationConfig(activation_quantizer=None))
    assert backbone.get_layer("decoder_block_0").attention.query_dense._kernel.dtype == "int8"
    int8_logits = keras_logits(backbone, TOKENS)
    apply_lora(backbone, LoraConfig(rank=4, alpha=8.0, targets=LORA_TARGETS))
    _randomize_lora(backbone)
    lora_logits = keras_logits(backbone, TOKENS)
    assert np.abs(lora_logits - int8_logits).max() > 1e-2

    out = export_hf(backbone, loaded.tokenizer, tmp_path / "int8")
    theirs, _ = _transformers_logits(out)
    diff = np.abs(theirs - lora_logits).max()
    print(f"\n{family} int8 + LoRA export: max |logit diff| vs keras {diff:.2e}; "
          f"int8 vs float base {np.abs(int8_logits - float_logits).max():.2e}")
    assert diff < 1e-4
    from safetensors.numpy import load_file

    weights = load_file(str(out / "model.safetensors"))
    assert {str(w.dtype) for w in weights.values()} == {"float32"}


def test_backbone_quantized_in_an_unsupported_mode_is_refused(tiny_preset, tmp_path):
    loaded = load_model(ModelConfig(preset=str(tiny_preset)))
    # int8 and int4 are dequantized (tests/models/test_qlora.py); keras' float8 is not. One layer is enough.
    loaded.backbone.get_layer("decoder_block_1").ffw_linear.quantize("float8")
    with pytest.raises(KerasftError, match=r"cannot dequantize: ffw_linear \(float8\); only int8 and int4"):
        export_hf(loaded.backbone, loaded.tokenizer, tmp_path / "float8")
    assert not list(tmp_path.iterdir())


def test_failed_write_leaves_nothing_behind(lora_gemma3, tmp_path, monkeypatch):
    import safetensors.numpy

    loaded, _ = lora_gemma3
    calls = []

    def failing_save(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:  # the first shard is on disk when the second fails
            raise OSError("disk full")
        real_save(tensors, filename, metadata=metadata)

    real_save = safetensors.numpy.save_file
    monkeypatch.setattr(safetensors.numpy, "save_file", failing_save)
    with pytest.raises(OSError, match="disk full"):
        export_hf(loaded.backbone, loaded.tokenizer, tmp_path / "hf", max_shard_bytes=40_000)
    assert len(calls) == 2
    assert list(tmp_path.iterdir()) == []  # no target, no staging folder

    def interrupted_save(tensors, filename, metadata=None):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.numpy, "save_file", interrupted_save)
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "old.txt").write_text("previous export")
    with pytest.raises(KeyboardInterrupt):
        export_hf(loaded.backbone, loaded.tokenizer, tmp_path / "hf", overwrite=True)
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
    assert (tmp_path / "hf" / "old.txt").read_text() == "previous export"  # the old export survives


def test_overwrite_replaces_an_export(lora_gemma3, tmp_path):
    loaded, _ = lora_gemma3
    out = export_hf(loaded.backbone, loaded.tokenizer, tmp_path / "hf")
    (out / "stale.txt").write_text("x")
    with pytest.raises(KerasftError, match="already exists; pass --overwrite"):
        export_hf(loaded.backbone, loaded.tokenizer, out)
    export_hf(loaded.backbone, loaded.tokenizer, out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]


def test_model_card_reports_the_run(lora_gemma3, tmp_path):
    import yaml

    from kerasft.config import RunConfig, config_to_dict
    from kerasft.export.card import model_card

    loaded, _ = lora_gemma3
    run_dir = tmp_path / "run"
    (run_dir / "adapter").mkdir(parents=True)
    cfg = config_to_dict(RunConfig())
    cfg["lora"].update(rank=4, alpha=8.0, targets=["query", "value", "ffw_linear"])
    cfg["data"].update(train="data/qa_es/train.json", eval="data/qa_es/eval.json")
    (run_dir / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run_dir / "adapter" / "adapter_config.json").write_text(json.dumps({"base_model": "embedded", "rank": 4}))
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3)))
    (run_dir / "eval_base.json").write_text(json.dumps({"f1": 0.6, "exact_match": 0.0, "count": 108}))
    (run_dir / "eval.json").write_text(json.dumps({"f1": 69.04, "exact_match": 53.7, "count": 108}))
    card = model_card("hf", loaded.backbone, source=str(run_dir), run_dir=run_dir, extra={"dtype": "float32"})
    assert "- base model: `embedded`" in card
    assert "LoRA: rank 4, alpha 8.0, targets query, value, ffw_linear" in card
    assert "training data: `data/qa_es/train.json`" in card
    assert "training: 3 steps, batch 4" in card
    assert "| fine-tuned | 69.0 | 53.7 | 108 |" in card and "| base | 0.6 | 0.0 | 108 |" in card
    assert "Gemma Terms of Use" in card and "AutoModelForCausalLM.from_pretrained" in card
    out = export_hf(loaded.backbone, loaded.tokenizer, tmp_path / "hf", card=card)
    assert (out / "README.md").read_text() == card
    plain = model_card("hf", loaded.backbone, source="some_preset")
    assert "No evaluation results" in plain and "training: none recorded" in plain


def test_cli_export_formats(tiny_preset, tmp_path, capsys):
    from kerasft.cli import main

    assert main(["export", str(tiny_preset), str(tmp_path / "gguf"), "--format", "gguf", "--quant", "f32"]) == 0
    out = capsys.readouterr().out
    assert "GGUF re-import (kerasft importer): max |logit diff| = 0.00e+00" in out and "(OK," in out
    assert (tmp_path / "gguf" / "model-f32.gguf").is_file()
    assert f"- base model: `{tiny_preset}`" in (tmp_path / "gguf" / "README.md").read_text()

    assert main(["export", str(tiny_preset), str(tmp_path / "hf"), "--max-shard-mb", "0.04"]) == 0
    assert "transformers reload (float64 reference)" in capsys.readouterr().out
    assert (tmp_path / "hf" / "model.safetensors.index.json").is_file()
    assert main(["export", str(tiny_preset), str(tmp_path / "hf")]) == 2  # exists, no --overwrite
    assert "already exists; pass --overwrite" in capsys.readouterr().err
    # A lossy export is still run in transformers; its error is reported, not held to the tolerance.
    assert main(["export", str(tiny_preset), str(tmp_path / "bf16"), "--dtype", "bfloat16"]) == 0
    out = capsys.readouterr().out
    assert "transformers reload (float64 reference): max |logit diff|" in out and "lossy format" in out
    assert main(["export", str(tiny_preset), str(tmp_path / "unchecked"), "--no-verify"]) == 0
    assert "written WITHOUT a logits check: export.verify is off" in capsys.readouterr().out

    assert main(["export", str(tiny_preset), str(tmp_path / "peft"), "--format", "peft"]) == 2
    assert "no LoRA adapters to export" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bf16", "gguf", "hf", "unchecked"]


def test_peft_adapter_carries_trained_token_rows(tiny_preset, tmp_path):
    import peft
    import torch
    import transformers

    from kerasft.export.peft import export_peft

    loaded = load_model(ModelConfig(preset=str(tiny_preset)))
    backbone = loaded.backbone
    base_dir = export_hf(backbone, loaded.tokenizer, tmp_path / "base")
    apply_lora(backbone, LoraConfig(rank=4, alpha=8.0, targets=("query", "value")))
    _randomize_lora(backbone)
    # What lora.trainable_tokens does in training: rows of the chat tokens move.
    rows = [loaded.tokenizer.token_to_id("<start_of_turn>"), loaded.tokenizer.token_to_id("<end_of_turn>")]
    table = np.asarray(backbone.token_embedding.embeddings).copy()
    table[rows] += np.random.default_rng(0).normal(0, 0.5, size=(2, table.shape[1])).astype("float32")
    backbone.token_embedding.embeddings.assign(table)
    tokens = np.array([[2, rows[0], 40, 41, rows[1], 7, rows[0], 12]], dtype=np.int32)
    expected = keras_logits(backbone, tokens)

    def peft_logits(adapter):
        base = transformers.AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32)
        model = peft.PeftModel.from_pretrained(base, str(adapter)).eval()
        with torch.no_grad():
            return model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()

    with_rows = export_peft(backbone, tmp_path / "adapter", base_model_name_or_path=str(base_dir), token_ids=rows)
    config = json.loads((with_rows / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"embed_tokens": sorted(rows)}
    assert np.abs(peft_logits(with_rows) - expected).max() < 1e-4  # input rows and the tied output rows
    without = export_peft(backbone, tmp_path / "adapter_only", base_model_name_or_path=str(base_dir))
    assert np.abs(peft_logits(without) - expected).max() > 1e-2


def test_cli_peft_export_of_a_run_dir_keeps_trained_rows(tiny_preset, tmp_path, capsys):
    from kerasft.cli import main
    from kerasft.config import RunConfig, save_config
    from kerasft.models.lora import save_adapter

    run_dir = tmp_path / "run"
    (run_dir / "adapter").mkdir(parents=True)
    lora = LoraConfig(rank=4, alpha=8.0, targets=("query", "value"))
    save_config(RunConfig(model=ModelConfig(preset=str(tiny_preset)), lora=lora), run_dir / "config.yaml")
    loaded = load_model(ModelConfig(preset=str(tiny_preset)))
    apply_lora(loaded.backbone, lora)
    _randomize_lora(loaded.backbone)
    rows = [loaded.tokenizer.token_to_id("<start_of_turn>"), loaded.tokenizer.token_to_id("<end_of_turn>")]
    save_adapter(loaded.backbone, lora, run_dir / "adapter", base_model=str(tiny_preset), token_ids=rows)

    assert main(["export", str(run_dir), str(tmp_path / "peft"), "--format", "peft"]) == 0
    assert "written WITHOUT a logits check: a PEFT adapter runs on its base model" in capsys.readouterr().out
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"embed_tokens": sorted(rows)}
    assert config["base_model_name_or_path"] == str(tiny_preset)
    card = (tmp_path / "peft" / "README.md").read_text()
    assert "LoRA: rank 4, alpha 8.0, targets query, value" in card and "PeftModel.from_pretrained" in card


@pytest.mark.parametrize("override, message", [
    ("export.format=tflite", "export.format: 'tflite' is not one of hf, peft, gguf, savedmodel, onnx, torch"),
    ("export.quant=q4_k", "export.quant: 'q4_k' is not one of f32, f16, q8_0"),
    ("export.max_shard_mb=0", "export.max_shard_mb: must be positive"),
])
def test_bad_export_config_fails_when_loaded(override, message):
    from kerasft.config import load_config

    with pytest.raises(KerasftError, match=message):
        load_config(None, [override])
