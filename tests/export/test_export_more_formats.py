"""TensorFlow SavedModel, ONNX and PyTorch exports (kerasft.export.export_derived) and GGUF q4_0 /
q5_0, each reloaded in its own runtime and compared with the LoRA model's Keras logits."""

import json

import numpy as np
import pytest

from kerasft.cli import main
from kerasft.config import LoraConfig, ModelConfig
from kerasft.errors import KerasftError
from kerasft.export import FLOAT32_RTOL, export_derived
from kerasft.export.hf import keras_logits
from kerasft.models.lora import apply_lora, lora_layers
from kerasft.models.presets import load_model

TOKENS = np.array([[2, 5, 17, 40, 41, 99, 7, 3, 250, 12, 13, 14, 300, 301, 8, 9, 10, 11]], dtype=np.int32)
# Another batch size and length than the check's (and longer than the tiny model's 8-token window).
OTHER = np.array([[2, 9, 33, 120, 4, 5, 6, 7, 8, 9, 10, 11], [2, 301, 300, 250, 77, 78, 79, 80, 81, 82, 83, 84]],
                 dtype=np.int32)


@pytest.fixture(scope="module")
def lora_model(tiny_preset):
    loaded = load_model(ModelConfig(preset=str(tiny_preset)))
    base = keras_logits(loaded.backbone, TOKENS)
    apply_lora(loaded.backbone, LoraConfig(rank=4, alpha=8.0, targets=("query", "value", "ffw_linear")))
    rng = np.random.default_rng(11)
    for layer in lora_layers(loaded.backbone):
        for variable in (layer.lora_kernel_a, layer.lora_kernel_b):
            variable.assign(rng.normal(0, 0.2, size=variable.shape).astype("float32"))
    lora = keras_logits(loaded.backbone, TOKENS)
    assert np.abs(lora - base).max() > 0.1  # LoRA matters, so an export that drops it fails
    return loaded, lora


def _tolerance(logits):
    return 1e-4 + FLOAT32_RTOL * np.abs(logits).max()


def test_savedmodel_logits_and_greedy_signatures(lora_model, tmp_path, capsys):
    from kerasft.export.savedmodel import load_savedmodel, savedmodel_logits

    loaded, lora = lora_model
    report = export_derived("savedmodel", loaded.backbone, loaded.tokenizer, tmp_path / "sm", TOKENS)
    out = capsys.readouterr().out
    with capsys.disabled():
        print("\n" + out)  # the measured drift, for pytest -s (docs/EXPORT.md)
    assert "tf.saved_model.load, signature logits: max |logit diff|" in out and "OK, tolerance" in out
    assert report["verify"]["ok"] and report["greedy"]["same"] and all(report["greedy"]["savedmodel"])
    assert {"saved_model.pb", "variables", "README.md", "tokenizer.model"} <= set(report["files"])
    assert "library_name: tensorflow" in (tmp_path / "sm" / "README.md").read_text()
    # Reloaded apart from the export, with another batch size and length than the check's: the
    # rows equal the check's logits of the same tokens.
    theirs = savedmodel_logits(load_savedmodel(tmp_path / "sm"), np.concatenate([TOKENS, TOKENS])[:, :12])
    assert np.abs(theirs - lora[:, :12]).max() < _tolerance(lora)
    assert report["greedy"]["savedmodel"][1] != report["greedy"]["savedmodel"][0]  # two different prompts
    assert "greedy signature: " in out and "of 2 prompts equal to kerasft's greedy decoding\n" in out


def test_torch_state_dict_and_exported_program(lora_model, tmp_path):
    import torch
    import transformers

    from kerasft.export.torch_export import PROGRAM, STATE_DICT, torch_logits

    loaded, lora = lora_model
    report = export_derived("torch", loaded.backbone, loaded.tokenizer, tmp_path / "pt", TOKENS)
    assert set(report["verify"]["checks"]) == {"torch.load(weights_only=True) state_dict", "torch.export.load program"}
    assert report["verify"]["ok"] and report["verify"]["max_abs_diff"] < _tolerance(lora)
    assert {STATE_DICT, PROGRAM, "config.json", "tokenizer.model", "README.md"} <= set(report["files"])
    assert not list((tmp_path / "pt").glob("*.safetensors"))  # the weights once, as the state_dict
    state = torch.load(tmp_path / "pt" / STATE_DICT, weights_only=True)
    assert state["model.layers.0.self_attn.q_proj.weight"].dtype == torch.float32
    for how, theirs in torch_logits(tmp_path / "pt", np.concatenate([TOKENS, TOKENS])[:, :12]).items():
        assert np.abs(theirs - lora[:, :12]).max() < _tolerance(lora), how  # another batch size and length
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "pt"))
    assert tokenizer("hola")["input_ids"] == [2, *np.asarray(loaded.tokenizer("hola")).tolist()]


def test_cli_onnx_export_runs_in_onnxruntime(tiny_preset, tmp_path, capsys):
    from kerasft.export.onnx_export import onnx_logits

    out = tmp_path / "onnx"
    assert main(["export", str(tiny_preset), str(out), "--format", "onnx"]) == 0
    printed = capsys.readouterr().out
    with capsys.disabled():
        print("\n" + printed)
    assert "onnxruntime: max |logit diff|" in printed and "(OK, tolerance" in printed
    assert {"model.onnx", "config.json", "README.md"} <= {p.name for p in out.iterdir()}
    assert "library_name: onnx" in (out / "README.md").read_text()
    # Another batch size and length, and a right-padded row: its positions before the padding are
    # those of the unpadded sequence (the export-time check above compared with Keras).
    mask = np.ones_like(OTHER)
    mask[0, 7:] = 0
    padded = onnx_logits(out, OTHER, mask)
    alone = onnx_logits(out, OTHER[:, :7])
    assert np.abs(padded[:, :7] - alone).max() < 1e-5
    assert np.abs(onnx_logits(out, OTHER)[0, 7:] - padded[0, 7:]).max() > 1e-3  # the mask is not ignored


def test_failed_check_and_bad_format_write_nothing(lora_model, tmp_path):
    from kerasft.config import load_config

    loaded, _ = lora_model
    with pytest.raises(KerasftError, match="onnxruntime\\) differ from Keras by .*nothing was written"):
        export_derived("onnx", loaded.backbone, loaded.tokenizer, tmp_path / "bad", TOKENS, atol=-1.0)
    assert list(tmp_path.iterdir()) == []  # no OUT, no staging folder
    with pytest.raises(KerasftError, match="'tflite' is not one of savedmodel, onnx, torch"):
        export_derived("tflite", loaded.backbone, loaded.tokenizer, tmp_path / "x", TOKENS)
    with pytest.raises(KerasftError, match="export.format: 'tflite' is not one of hf, peft, gguf, savedmodel, onnx, torch"):
        load_config(None, ["export.format=tflite"])
    (tmp_path / "exists").mkdir()
    with pytest.raises(KerasftError, match="already exists"):
        export_derived("torch", loaded.backbone, loaded.tokenizer, tmp_path / "exists", TOKENS)


# The logits after the GGUF round trip, measured on this tiny LoRA model (6 random layers, logit
# scale 3.7, rows of single 32-value blocks; 2026-12-07): max |diff| q4_0 2.74, q5_0 2.33; greedy
# next token the same at 44% of the positions for both. Random tiny layers amplify 4-5 bit weight
# error up to the logits' own scale, so the bound below only catches a broken file (NaN, garbage);
# the block check on the written tensors is the exact test of the writer, and the 270M's drift
# is measured in the slow test below.
GGUF_BOUND = 1.0
# Largest |error| of one weight as a fraction of its block's largest |weight|: gguf-py's q4_0
# scale is max/-8 over levels -8..7 (values of the other sign clip at 7: up to one step, 1/8),
# q5_0's max/-16 over -16..15 (1/16); plus the f16 rounding of the scale.
BLOCK_ERROR = {"q4_0": 1 / 8, "q5_0": 1 / 16}


@pytest.mark.parametrize("quant", ["q4_0", "q5_0"])
def test_gguf_block_quantizations_read_back(lora_model, quant, tmp_path):
    import gguf
    from gguf.quants import dequantize

    from kerasft.export.gguf import export_gguf
    from kerasft.export.hf import hf_state_dict
    from kerasft.models.gguf import import_gguf

    loaded, lora = lora_model
    path = export_gguf(loaded.backbone, loaded.tokenizer, tmp_path / quant, quant=quant)
    reader = gguf.GGUFReader(str(path))
    tensors = {t.name: t for t in reader.tensors}
    assert tensors["blk.0.attn_q.weight"].tensor_type.name == tensors["token_embd.weight"].tensor_type.name == quant.upper()
    assert tensors["blk.0.attn_norm.weight"].tensor_type.name == "F32"
    assert int(reader.fields["general.file_type"].contents()) == gguf.LlamaFileType[f"MOSTLY_{quant.upper()}"]
    state = hf_state_dict(loaded.backbone)  # LoRA merged
    for name, hf_name in (("blk.0.attn_q.weight", "model.layers.0.self_attn.q_proj.weight"),
                          ("blk.5.ffn_down.weight", "model.layers.5.mlp.down_proj.weight")):
        weight = state[hf_name]
        found = np.asarray(dequantize(tensors[name].data, tensors[name].tensor_type)).reshape(weight.shape)
        blocks, errors = np.abs(weight).reshape(-1, 32), np.abs(found - weight).reshape(-1, 32)
        assert 0 < errors.max() and (errors <= BLOCK_ERROR[quant] * 1.01 * blocks.max(axis=1, keepdims=True)).all()

    reimported = load_model(ModelConfig(preset=str(import_gguf(path, tmp_path / "preset")))).backbone
    found = keras_logits(reimported, TOKENS)
    diff, scale = np.abs(found - lora).max(), np.abs(lora).max()
    agree = (found.argmax(-1) == lora.argmax(-1)).mean()
    print(f"\n{quant}: max |logit diff| {diff:.3g} at logit scale {scale:.2f}; greedy next token agrees at "
          f"{agree:.0%} of {TOKENS.shape[1]} positions")
    assert np.isfinite(found).all() and diff <= GGUF_BOUND * scale


@pytest.mark.slow
@pytest.mark.parametrize("quant, bound, min_agree", [("q5_0", 0.2, 0.8), ("q4_0", 0.6, 0.65)])
def test_embedded_270m_gguf_block_quantizations(quant, bound, min_agree, tmp_path):
    """The real Gemma 3 270M through export_gguf q4_0 / q5_0 and kerasft's importer: the drift of
    the logits (bound: a fraction of the largest |logit|) and how often the greedy next token
    stays the same, as test_gguf_export's 270M test does for f16 and q8_0 (q8_0: 0.86 at scale
    40.9, 22 of 22 positions).

    Measured 2026-12-07 (`pytest -m slow -s -k embedded_270m tests/export/test_export_more_formats.py`),
    logit scale 40.9: q5_0 (191 MB) 5.95, greedy 86% (19 of 22); q4_0 (158 MB) 21.1, 73% (16 of 22).
    """
    from kerasft.export.gguf import export_gguf
    from kerasft.models.gguf import import_gguf

    loaded = load_model(ModelConfig(preset="embedded"))
    text = "El río Ebro atraviesa Zaragoza y desemboca en el mar Mediterráneo, cerca de Tortosa."
    tokens = np.array([[2, *np.asarray(loaded.tokenizer(text)).tolist()]], dtype=np.int32)
    expected = keras_logits(loaded.backbone, tokens)
    path = export_gguf(loaded.backbone, loaded.tokenizer, tmp_path / "gguf", quant=quant)
    found = keras_logits(load_model(ModelConfig(preset=str(import_gguf(path, tmp_path / "preset")))).backbone, tokens)
    diff, scale = np.abs(found - expected).max(), np.abs(expected).max()
    agree = (found.argmax(-1) == expected.argmax(-1)).mean()
    print(f"\n270M {quant}: {path.stat().st_size / 1e6:.0f} MB; max |logit diff| {diff:.3g} at logit scale {scale:.1f}; "
          f"greedy next token agrees at {agree:.0%} of {tokens.shape[1]} positions")
    assert diff <= bound * scale
    assert agree >= min_agree
