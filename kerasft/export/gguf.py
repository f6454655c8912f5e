"""Export to GGUF (llama.cpp's `gemma`, `gemma2`, `gemma3` architectures) with the `gguf` package.

The exact inverse of kerasft.models.gguf (the importer): tensors come from the merged
transformers state dict (LoRA folded in, int8 dequantized) under llama.cpp's names, in (out, in)
layout; RMSNorm weights are stored as 1 + w, as llama.cpp's Gemma graphs expect; the
SentencePiece vocabulary goes in as pieces, scores and types, with user-defined pieces' U+2581
written as spaces, as llama.cpp's converter does.
"""

from __future__ import annotations

from pathlib import Path

from kerasft.errors import KerasftError

QUANTS = ("f32", "f16", "q8_0")

# transformers module under model.layers.N -> llama.cpp tensor under blk.N
_BLOCK_TENSORS = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "pre_feedforward_layernorm": "ffn_norm",
    "post_attention_layernorm": "post_attention_norm",
    "post_feedforward_layernorm": "post_ffw_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}

# SentencePiece piece types, which llama.cpp's token types number the same way.
_USER_DEFINED = 4

# Context lengths of the released models of each family (transformers' config defaults too).
CONTEXT_LENGTH = {"gemma": 8192, "gemma2": 8192, "gemma3": 32768}


def export_gguf(backbone, tokenizer, out_dir: str | Path, *, quant: str = "f16", card: str | None = None,
                overwrite: bool = False, chat_template: str = "gemma") -> Path:
    """Writes `out_dir/model-<quant>.gguf` (weights, hyperparameters, tokenizer, chat template)
    and a model card README.md.

    Args:
        quant: "f32", "f16" or "q8_0" for the matrices (q8_0 falls back to f16 for a matrix
            whose rows are not a multiple of 32 values); norms stay float32, as in llama.cpp.

    The folder appears atomically (built beside the target, then renamed).
    """
    import gguf

    from kerasft.export import hf
    from kerasft.export.card import model_card

    if quant not in QUANTS:
        raise KerasftError(f"GGUF quantization must be one of {', '.join(QUANTS)}, got {quant!r}")
    family = hf.hf_family(backbone)
    _check_query_scaling(backbone, family)
    out = Path(out_dir)
    file_name = f"model-{quant}.gguf"
    vocabulary = gguf_vocabulary(tokenizer)
    if len(vocabulary["tokens"]) != backbone.vocabulary_size:
        raise KerasftError(
            f"the tokenizer has {len(vocabulary['tokens'])} pieces but the model {backbone.vocabulary_size} embeddings"
        )
    with hf.staged_dir(out, overwrite) as staging:
        writer = gguf.GGUFWriter(str(staging / file_name), family)
        _write_metadata(writer, backbone, family, quant, vocabulary, chat_template)
        for name, array in gguf_tensors(backbone, family).items():
            _add_tensor(writer, name, array, quant)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        if card is None:
            card = model_card("gguf", backbone, extra={"file": file_name, "quantization": quant})
        (staging / "README.md").write_text(card, encoding="utf-8")
    return out / file_name


def gguf_tensors(backbone, family: str) -> dict:
    """float32 numpy tensors under llama.cpp names, norms as 1 + w."""
    from kerasft.export.hf import hf_state_dict

    tensors = {}
    for name, array in hf_state_dict(backbone).items():
        if name == "model.embed_tokens.weight":
            gguf_name = "token_embd.weight"
        elif name == "model.norm.weight":
            gguf_name = "output_norm.weight"
        else:
            _, _, layer, module = name.split(".", 3)
            module = module.removesuffix(".weight")
            if family == "gemma" and module == "post_attention_layernorm":
                module = "pre_feedforward_layernorm"  # Gemma 1's HF name for the pre-FFW norm
            gguf_name = f"blk.{layer}.{_BLOCK_TENSORS[module]}.weight"
        # keras-hub and transformers scale by (1 + w); llama.cpp multiplies by the stored weight.
        tensors[gguf_name] = array + 1.0 if gguf_name.endswith("norm.weight") else array
    return tensors


def gguf_vocabulary(tokenizer) -> dict:
    """Pieces, scores, types and special ids of a keras-hub SentencePiece tokenizer, as llama.cpp
    stores them."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    model = sp_pb2.ModelProto()
    model.ParseFromString(tokenizer.proto)
    tokens, scores, types = [], [], []
    for piece in model.pieces:
        text = piece.piece
        if piece.type == _USER_DEFINED:
            text = text.replace("\u2581", " ")  # llama.cpp's converter pre-normalizes these
        tokens.append(text)
        scores.append(float(piece.score))
        types.append(int(piece.type))
    trainer = model.trainer_spec
    return {
        "tokens": tokens,
        "scores": scores,
        "types": types,
        "bos": trainer.bos_id,
        "eos": trainer.eos_id,
        "unk": trainer.unk_id,
        "pad": trainer.pad_id,
        "end_of_turn": tokenizer.token_to_id("<end_of_turn>"),
        "add_space_prefix": model.normalizer_spec.add_dummy_prefix,
    }


def _write_metadata(writer, backbone, family: str, quant: str, vocabulary: dict, chat_template: str = "gemma") -> None:
    import gguf

    from kerasft.data.template import hf_chat_template
    from kerasft.export.hf import decoder_block

    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}
    writer.add_type("model")
    writer.add_name(f"kerasft {family} export")
    writer.add_license("gemma")
    writer.add_file_type(file_types[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(CONTEXT_LENGTH[family])
    writer.add_embedding_length(backbone.hidden_dim)
    writer.add_block_count(backbone.num_layers)
    # keras-hub's Gemma 1/2 intermediate_dim counts both gate and up projections.
    writer.add_feed_forward_length(backbone.intermediate_dim if family == "gemma3" else backbone.intermediate_dim // 2)
    writer.add_head_count(backbone.num_query_heads)
    writer.add_head_count_kv(backbone.num_key_value_heads)
    writer.add_key_length(backbone.head_dim)
    writer.add_value_length(backbone.head_dim)
    writer.add_layer_norm_rms_eps(float(backbone.layer_norm_epsilon))
    if family in ("gemma", "gemma2"):
        writer.add_rope_freq_base(10_000.0)  # keras-hub's Gemma 1/2 attention fixes it
    if family == "gemma2":
        writer.add_sliding_window(int(backbone.sliding_window_size))
        # 0 means "no cap" to the importer; llama.cpp's Gemma 2 always has both caps.
        writer.add_attn_logit_softcapping(float(backbone.attention_logit_soft_cap or 0.0))
        writer.add_final_logit_softcapping(float(backbone.final_logit_soft_cap or 0.0))
    if family == "gemma3":
        bases = {decoder_block(backbone, i).use_sliding_window_attention: float(decoder_block(backbone, i).rope_wavelength)
                 for i in range(backbone.num_layers)}
        writer.add_rope_freq_base(bases.get(False, 1_000_000.0))
        writer.add_rope_freq_base_swa(bases.get(True, 10_000.0))
        writer.add_sliding_window(int(backbone.sliding_window_size))
        factor = float(backbone.global_rope_scaling_factor or 1.0)
        if factor != 1.0:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(factor)
        if backbone.attention_logit_soft_cap:
            writer.add_attn_logit_softcapping(float(backbone.attention_logit_soft_cap))
        if backbone.final_logit_soft_cap:
            writer.add_final_logit_softcapping(float(backbone.final_logit_soft_cap))
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(vocabulary["tokens"])
    writer.add_token_scores(vocabulary["scores"])
    writer.add_token_types(vocabulary["types"])
    writer.add_bos_token_id(vocabulary["bos"])
    writer.add_eos_token_id(vocabulary["eos"])
    writer.add_unk_token_id(vocabulary["unk"])
    if vocabulary["pad"] >= 0:
        writer.add_pad_token_id(vocabulary["pad"])
    if vocabulary["end_of_turn"] is not None:
        writer.add_uint32("tokenizer.ggml.eot_token_id", int(vocabulary["end_of_turn"]))
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(bool(vocabulary["add_space_prefix"]))
    writer.add_chat_template(hf_chat_template(chat_template))


def _add_tensor(writer, name: str, array, quant: str) -> None:
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quantize

    if array.ndim == 1 or quant == "f32":
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
        return
    block_size = GGML_QUANT_SIZES[GGMLQuantizationType.Q8_0][0]
    if quant == "f16" or array.shape[-1] % block_size:
        writer.add_tensor(name, array.astype(np.float16))
        return
    q8 = GGMLQuantizationType.Q8_0
    writer.add_tensor(name, quantize(np.ascontiguousarray(array, dtype=np.float32), q8), raw_dtype=q8)


def _check_query_scaling(backbone, family: str) -> None:
    """llama.cpp scales queries by 1/sqrt(head_dim), except in the 27B models (recognised by
    their layer count), where it uses hidden / heads; keras-hub always uses head_dim."""
    from kerasft.models.gguf import _QUERY_SCALED_BY_HIDDEN

    per_head = backbone.hidden_dim // backbone.num_query_heads
    if (family, backbone.num_layers) in _QUERY_SCALED_BY_HIDDEN and per_head != backbone.head_dim:
        raise KerasftError(
            f"llama.cpp would scale this {backbone.num_layers}-layer {family} model's queries by "
            f"1/sqrt({per_head}) instead of 1/sqrt(head size {backbone.head_dim}); it cannot be exported to GGUF exactly"
        )
