"""The real Gemma 3 270M (the embedded preset) with LoRA through the merged Hugging Face export,
checked in transformers: the tiny-model export tests (tests/export/test_lora_export.py) at full size,
with a sequence longer than the 512-token sliding window so local and global layers both count."""

import numpy as np
import pytest

from kerasft.config import ExportConfig, LoraConfig, ModelConfig
from kerasft.export.hf import export_hf, keras_logits
from kerasft.export.verify import compare_logits, verify_hf_export
from kerasft.models.lora import apply_lora, lora_layers
from kerasft.models.presets import load_model

PARAGRAPH = ("El río Ebro nace en Fontibre, en Cantabria, atraviesa Zaragoza y desemboca en el mar Mediterráneo, "
             "cerca de Tortosa, donde forma un delta de arrozales y lagunas. ")


@pytest.mark.slow
def test_embedded_270m_lora_hf_export_matches_transformers(tmp_path):
    import torch
    import transformers

    check_cfg = ExportConfig()  # the tolerance `kerasft run` / `kerasft export` checks exports with
    loaded = load_model(ModelConfig(preset="embedded"))
    ids = np.asarray(loaded.tokenizer(PARAGRAPH * 30)).tolist()
    tokens = np.array([[2, *ids[:599]]], dtype=np.int32)
    assert tokens.shape[1] == 600 > loaded.backbone.sliding_window_size
    base = keras_logits(loaded.backbone, tokens)

    apply_lora(loaded.backbone, LoraConfig(rank=8, alpha=16.0, targets=("query", "value", "ffw_linear")))
    rng = np.random.default_rng(0)
    for layer in lora_layers(loaded.backbone):  # B starts at zero; a trained adapter's is not
        b = layer.lora_kernel_b
        b.assign(rng.normal(0, 0.02, size=b.shape).astype("float32"))
    tuned = keras_logits(loaded.backbone, tokens)
    changed = float(np.abs(tuned - base).max())

    out = export_hf(loaded.backbone, loaded.tokenizer, tmp_path / "hf", dtype="float32")
    check = verify_hf_export(out, loaded.backbone, tokens, atol=check_cfg.atol, rtol=check_cfg.rtol)
    print(f"\n270M LoRA export: transformers float64 max |logit diff| {check['max_abs_diff']:.3g} "
          f"(tolerance {check['tolerance']:.3g}, logit scale {check['logit_scale']:.1f}); LoRA moved logits by {changed:.3g}")
    assert check["ok"], check

    # As a user loads it: float32, transformers' default attention.
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    with torch.no_grad():
        theirs = model(torch.from_numpy(tokens.astype(np.int64))).logits.numpy()
    same = compare_logits(tuned, theirs, check_cfg.atol, check_cfg.rtol, "transformers float32")
    from_base = float(np.abs(theirs - base).max())
    print(f"transformers float32: max |logit diff| {same['max_abs_diff']:.3g} to the LoRA model, {from_base:.3g} to the base")
    assert same["ok"], same
    assert from_base > 100 * check["tolerance"]  # the adapters are in the export
