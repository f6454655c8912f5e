"""Merged export to Hugging Face safetensors, and its check against transformers.

LoRA is folded into the kernels as the weights are read (keras' `layer.kernel` returns
base + (alpha/rank) * A @ B), so the export computes the fine-tuned function with no adapter.
keras-hub's own exporter is not used: it drops unmerged LoRA silently and writes Gemma's
bos/eos ids swapped in the Gemma 3 config.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

from kerasft.data.template import HF_CHAT_TEMPLATE
from kerasft.errors import KerasftError


def export_hf(backbone, tokenizer, out_dir: str | Path, *, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Writes a transformers-loadable folder: model.safetensors, config.json (with
    `architectures`), generation_config.json, tokenizer.model and tokenizer configs.

    The folder appears atomically: it is built beside the target and renamed into place.
    """
    from safetensors.numpy import save_file

    from kerasft.models.presets import model_family

    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise KerasftError(f"{out}: already exists; pass --overwrite to replace it")
    family = model_family(backbone)
    if family != "gemma3":
        raise KerasftError(f"merged Hugging Face export supports Gemma 3 so far, not {family}")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        tensors = {name: _cast(value, dtype) for name, value in gemma3_state_dict(backbone).items()}
        save_file(tensors, str(staging / "model.safetensors"), metadata={"format": "pt"})
        config = gemma3_config(backbone, dtype)
        _write_json(staging / "config.json", config)
        _write_json(
            staging / "generation_config.json",
            {"bos_token_id": config["bos_token_id"], "eos_token_id": [config["eos_token_id"], _eot_id(tokenizer)],
             "pad_token_id": config["pad_token_id"], "do_sample": False},
        )
        write_tokenizer_files(tokenizer, staging)
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def gemma3_state_dict(backbone) -> dict:
    """Hugging Face Gemma3ForCausalLM tensors (numpy, float32) from a keras-hub Gemma3Backbone."""
    import numpy as np

    def value(variable_or_tensor):
        return np.asarray(variable_or_tensor, dtype=np.float32)

    hidden = backbone.hidden_dim
    state = {"model.embed_tokens.weight": value(backbone.token_embedding.embeddings)}
    for i in range(backbone.num_layers):
        block = backbone.get_layer(f"decoder_block_{i}")
        attention = block.attention
        prefix = f"model.layers.{i}."
        for name, dense in (("q_proj", attention.query_dense), ("k_proj", attention.key_dense), ("v_proj", attention.value_dense)):
            kernel = value(dense.kernel)  # (heads, hidden, head_dim), LoRA merged
            state[prefix + f"self_attn.{name}.weight"] = kernel.transpose(0, 2, 1).reshape(-1, hidden)
        output = value(attention.output_dense.kernel)  # (heads, head_dim, hidden)
        state[prefix + "self_attn.o_proj.weight"] = output.transpose(2, 0, 1).reshape(hidden, -1)
        state[prefix + "self_attn.q_norm.weight"] = value(attention.query_norm.scale)
        state[prefix + "self_attn.k_norm.weight"] = value(attention.key_norm.scale)
        state[prefix + "mlp.gate_proj.weight"] = value(block.gating_ffw.kernel).T
        state[prefix + "mlp.up_proj.weight"] = value(block.gating_ffw_2.kernel).T
        state[prefix + "mlp.down_proj.weight"] = value(block.ffw_linear.kernel).T
        # keras-hub and transformers both compute x * (1 + w) in Gemma's RMSNorm.
        state[prefix + "input_layernorm.weight"] = value(block.pre_attention_norm.scale)
        state[prefix + "post_attention_layernorm.weight"] = value(block.post_attention_norm.scale)
        state[prefix + "pre_feedforward_layernorm.weight"] = value(block.pre_ffw_norm.scale)
        state[prefix + "post_feedforward_layernorm.weight"] = value(block.post_ffw_norm.scale)
    state["model.norm.weight"] = value(backbone.get_layer("final_normalization").scale)
    return {name: np.ascontiguousarray(array) for name, array in state.items()}


def gemma3_config(backbone, dtype: str = "float32") -> dict:
    """config.json for Gemma3ForCausalLM (model_type gemma3_text) matching the backbone."""
    layer_types, local_base, global_base = [], 10_000.0, 1_000_000.0
    for i in range(backbone.num_layers):
        block = backbone.get_layer(f"decoder_block_{i}")
        if block.use_sliding_window_attention:
            layer_types.append("sliding_attention")
            local_base = float(block.rope_wavelength)
        else:
            layer_types.append("full_attention")
            global_base = float(block.rope_wavelength)
    if backbone.query_head_dim_normalize:
        query_scalar = backbone.head_dim
    else:
        query_scalar = backbone.hidden_dim // backbone.num_query_heads
    local_factor = float(backbone.local_rope_scaling_factor or 1.0)
    global_factor = float(backbone.global_rope_scaling_factor or 1.0)
    return {
        "architectures": ["Gemma3ForCausalLM"],
        "model_type": "gemma3_text",
        "vocab_size": backbone.vocabulary_size,
        "hidden_size": backbone.hidden_dim,
        "intermediate_size": backbone.intermediate_dim,
        "num_hidden_layers": backbone.num_layers,
        "num_attention_heads": backbone.num_query_heads,
        "num_key_value_heads": backbone.num_key_value_heads,
        "head_dim": backbone.head_dim,
        "hidden_activation": "gelu_pytorch_tanh",
        "rms_norm_eps": backbone.layer_norm_epsilon,
        "query_pre_attn_scalar": query_scalar,
        "sliding_window": backbone.sliding_window_size,
        "layer_types": layer_types,
        "rope_theta": global_base,
        "rope_local_base_freq": local_base,
        "rope_scaling": None if global_factor == 1.0 else {"rope_type": "linear", "factor": global_factor},
        "rope_parameters": {
            "sliding_attention": _rope(local_base, local_factor),
            "full_attention": _rope(global_base, global_factor),
        },
        "attn_logit_softcapping": backbone.attention_logit_soft_cap,
        "final_logit_softcapping": backbone.final_logit_soft_cap,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "max_position_embeddings": 32768,
        "tie_word_embeddings": True,
        "use_bidirectional_attention": False,
        "pad_token_id": 0,
        "eos_token_id": 1,
        "bos_token_id": 2,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def _rope(base: float, factor: float) -> dict:
    if factor == 1.0:
        return {"rope_type": "default", "rope_theta": base}
    return {"rope_type": "linear", "rope_theta": base, "factor": factor}


def write_tokenizer_files(tokenizer, out: Path) -> None:
    """tokenizer.model (the SentencePiece proto), tokenizer_config.json with the chat template,
    and special_tokens_map.json, as transformers' GemmaTokenizer expects them."""
    (out / "tokenizer.model").write_bytes(tokenizer.proto)
    special = {"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>", "unk_token": "<unk>"}
    _write_json(out / "special_tokens_map.json", special)
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "GemmaTokenizer",
            **special,
            "add_bos_token": True,
            "add_eos_token": False,
            "model_max_length": 32768,
            "chat_template": HF_CHAT_TEMPLATE,
        },
    )


def keras_logits(backbone, token_ids, padding_mask=None):
    """Full-vocabulary logits of a keras-hub Gemma backbone (soft cap included), as numpy."""
    import numpy as np

    token_ids = np.asarray(token_ids, dtype=np.int32)
    if padding_mask is None:
        padding_mask = np.ones_like(token_ids, dtype=bool)
    hidden = backbone({"token_ids": token_ids, "padding_mask": padding_mask})
    return np.asarray(backbone.token_embedding(hidden, reverse=True), dtype=np.float32)


def verify_hf_export(out_dir: str | Path, backbone, token_ids, *, atol: float = 1e-4) -> dict:
    """Loads the export with transformers and compares its logits with the Keras model's.

    Args:
        token_ids: a (batch, length) integer array of unpadded sequences.

    Returns:
        {"max_abs_diff", "atol", "ok"}. Raises KerasftError when transformers is missing.
    """
    import numpy as np

    try:
        import torch
        import transformers
    except ImportError:
        raise KerasftError("checking an export needs transformers and torch: pip install 'kerasft[verify]'") from None
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out_dir), dtype=torch.float32)
    model.eval()
    ids = np.asarray(token_ids, dtype=np.int64)
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids)).logits.float().numpy()
    ours = keras_logits(backbone, ids.astype(np.int32))
    diff = float(np.max(np.abs(theirs - ours)))
    return {"max_abs_diff": diff, "atol": atol, "ok": diff <= atol}


def _eot_id(tokenizer) -> int:
    return int(tokenizer.token_to_id("<end_of_turn>"))


def _cast(array, dtype: str):
    import numpy as np

    if dtype == "float32":
        return array
    if dtype == "bfloat16":
        import ml_dtypes

        return array.astype(ml_dtypes.bfloat16)
    if dtype == "float16":
        return array.astype(np.float16)
    raise KerasftError(f"export.dtype must be float32, bfloat16 or float16, got {dtype!r}")


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
