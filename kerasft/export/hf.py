"""Merged export to Hugging Face safetensors for Gemma 1, 2 and 3 and Llama (LlamaForCausalLM: Llama 2,
TinyLlama, Llama 3), and its check against transformers.

LoRA is folded into the kernels as the weights are read (keras' `layer.kernel` returns
base + (alpha/rank) * A @ B), so the export computes the fine-tuned function with no adapter.
An int8 or int4 backbone (model.quantize) is dequantized first, then merged.
The tensor layouts and config keys are the exact inverse of keras-hub's importers
(keras_hub/src/utils/transformers/convert_gemma.py and convert_gemma3.py), so
`keras_hub.models.Backbone.from_preset(export_dir)` reloads the same model. keras-hub's own
exporter is not used: it drops unmerged LoRA silently, writes Gemma 2 as Gemma 1, gets the
k/v shapes wrong under grouped-query attention in Gemma 1, omits `architectures` for Gemma 1
and swaps bos/eos in the Gemma 3 config.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kerasft.data.template import chat_tokens, hf_chat_template
from kerasft.errors import KerasftError
from kerasft.export.card import model_card
from kerasft.models.families import (FAMILIES, LLAMA_FAMILIES, LLAMA_NORMS, LLAMA_PROJECTIONS, family_of, model_family,
                                     ties_embeddings)
from kerasft.models.quant import float_kernel
from kerasft.models.vocab import hf_word_pieces
from kerasft.paths import staged_dir

# family -> (transformers architecture, config model_type)
HF_ARCHITECTURES = {name: (family.hf_architecture, family.hf_model_type) for name, family in FAMILIES.items()}

# 5 GB shards, transformers 4.x's default (5.x writes up to 50 GB per file).
DEFAULT_MAX_SHARD_BYTES = 5 * 1000**3

# Every Gemma vocabulary has these ids; export_hf checks the tokenizer agrees.
SPECIAL_TOKEN_IDS = {"<pad>": 0, "<eos>": 1, "<bos>": 2}

# Kernel layouts. PER_HEAD: keras (heads, in, head_dim), HF rows ordered head by head.
# FLAT: keras (..., out), HF (out, prod(...)): the dense MLP kernels and the attention output.
# IN_PER_HEAD: keras (in, heads, head_dim) (Llama's q/k/v), HF rows ordered head by head.
PER_HEAD, FLAT, IN_PER_HEAD = "per_head", "flat", "in_per_head"

# The projections of a decoder block: keras-hub layer name (what LoRA targets name), the
# attribute path in keras-hub's decoder block, the module under HF's model.layers.N, the layout.
PROJECTIONS = (
    ("query", "attention.query_dense", "self_attn.q_proj", PER_HEAD),
    ("key", "attention.key_dense", "self_attn.k_proj", PER_HEAD),
    ("value", "attention.value_dense", "self_attn.v_proj", PER_HEAD),
    ("attention_output", "attention.output_dense", "self_attn.o_proj", FLAT),
    ("ffw_gating", "gating_ffw", "mlp.gate_proj", FLAT),
    ("ffw_gating_2", "gating_ffw_2", "mlp.up_proj", FLAT),
    ("ffw_linear", "ffw_linear", "mlp.down_proj", FLAT),
)

# Backbone settings that transformers' class for each family hard-codes (and keras-hub's importer
# assumes), so a backbone that differs cannot be exported exactly.
_FIXED_SETTINGS = {
    "gemma": {
        "query_head_dim_normalize": True,
        "use_post_attention_norm": False,
        "attention_logit_soft_cap": None,
        "final_logit_soft_cap": None,
        "use_sliding_window_attention": False,
    },
    "gemma2": {"use_post_attention_norm": True, "use_sliding_window_attention": True},
    "gemma3": {
        "use_query_key_norm": True,
        "use_post_attention_norm": True,
        "use_post_ffw_norm": True,
        "use_bidirectional_attention": False,
    },
    # transformers' LlamaForCausalLM has every setting keras-hub's Llama backbones have.
    "llama": {},
    "llama3": {},
}


def export_hf(
    backbone,
    tokenizer,
    out_dir: str | Path,
    *,
    dtype: str = "float32",
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    card: str | None = None,
    overwrite: bool = False,
    chat_template: str = "auto",
) -> Path:
    """Writes a transformers-loadable folder for a Gemma 1, 2 or 3 backbone: model.safetensors
    (or shards with model.safetensors.index.json), config.json (with `architectures`),
    generation_config.json, tokenizer.model, tokenizer configs and a model card (README.md).

    An int8 or int4 backbone (model.quantize) is written dequantized, with LoRA merged.
    The folder appears atomically: it is built beside the target and renamed into place.

    Args:
        dtype: float32, bfloat16 or float16 tensors.
        max_shard_bytes: above this many bytes of tensors the weights are split into shards of
            at most this size (a larger single tensor gets a shard of its own).
        card: README.md text (kerasft.export.card.model_card); None writes the card of the
            backbone alone.
    """
    out = Path(out_dir)
    llama = hf_family(backbone) in LLAMA_FAMILIES
    config = hf_config(backbone, dtype, tokenizer if llama else None)  # checks the backbone before anything is written
    if not llama:
        for token, expected in SPECIAL_TOKEN_IDS.items():
            if tokenizer.token_to_id(token) != expected:
                raise KerasftError(
                    f"tokenizer maps {token} to {tokenizer.token_to_id(token)}, not {expected} as Gemma's config says"
                )
    with staged_dir(out, overwrite) as staging:
        tensors = {name: _cast(value, dtype) for name, value in hf_state_dict(backbone).items()}
        save_sharded(tensors, staging, max_shard_bytes)
        _write_json(staging / "config.json", config)
        stop_ids = _stop_ids(tokenizer) if llama else [config["eos_token_id"], _eot_id(tokenizer)]
        _write_json(
            staging / "generation_config.json",
            {"bos_token_id": config["bos_token_id"], "eos_token_id": stop_ids,
             "pad_token_id": config["pad_token_id"], "do_sample": False},
        )
        write_tokenizer_files(tokenizer, staging, chat_template)
        (staging / "README.md").write_text(card if card is not None else model_card("hf", backbone), encoding="utf-8")
    return out


def save_sharded(tensors: dict, folder: Path, max_shard_bytes: int) -> list[str]:
    """Writes model.safetensors, or model-0000K-of-0000N.safetensors shards and the
    model.safetensors.index.json that transformers and keras-hub follow when the tensors
    exceed `max_shard_bytes`. Returns the file names written."""
    from safetensors.numpy import save_file

    if max_shard_bytes < 1:
        raise KerasftError(f"export.max_shard_mb must be positive, got {max_shard_bytes} bytes")
    total = sum(array.nbytes for array in tensors.values())
    if total <= max_shard_bytes:
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
        return ["model.safetensors"]
    shards, current, size = [], {}, 0
    for name, array in tensors.items():  # greedy, in order: layers stay together
        if current and size + array.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = array
        size += array.nbytes
    shards.append(current)
    names, weight_map = [], {}
    for index, shard in enumerate(shards, start=1):
        file_name = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(folder / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name))
        names.append(file_name)
    _write_json(folder / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map})
    return names


def hf_family(backbone) -> str:
    """The backbone's family ("gemma", "gemma2", "gemma3"), once checked that transformers'
    class for that family computes the same function. Raises KerasftError otherwise."""
    family = model_family(backbone)
    if family not in HF_ARCHITECTURES:
        raise KerasftError(f"Hugging Face export supports Gemma 1, 2 and 3, not {type(backbone).__name__}")
    differing = [
        f"{key}={getattr(backbone, key, None)!r}"
        for key, wanted in _FIXED_SETTINGS[family].items()
        if getattr(backbone, key, None) != wanted
    ]
    if differing:
        raise KerasftError(
            f"this {family} backbone cannot be written as {HF_ARCHITECTURES[family][0]} exactly: "
            + ", ".join(differing)
        )
    unsupported = sorted(
        {
            f"{layer.name} ({layer.quantization_mode})"
            for layer in backbone._flatten_layers()
            if getattr(layer, "quantization_mode", None) not in (None, "int8", "int4")
        }
    )
    if unsupported:
        raise KerasftError(
            f"the backbone is quantized in a mode kerasft cannot dequantize: {', '.join(unsupported[:3])}; "
            "only int8 and int4 (keras quantize) are exported, as float weights"
        )
    return family


def decoder_block(backbone, index: int):
    """Decoder block `index` of a keras-hub Gemma or Llama backbone."""
    return backbone.get_layer(f"{family_of(backbone).block_prefix}_{index}")


def projections(backbone) -> tuple:
    """The PROJECTIONS table of the backbone's family (Llama's attribute paths and layouts differ)."""
    return LLAMA_PROJECTIONS if model_family(backbone) in LLAMA_FAMILIES else PROJECTIONS


def projection(block, attribute: str):
    """The EinsumDense at a PROJECTIONS attribute path ("attention.query_dense") of a decoder block."""
    layer = block
    for name in attribute.split("."):
        layer = getattr(layer, name)
    return layer


def hf_kernel(kernel, layout: str):
    """The transformers (out, in) weight of a keras kernel of the given PROJECTIONS layout."""
    if layout == PER_HEAD:  # (heads, in, head_dim) -> (heads * head_dim, in)
        return kernel.transpose(0, 2, 1).reshape(-1, kernel.shape[1])
    if layout == IN_PER_HEAD:  # (in, heads, head_dim) -> (heads * head_dim, in)
        return kernel.reshape(kernel.shape[0], -1).T
    return kernel.reshape(-1, kernel.shape[-1]).T  # (..., out) -> (out, prod(...))


def hf_state_dict(backbone) -> dict:
    """transformers tensors (numpy, float32, LoRA merged, int8 dequantized) of a keras-hub
    Gemma 1, 2 or 3 backbone."""
    family = hf_family(backbone)
    state = {"model.embed_tokens.weight": float_embeddings(backbone.token_embedding)}
    for i in range(backbone.num_layers):
        block = decoder_block(backbone, i)
        prefix = f"model.layers.{i}."
        for _, attribute, module, layout in projections(backbone):
            state[prefix + module + ".weight"] = hf_kernel(float_kernel(projection(block, attribute)), layout)
        for module, norm in _block_norms(family, block):
            state[prefix + module + ".weight"] = _numpy(norm.scale)
    state["model.norm.weight"] = _numpy(backbone.get_layer(FAMILIES[family].final_norm).scale)
    if not ties_embeddings(backbone):  # keras-hub keeps the untied head as (hidden, vocabulary)
        state["lm_head.weight"] = _numpy(backbone.token_embedding.reverse_embeddings).T
    return {name: np.ascontiguousarray(array) for name, array in state.items()}


def float_embeddings(layer):
    """A (Reversible)Embedding's table as float32 numpy; int8 rows are divided by their scale."""
    if getattr(layer, "quantization_mode", None) != "int8":
        return _numpy(layer.embeddings)
    table = np.asarray(layer._embeddings, dtype=np.float32)
    table = table / np.asarray(layer.embeddings_scale, dtype=np.float32)[:, None]
    if getattr(layer, "lora_enabled", False):
        lora_a = np.asarray(layer.lora_embeddings_a, dtype=np.float32)
        lora_b = np.asarray(layer.lora_embeddings_b, dtype=np.float32)
        table = table + (layer.lora_alpha / layer.lora_rank) * np.matmul(lora_a, lora_b)
    return table


def _block_norms(family: str, block) -> list:
    """(transformers module, keras RMSNormalization) pairs of a decoder block.

    keras-hub and transformers both compute x * (1 + w) in Gemma's RMSNorm and x * w in Llama's,
    so scales copy as is.
    """
    if family in LLAMA_FAMILIES:
        return [(module, getattr(block, attribute)) for module, attribute in LLAMA_NORMS]
    if family == "gemma":  # no post norms; transformers names the pre-FFW norm post_attention_layernorm
        return [("input_layernorm", block.pre_attention_norm), ("post_attention_layernorm", block.pre_ffw_norm)]
    norms = [
        ("input_layernorm", block.pre_attention_norm),
        ("post_attention_layernorm", block.post_attention_norm),
        ("pre_feedforward_layernorm", block.pre_ffw_norm),
        ("post_feedforward_layernorm", block.post_ffw_norm),
    ]
    if family == "gemma3":
        norms += [("self_attn.q_norm", block.attention.query_norm), ("self_attn.k_norm", block.attention.key_norm)]
    return norms


def hf_config(backbone, dtype: str = "float32", tokenizer=None) -> dict:
    """config.json for the backbone's transformers class (GemmaForCausalLM, Gemma2ForCausalLM,
    Gemma3ForCausalLM or LlamaForCausalLM), the inverse of keras-hub's convert_backbone_config.

    tokenizer: for Llama, whose special-token ids vary by release (Gemma's are fixed).
    """
    family = hf_family(backbone)
    architecture, model_type = HF_ARCHITECTURES[family]
    if family in LLAMA_FAMILIES:
        if tokenizer is None:
            raise KerasftError("a Llama config needs the tokenizer (its special-token ids)")

        tokens = chat_tokens(tokenizer)
        return llama_config(backbone, dtype, tokens.bos, tokens.eos)
    config = {
        "architectures": [architecture],
        "model_type": model_type,
        "vocab_size": backbone.vocabulary_size,
        "hidden_size": backbone.hidden_dim,
        # keras-hub's Gemma 1/2 intermediate_dim counts both gate and up projections.
        "intermediate_size": backbone.intermediate_dim if family == "gemma3" else backbone.intermediate_dim // 2,
        "num_hidden_layers": backbone.num_layers,
        "num_attention_heads": backbone.num_query_heads,
        "num_key_value_heads": backbone.num_key_value_heads,
        "head_dim": backbone.head_dim,
        "rms_norm_eps": backbone.layer_norm_epsilon,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "tie_word_embeddings": True,
        "pad_token_id": SPECIAL_TOKEN_IDS["<pad>"],
        "eos_token_id": SPECIAL_TOKEN_IDS["<eos>"],
        "bos_token_id": SPECIAL_TOKEN_IDS["<bos>"],
        "torch_dtype": dtype,
        "dtype": dtype,
    }
    if family == "gemma":
        # keras-hub's Gemma 1 and 2 attention hard-code rope base 1e4 and scale queries by head_dim.
        config.update(hidden_act="gelu_pytorch_tanh", max_position_embeddings=8192, **_rope_keys(10_000.0))
    else:
        # keras-hub's importers set query_head_dim_normalize = (query_pre_attn_scalar == head_dim).
        if backbone.query_head_dim_normalize:
            query_scalar = backbone.head_dim
        else:
            query_scalar = backbone.hidden_dim // backbone.num_query_heads
        config.update(
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=query_scalar,
            sliding_window=backbone.sliding_window_size,
            layer_types=[
                "sliding_attention" if decoder_block(backbone, i).use_sliding_window_attention else "full_attention"
                for i in range(backbone.num_layers)
            ],
            attn_logit_softcapping=backbone.attention_logit_soft_cap,
            final_logit_softcapping=backbone.final_logit_soft_cap,
            use_bidirectional_attention=False,
        )
    if family == "gemma2":
        config.update(max_position_embeddings=8192, **_rope_keys(10_000.0))
    if family == "gemma3":
        config.update(max_position_embeddings=32768, **_gemma3_rope_keys(backbone))
    return config


def llama_config(backbone, dtype: str, bos_id: int, eos_id: int) -> dict:
    """LlamaForCausalLM's config.json; rope scaling as keras-hub's convert_llama3 reads it back."""
    base = float(backbone.rope_max_wavelength)
    rope = {"rope_type": "default", "rope_theta": base}
    if backbone.rope_frequency_adjustment_factor:
        rope = {"rope_type": "llama3", "rope_theta": base, "factor": float(backbone.rope_frequency_adjustment_factor),
                "low_freq_factor": float(backbone.rope_low_freq_factor),
                "high_freq_factor": float(backbone.rope_high_freq_factor),
                "original_max_position_embeddings": int(backbone.rope_pretraining_sequence_length)}
    elif float(backbone.rope_position_scaling_factor or 1.0) != 1.0:
        rope = {"rope_type": "linear", "rope_theta": base, "factor": float(backbone.rope_position_scaling_factor)}
    scaling = {k: v for k, v in rope.items() if k != "rope_theta"} if rope["rope_type"] != "default" else None
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": backbone.vocabulary_size,
        "hidden_size": backbone.hidden_dim,
        "intermediate_size": backbone.intermediate_dim,
        "num_hidden_layers": backbone.num_layers,
        "num_attention_heads": backbone.num_query_heads,
        "num_key_value_heads": backbone.num_key_value_heads,
        "head_dim": backbone.hidden_dim // backbone.num_query_heads,
        "hidden_act": "silu",
        "rms_norm_eps": float(backbone.layer_norm_epsilon),
        "max_position_embeddings": FAMILIES[model_family(backbone)].context_length,
        "rope_theta": base,
        "rope_scaling": scaling,
        "rope_parameters": rope,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "tie_word_embeddings": ties_embeddings(backbone),
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "torch_dtype": dtype,
        "dtype": dtype,
    }


def _stop_ids(tokenizer) -> list[int]:
    return list(chat_tokens(tokenizer).stop_ids)


def _rope_keys(base: float) -> dict:
    return {"rope_theta": base, "rope_parameters": _rope(base, 1.0)}


def _gemma3_rope_keys(backbone) -> dict:
    local_base, global_base = 10_000.0, 1_000_000.0
    for i in range(backbone.num_layers):
        block = decoder_block(backbone, i)
        if block.use_sliding_window_attention:
            local_base = float(block.rope_wavelength)
        else:
            global_base = float(block.rope_wavelength)
    local_factor = float(backbone.local_rope_scaling_factor or 1.0)
    global_factor = float(backbone.global_rope_scaling_factor or 1.0)
    return {
        "rope_theta": global_base,
        "rope_local_base_freq": local_base,
        "rope_scaling": None if global_factor == 1.0 else {"rope_type": "linear", "factor": global_factor},
        "rope_parameters": {
            "sliding_attention": _rope(local_base, local_factor),
            "full_attention": _rope(global_base, global_factor),
        },
    }


def _rope(base: float, factor: float) -> dict:
    if factor == 1.0:
        return {"rope_type": "default", "rope_theta": base}
    return {"rope_type": "linear", "rope_theta": base, "factor": factor}


def write_tokenizer_files(tokenizer, out: Path, chat_template: str = "auto") -> None:
    """tokenizer.model (the SentencePiece proto) or tokenizer.json (byte-level BPE),
    tokenizer_config.json with the chat template the model was trained with (data.template),
    and special_tokens_map.json, as transformers' tokenizer class for the family expects them."""
    tokens = chat_tokens(tokenizer)
    if tokens.template != "gemma":
        _write_llama_tokenizer(tokens, out, chat_template)
        return
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
            "chat_template": hf_chat_template(chat_template, tokens),
            # Word pieces added by `kerasft vocab add` (user-defined): matched as SentencePiece does.
            **hf_word_pieces(tokenizer.proto),
        },
    )


def _write_llama_tokenizer(tokens, out: Path, chat_template: str) -> None:
    """Llama 2 / TinyLlama: tokenizer.model for LlamaTokenizer; Llama 3: tokenizer.json (the same
    `tokenizers` BPE kerasft trains with, adding <|begin_of_text|>) for PreTrainedTokenizerFast."""
    special = {"bos_token": tokens.bos_text, "eos_token": tokens.eos_text}
    if hasattr(tokens.encoder, "sp"):
        (out / "tokenizer.model").write_bytes(tokens.encoder.proto)
        special["unk_token"] = tokens.encoder.piece(tokens.encoder.sp.unk_id())
        # legacy: a space after special tokens, as kerasft's training and llama.cpp tokenize.
        settings = {"tokenizer_class": "LlamaTokenizer", "legacy": True, "add_prefix_space": None}
    else:
        from tokenizers import processors

        tokenizer = tokens.encoder.tokenizer
        bos = tokens.bos_text
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, tokens.bos)])
        state = json.loads(tokenizer.to_str())
        tokenizer.post_processor = None  # training encodes without it
        (out / "tokenizer.json").write_text(json.dumps(state, ensure_ascii=False), encoding="utf-8")
        settings = {"tokenizer_class": "PreTrainedTokenizerFast"}
    _write_json(out / "special_tokens_map.json", special)
    _write_json(
        out / "tokenizer_config.json",
        {**settings, **special, "add_bos_token": True, "add_eos_token": False, "clean_up_tokenization_spaces": False,
         "model_max_length": 131072, "chat_template": hf_chat_template(chat_template, tokens)},
    )


def keras_logits(backbone, token_ids, padding_mask=None):
    """Full-vocabulary logits of a keras-hub Gemma backbone (soft cap included), as numpy."""
    token_ids = np.asarray(token_ids, dtype=np.int32)
    if padding_mask is None:
        padding_mask = np.ones_like(token_ids, dtype=bool)
    hidden = backbone({"token_ids": token_ids, "padding_mask": padding_mask})
    return np.asarray(backbone.token_embedding(hidden, reverse=True), dtype=np.float32)


def _eot_id(tokenizer) -> int:
    return int(tokenizer.token_to_id("<end_of_turn>"))


def _numpy(variable_or_tensor):
    return np.asarray(variable_or_tensor, dtype=np.float32)


def _cast(array, dtype: str):
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
