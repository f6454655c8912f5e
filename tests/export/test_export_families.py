"""Merged Hugging Face export for Gemma 1, 2 and 3 and the PEFT adapter export, checked against
their real consumers: transformers, keras-hub's Hugging Face importer and peft."""

import json

import numpy as np
import pytest

from kerasft.config import ModelConfig
from kerasft.errors import KerasftError
from kerasft.export.hf import FLAT, PER_HEAD, export_hf, hf_kernel, keras_logits
from kerasft.export.verify import verify_hf_export
from kerasft.export.peft import export_peft, peft_factors
from kerasft.models.presets import load_model
from kerasft.testing import export_base_and_lora

FAMILIES = ("gemma", "gemma2", "gemma3")
RANK, ALPHA = 4, 8.0
# 18 tokens: longer than the tiny presets' sliding window (8), so local attention is checked too.
TOKENS = np.array([[2, 5, 17, 40, 41, 99, 7, 3, 250, 12, 13, 14, 300, 301, 8, 9, 10, 11]], dtype=np.int32)
ATOL = 1e-4


@pytest.fixture(scope="module", params=FAMILIES)
def exported(request, tiny_presets, tmp_path_factory):
    """One family's base export, then LoRA on every projection with random non-zero A and B,
    its merged export and its PEFT adapter."""
    family = request.param
    root = tmp_path_factory.mktemp(f"export_{family}")
    exported = export_base_and_lora(tiny_presets[family], root, TOKENS, RANK, ALPHA, seed=7)
    exported.family = family
    return exported


def _hf_model(path):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(
        str(path), dtype=torch.float32, attn_implementation="eager"
    ).eval()


def _torch_logits(model):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(TOKENS.astype(np.int64))).logits.float().numpy()


def test_merged_export_matches_lora_model_in_transformers(exported):
    theirs = _torch_logits(_hf_model(exported.merged_dir))
    assert np.max(np.abs(theirs - exported.lora_logits)) < ATOL
    assert np.max(np.abs(theirs - exported.base_logits)) > 1e-2  # the adapters are really in the export
    check = verify_hf_export(exported.merged_dir, exported.backbone, TOKENS)
    assert check["ok"], check

    config = json.loads((exported.merged_dir / "config.json").read_text())
    architecture = {"gemma": "GemmaForCausalLM", "gemma2": "Gemma2ForCausalLM", "gemma3": "Gemma3ForCausalLM"}
    assert config["architectures"] == [architecture[exported.family]]
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (2, 1, 0)
    if exported.family == "gemma2":
        # keras-hub: every even layer is local; transformers' own default is the same.
        assert config["layer_types"] == ["sliding_attention", "full_attention"]
        caps = (config["attn_logit_softcapping"], config["final_logit_softcapping"])
        assert (config["sliding_window"], caps) == (8, (50.0, 30.0))
        assert config["query_pre_attn_scalar"] == 8


def test_greedy_generation_matches_transformers(exported):
    """32 greedy tokens from keras-hub's cached decoder and from transformers' generate are the
    same ids: the export computes the same function at every decode position, not just one."""
    import torch
    import transformers

    from kerasft.evaluate.generate import causal_lm_for, generate_ids

    prompt = TOKENS[0, :6].tolist()
    stop_ids = (1, 200)  # eos, and an arbitrary id standing in for <end_of_turn>
    ours, _ = generate_ids(causal_lm_for(exported.backbone), [prompt], 32, 1, stop_ids)
    model = _hf_model(exported.merged_dir)
    with torch.no_grad():
        output = model.generate(
            torch.tensor([prompt]), max_new_tokens=32, do_sample=False, eos_token_id=list(stop_ids), pad_token_id=0,
            generation_config=transformers.GenerationConfig(do_sample=False),
        )
    theirs = output[0, len(prompt):].tolist()
    theirs = theirs[: next((i for i, t in enumerate(theirs) if t in stop_ids), len(theirs))]
    assert len(ours[0]) >= 16, ours  # a long enough run to cross the sliding window (8) twice
    assert ours[0] == theirs


def test_merged_export_ships_generation_and_tokenizer_files(exported):
    files = sorted(p.name for p in exported.merged_dir.iterdir())
    assert files == ["README.md", "config.json", "generation_config.json", "model.safetensors",
                     "special_tokens_map.json", "tokenizer.model", "tokenizer_config.json"]
    generation = json.loads((exported.merged_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"][0] == 1 and generation["do_sample"] is False
    special = json.loads((exported.merged_dir / "special_tokens_map.json").read_text())
    assert (special["bos_token"], special["eos_token"], special["pad_token"]) == ("<bos>", "<eos>", "<pad>")
    assert "Gemma Terms of Use" in (exported.merged_dir / "README.md").read_text()


def test_merged_export_reloads_in_keras_hub(exported):
    import keras_hub

    reloaded = keras_hub.models.Backbone.from_preset(str(exported.merged_dir))
    assert type(reloaded) is type(exported.backbone)
    ours, theirs = exported.backbone.get_config(), reloaded.get_config()
    for key in ours:
        if key not in ("name", "dtype", "trainable"):
            assert theirs[key] == ours[key], key
    assert np.max(np.abs(keras_logits(reloaded, TOKENS) - exported.lora_logits)) < ATOL


def test_peft_adapter_on_the_base_export_matches_lora_model(exported):
    import peft

    model = peft.PeftModel.from_pretrained(_hf_model(exported.base_dir), str(exported.adapter_dir)).eval()
    theirs = _torch_logits(model)
    assert np.max(np.abs(theirs - exported.lora_logits)) < ATOL
    assert np.max(np.abs(theirs - exported.base_logits)) > 1e-2

    config = json.loads((exported.adapter_dir / "adapter_config.json").read_text())
    assert (config["peft_type"], config["task_type"]) == ("LORA", "CAUSAL_LM")
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["bias"]) == (RANK, ALPHA, 0.0, "none")
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    assert config["target_modules"] == sorted(modules)
    heads, kv_heads = exported.backbone.num_query_heads, exported.backbone.num_key_value_heads
    # Query/key/value updates need rank heads * r in PEFT's form; alpha grows with it.
    assert config["rank_pattern"]["q_proj"] == heads * RANK
    assert config["alpha_pattern"]["q_proj"] == heads * ALPHA
    assert config["rank_pattern"].get("k_proj", RANK) == kv_heads * RANK
    assert "o_proj" not in config["rank_pattern"] and "down_proj" not in config["rank_pattern"]

    from safetensors.numpy import load_file

    tensors = load_file(str(exported.adapter_dir / "adapter_model.safetensors"))
    assert len(tensors) == 2 * len(modules) * exported.backbone.num_layers
    layer = "base_model.model.model.layers.0."
    assert tensors[layer + "mlp.down_proj.lora_A.weight"].shape == (RANK, 64)  # (r, in_features)
    assert tensors[layer + "mlp.down_proj.lora_B.weight"].shape == (32, RANK)  # (out_features, r)
    assert tensors[layer + "self_attn.q_proj.lora_A.weight"].shape == (heads * RANK, 32)
    assert tensors[layer + "self_attn.q_proj.lora_B.weight"].shape == (heads * 8, heads * RANK)


@pytest.mark.parametrize(
    "layout, shape_a, shape_b",
    [
        (PER_HEAD, (4, 32, 3), (3, 8)),  # query: (heads, hidden, r) x (r, head_dim)
        (FLAT, (4, 8, 3), (3, 32)),  # attention output: (heads, head_dim, r) x (r, hidden)
        (FLAT, (32, 3), (3, 64)),  # MLP: (in, r) x (r, out)
    ],
)
def test_peft_factors_reproduce_the_keras_update(layout, shape_a, shape_b):
    rng = np.random.default_rng(0)
    kernel_a, kernel_b = rng.normal(size=shape_a), rng.normal(size=shape_b)
    lora_a, lora_b = peft_factors(kernel_a, kernel_b, layout)
    update = hf_kernel(np.matmul(kernel_a, kernel_b), layout)
    np.testing.assert_allclose(lora_b @ lora_a, update, rtol=1e-12, atol=1e-12)
    assert lora_a.shape == (lora_b.shape[1], update.shape[1])
    if layout == PER_HEAD:
        # Not a rank-r product of the HF weight: a shared B across heads gives rank heads * r.
        assert np.linalg.matrix_rank(update) == shape_a[0] * shape_b[0] == lora_a.shape[0]


def test_export_refuses_what_transformers_would_compute_differently(tmp_path):
    import keras_hub
    from kerasft.testing import backbone_config

    # HF's Gemma 1 always scales queries by head_dim.
    backbone = keras_hub.models.GemmaBackbone(**dict(backbone_config("gemma", 512), query_head_dim_normalize=False))
    with pytest.raises(KerasftError, match="query_head_dim_normalize=False"):
        export_hf(backbone, None, tmp_path / "hf")
    with pytest.raises(KerasftError, match="query_head_dim_normalize=False"):
        export_peft(backbone, tmp_path / "adapter", base_model_name_or_path="base")
    assert not list(tmp_path.iterdir())


def test_peft_export_needs_adapters_and_refuses_to_overwrite(exported, tiny_presets, tmp_path):
    with pytest.raises(KerasftError, match="already exists"):
        export_peft(exported.backbone, exported.adapter_dir, base_model_name_or_path="base")
    export_peft(exported.backbone, exported.adapter_dir, base_model_name_or_path="base", overwrite=True)
    assert json.loads((exported.adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"] == "base"
    assert sorted(p.name for p in exported.adapter_dir.parent.iterdir()) == ["adapter", "base", "merged"]
    assert (exported.adapter_dir / "README.md").is_file()
    plain = load_model(ModelConfig(preset=str(tiny_presets[exported.family])))
    with pytest.raises(KerasftError, match="no LoRA adapters"):
        export_peft(plain.backbone, tmp_path / "adapter", base_model_name_or_path="base")
    assert not list(tmp_path.iterdir())
