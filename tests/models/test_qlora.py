"""QLoRA-like training: weight-only int8/int4 base projections with float LoRA on top. It learns,
shrinks the weights, reloads exactly, exports dequantized weights that transformers agrees with,
and the memory plan counts the quantized bytes."""

import json
from pathlib import Path

import numpy as np
import pytest

from kerasft.cli import main
from kerasft.config import LoraConfig, ModelConfig, load_config
from kerasft.errors import KerasftError
from kerasft.export.hf import export_hf, keras_logits
from kerasft.export.verify import verify_hf_export
from kerasft.models.lora import apply_lora, load_adapter, lora_layers, save_adapter
from kerasft.models.presets import load_model
from kerasft.models.quant import quantize_backbone, quantized_modes, weight_bytes

ROOT = Path(__file__).resolve().parents[2]
TOKENS = np.array([[2, 5, 17, 40, 41, 99, 7, 3, 250, 12, 13, 14]], dtype=np.int32)
LORA = LoraConfig(rank=4, alpha=8.0, targets=("query", "value", "ffw_linear"))


def _quantized_lora_model(preset, mode, seed=1):
    loaded = load_model(ModelConfig(preset=str(preset)))
    quantize_backbone(loaded.backbone, mode)
    apply_lora(loaded.backbone, LORA)
    rng = np.random.default_rng(seed)
    for layer in lora_layers(loaded.backbone):
        for variable in (layer.lora_kernel_a, layer.lora_kernel_b):
            variable.assign(rng.normal(0, 0.2, size=variable.shape).astype("float32"))
    return loaded


def test_weights_shrink_and_embedding_stays_float(tiny_preset):
    sizes = {}
    for mode in ("none", "int8", "int4"):
        backbone = load_model(ModelConfig(preset=str(tiny_preset))).backbone
        report = quantize_backbone(backbone, mode)
        assert report["weights_bytes_after"] == weight_bytes(backbone)
        sizes[mode] = report["weights_bytes_after"]
        assert quantized_modes(backbone) == ({mode} if mode != "none" else set())
        assert backbone.token_embedding.embeddings.dtype == "float32"
    assert sizes["int4"] < sizes["int8"] < sizes["none"]


def test_quantizing_after_lora_is_an_error(tiny_preset):
    backbone = load_model(ModelConfig(preset=str(tiny_preset))).backbone
    apply_lora(backbone, LORA)
    with pytest.raises(KerasftError, match="before enabling LoRA"):
        quantize_backbone(backbone, "int8")
    with pytest.raises(KerasftError, match="model.quantize"):
        load_config(None, ["model.quantize=int3"])


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_adapter_reloads_exactly_and_exports_dequantized(tiny_preset, tmp_path, mode):
    loaded = _quantized_lora_model(tiny_preset, mode)
    tuned = keras_logits(loaded.backbone, TOKENS)
    save_adapter(loaded.backbone, LORA, tmp_path / "adapter", "tiny")
    fresh = load_model(ModelConfig(preset=str(tiny_preset)))
    quantize_backbone(fresh.backbone, mode)
    load_adapter(fresh.backbone, tmp_path / "adapter")
    np.testing.assert_array_equal(keras_logits(fresh.backbone, TOKENS), tuned)

    float_base = keras_logits(load_model(ModelConfig(preset=str(tiny_preset))).backbone, TOKENS)
    out = export_hf(loaded.backbone, loaded.tokenizer, tmp_path / "hf")
    check = verify_hf_export(out, loaded.backbone, TOKENS)
    assert check["ok"], check  # transformers on the dequantized, merged weights = the quantized LoRA model
    assert np.max(np.abs(tuned - float_base)) > 1e-2


def test_int8_lora_run_learns_reports_bytes_and_reloads(tiny_preset, tmp_path):
    from kerasft.models.presets import load_source

    lines = [json.dumps({"prompt": f"Pregunta {i}", "response": "La respuesta es Zaragoza."}) for i in range(8)]
    (tmp_path / "few.jsonl").write_text("\n".join(lines) + "\n")
    argv = ["train", str(ROOT / "configs/quickstart.yaml"), f"model.preset={tiny_preset}", f"output_dir={tmp_path}",
            "name=q8", f"data.train={tmp_path}/few.jsonl", "data.sequence_length=64", "model.quantize=int8",
            "train.epochs=8", "train.batch_size=4", "train.learning_rate=1e-2", "train.warmup_ratio=0",
            "lora.targets=[query,value,ffw_linear]"]
    assert main(argv) == 0
    run = tmp_path / "q8"
    losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 16
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses
    summary = json.loads((run / "summary.json").read_text())
    report = summary["model"]["quantize"]
    assert report["mode"] == "int8" and report["weights_bytes_after"] < report["weights_bytes_before"]

    loaded, _ = load_source(str(run))  # base re-quantized from the run's config, then the adapter
    assert quantized_modes(loaded.backbone) == {"int8"}
    again, _ = load_source(str(run))
    np.testing.assert_array_equal(keras_logits(loaded.backbone, TOKENS), keras_logits(again.backbone, TOKENS))


def test_plan_counts_quantized_weights(tiny_preset):
    from kerasft.train.plan import format_plan, plan_step

    weights, parameters = {}, set()
    for mode in ("none", "int8", "int4"):
        cfg = load_config(ROOT / "configs/quickstart.yaml", [f"model.preset={tiny_preset}", "data.sequence_length=64",
                                                              "train.batch_size=2", f"model.quantize={mode}"])
        plan = plan_step(cfg, "cpu", search=False)
        weights[mode] = plan.step.weights
        parameters.add(plan.parameters)  # scales are not parameters; packed int4 holds two a byte
        if mode != "none":
            assert f"projections {mode}" in format_plan(plan, "cpu")
    assert weights["int4"] < weights["int8"] < weights["none"]
    assert len(parameters) == 1
    backbone = load_model(ModelConfig(preset=str(tiny_preset))).backbone
    quantize_backbone(backbone, "int8")
    apply_lora(backbone, LoraConfig())
    frozen = sum(int(np.prod(v.shape)) * np.dtype(v.dtype).itemsize for v in backbone.non_trainable_variables)
    assert weights["int8"] == frozen  # the plan's abstract int8 variables are the real ones
