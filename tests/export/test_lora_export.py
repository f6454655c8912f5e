"""LoRA (alpha scaling, adapters round trip, merge) and the merged Hugging Face export,
checked against the real consumer: transformers."""

import json

import numpy as np
import pytest

from kerasft.config import LoraConfig, ModelConfig
from kerasft.errors import KerasftError
from kerasft.export.hf import export_hf, keras_logits
from kerasft.export.verify import verify_hf_export
from kerasft.models.lora import adapter_weights, apply_lora, load_adapter, lora_layers, merge_lora, save_adapter
from kerasft.models.presets import load_model

TOKENS = np.array([[2, 5, 17, 40, 41, 99, 7, 3, 250, 12, 13, 14]], dtype=np.int32)


def _randomize_lora(backbone, seed=1):
    rng = np.random.default_rng(seed)
    for layer in lora_layers(backbone):
        for variable in (layer.lora_kernel_a, layer.lora_kernel_b):
            variable.assign(rng.normal(0, 0.2, size=variable.shape).astype("float32"))


@pytest.fixture
def lora_model(tiny_preset):
    loaded = load_model(ModelConfig(preset=str(tiny_preset)))
    base_logits = keras_logits(loaded.backbone, TOKENS)
    apply_lora(loaded.backbone, LoraConfig(rank=4, alpha=8.0, targets=("query", "value", "ffw_linear")))
    _randomize_lora(loaded.backbone)
    return loaded, base_logits


def test_alpha_scales_the_update(tiny_preset):
    loaded = load_model(ModelConfig(preset=str(tiny_preset)))
    layers = apply_lora(loaded.backbone, LoraConfig(rank=4, alpha=2.0, targets=("query",)))
    assert [l.name for l in layers] == ["query"] * len(layers) and layers
    layer = layers[0]
    _randomize_lora(loaded.backbone)
    a, b = layer.lora_kernel_a.numpy(), layer.lora_kernel_b.numpy()
    expected = layer._kernel.numpy() + (2.0 / 4) * np.matmul(a, b)
    np.testing.assert_allclose(np.asarray(layer.kernel), expected, rtol=1e-5, atol=1e-6)
    assert all(v.path.endswith(("lora_kernel_a", "lora_kernel_b")) for v in loaded.backbone.trainable_variables)


def test_unknown_target_is_an_error(tiny_preset):
    loaded = load_model(ModelConfig(preset=str(tiny_preset)))
    with pytest.raises(KerasftError, match="unknown target qeury"):
        apply_lora(loaded.backbone, LoraConfig(targets=("qeury",)))


def test_adapter_round_trip_keeps_alpha(lora_model, tiny_preset, tmp_path):
    loaded, _ = lora_model
    tuned = keras_logits(loaded.backbone, TOKENS)
    save_adapter(loaded.backbone, LoraConfig(rank=4, alpha=8.0, targets=("query", "value", "ffw_linear")), tmp_path, "tiny")
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert (meta["rank"], meta["alpha"]) == (4, 8.0)
    fresh = load_model(ModelConfig(preset=str(tiny_preset)))
    load_adapter(fresh.backbone, tmp_path)
    np.testing.assert_allclose(keras_logits(fresh.backbone, TOKENS), tuned, atol=1e-5)
    assert adapter_weights(fresh.backbone).keys() == adapter_weights(loaded.backbone).keys()


def test_merge_keeps_the_function(lora_model):
    loaded, base = lora_model
    tuned = keras_logits(loaded.backbone, TOKENS)
    assert np.max(np.abs(tuned - base)) > 1e-2
    assert merge_lora(loaded.backbone) > 0
    assert not lora_layers(loaded.backbone)
    np.testing.assert_allclose(keras_logits(loaded.backbone, TOKENS), tuned, atol=1e-5)


def test_hf_export_matches_lora_model_in_transformers(lora_model, tmp_path):
    loaded, base = lora_model
    out = export_hf(loaded.backbone, loaded.tokenizer, tmp_path / "hf")
    check = verify_hf_export(out, loaded.backbone, TOKENS)
    assert check["ok"], check
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["Gemma3ForCausalLM"]
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 1, 0)

    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32)
    with torch.no_grad():
        theirs = model(torch.from_numpy(TOKENS.astype("int64"))).logits.numpy()
    assert np.max(np.abs(theirs - keras_logits(loaded.backbone, TOKENS))) < 1e-4
    assert np.max(np.abs(theirs - base)) > 1e-2  # the adapters are really in the export


def test_hf_tokenizer_and_chat_template_match_ours(lora_model, tmp_path):
    import transformers

    from kerasft.data.template import chat_tokens, encode_prompt, render_chat

    loaded, _ = lora_model
    out = export_hf(loaded.backbone, loaded.tokenizer, tmp_path / "hf")
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(out))
    messages = [{"role": "system", "content": "Sé breve."}, {"role": "user", "content": "¿Dónde está Zaragoza?"}]
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == render_chat("¿Dónde está Zaragoza?", system="Sé breve.")
    ours = encode_prompt(chat_tokens(loaded.tokenizer), "¿Dónde está Zaragoza?", system="Sé breve.")
    assert hf_tok(text, add_special_tokens=False)["input_ids"] == ours


def test_export_refuses_to_overwrite_and_leaves_nothing_behind(lora_model, tmp_path):
    loaded, _ = lora_model
    target = tmp_path / "hf"
    target.mkdir()
    with pytest.raises(KerasftError, match="already exists"):
        export_hf(loaded.backbone, loaded.tokenizer, target)
    assert list(tmp_path.iterdir()) == [target]
