"""Export to GGUF (llama.cpp's `gemma`, `gemma2`, `gemma3` and `llama` architectures) with the
`gguf` package, and the Ollama Modelfile beside it.

For Gemma, the exact inverse of kerasft.models.gguf (the importer): tensors come from the merged
transformers state dict (LoRA folded in, int8 dequantized) under llama.cpp's names, in (out, in)
layout; RMSNorm weights are stored as 1 + w, as llama.cpp's Gemma graphs expect; the
SentencePiece vocabulary goes in as pieces, scores and types, with user-defined pieces' U+2581
written as spaces, as llama.cpp's converter does. For Llama (Llama 2, TinyLlama, Llama 3) the
layout is llama.cpp's convert_hf_to_gguf.py: query and key rows permuted for its rotary layout,
norms as they are, the untied head as `output.weight`, Llama 3's rope scaling as the
`rope_freqs.weight` factors, a byte-level BPE vocabulary as tokens, types and merges ("gpt2",
pre-tokenizer "llama-bpe").

The Modelfile (FROM, TEMPLATE in Go-template syntax rendering the training chat template,
PARAMETER stop for each stop token, default sampling and context, SYSTEM when the run has a
system prompt) lets `ollama create NAME -f Modelfile` serve the file as it was trained.
"""

from __future__ import annotations

import shlex
from pathlib import Path

import numpy as np

from kerasft.config import GGUF_QUANTS
from kerasft.data.template import EOT, chat_tokens, closing_id, hf_chat_template, resolve_template
from kerasft.errors import KerasftError
from kerasft.export import hf
from kerasft.export.card import model_card
from kerasft.export.hf import decoder_block, hf_state_dict
from kerasft.models.families import FAMILIES, LLAMA_FAMILIES, llama3_rope_factors, tokenizer_kind
from kerasft.models.gguf import QUERY_SCALED_BY_HIDDEN
from kerasft.paths import staged_dir


# transformers module under model.layers.N -> llama.cpp tensor under blk.N
BLOCK_TENSORS = {
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

# Llama's two norms (transformers' post_attention_layernorm is llama.cpp's ffn_norm there).
LLAMA_NORM_TENSORS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm"}

# SentencePiece piece types, which llama.cpp's token types number the same way.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED = 1, 2, 3, 4
# Pieces Gemma's Hugging Face tokenizer_config marks special besides SentencePiece's control
# pieces: llama.cpp's converter (convert_hf_to_gguf.py, _create_vocab_sentencepiece) types them
# CONTROL, so llama.cpp never prints them as text and stops on <end_of_turn>.
_HF_SPECIAL_PIECES = ("<start_of_turn>", "<end_of_turn>", "<mask>")

MODELFILE = "Modelfile"
# Context written into the Modelfile, capped by the family's context length. The decoding
# PARAMETERs come from how the run was evaluated (modelfile_decoding).
MODELFILE_PARAMETERS = {"num_ctx": 4096}


def modelfile_decoding(eval_cfg=None) -> tuple[dict, str]:
    """Modelfile PARAMETERs for the decoding a run was evaluated with, and a sentence for the card.

    Greedy evaluation (eval.temperature 0, the default, and what extractive tasks use) becomes
    `temperature 0`, which llama.cpp and Ollama decode greedily; sampled evaluation keeps its
    temperature, top_k, top_p and seed.
    """
    temperature = float(getattr(eval_cfg, "temperature", 0.0) or 0.0)
    if temperature <= 0:
        return {"temperature": 0}, ("Decoding: greedy (`PARAMETER temperature 0` in the Modelfile), as this run was "
                                    "evaluated (eval.temperature 0).")
    params = {"temperature": temperature}
    if getattr(eval_cfg, "top_k", 0):
        params["top_k"] = int(eval_cfg.top_k)
    if getattr(eval_cfg, "top_p", 1.0) < 1.0:
        params["top_p"] = float(eval_cfg.top_p)
    params["seed"] = int(getattr(eval_cfg, "seed", 0))
    described = ", ".join(f"{key} {value}" for key, value in params.items())
    return params, f"Decoding: sampled ({described} in the Modelfile), as this run was evaluated."


def export_gguf(backbone, tokenizer, out_dir: str | Path, *, quant: str = "f16", card: str | None = None,
                overwrite: bool = False, chat_template: str = "auto", system: str = "",
                parameters: dict | None = None, decoding=None) -> Path:
    """Writes `out_dir/model-<quant>.gguf` (weights, hyperparameters, tokenizer, chat template),
    an Ollama `Modelfile` and a model card README.md.

    Args:
        quant: "f32", "f16", "q8_0", "q4_0" or "q5_0" for the matrices (the block types fall back
            to f16 for a matrix whose rows are not a multiple of 32 values); norms stay float32, as
            in llama.cpp. gguf-py (0.19) writes no k-quant (its quantize raises
            NotImplementedError for Q4_K and Q6_K), so Q4_K_M is not offered.
        chat_template: data.template the model was trained with ("auto": the model's own).
        system: the run's system prompt, written as the Modelfile's SYSTEM.
        parameters: Modelfile PARAMETER values overriding MODELFILE_PARAMETERS and the decoding.
        decoding: the run's eval config (temperature, top_k, top_p, seed): the Modelfile decodes
            as the run was evaluated, and the card says so (None: greedy).

    The folder appears atomically (built beside the target, then renamed).
    """
    import gguf

    if quant not in GGUF_QUANTS:
        raise KerasftError(f"GGUF quantization must be one of {', '.join(GGUF_QUANTS)}, got {quant!r}")
    family = hf.hf_family(backbone)
    _check_query_scaling(backbone, family)
    tokens = chat_tokens(tokenizer)
    template = resolve_template(chat_template, tokens)
    out = Path(out_dir)
    file_name = f"model-{quant}.gguf"
    vocabulary = gguf_vocabulary(tokenizer, backbone.vocabulary_size)
    if len(vocabulary["tokens"]) != backbone.vocabulary_size:
        raise KerasftError(
            f"the tokenizer has {len(vocabulary['tokens'])} pieces but the model {backbone.vocabulary_size} embeddings"
        )
    with staged_dir(out, overwrite) as staging:
        writer = gguf.GGUFWriter(str(staging / file_name), FAMILIES[family].gguf_architecture)
        _write_metadata(writer, backbone, family, quant, vocabulary, template)
        for name, array in gguf_tensors(backbone, family).items():
            _add_tensor(writer, name, array, quant)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        decoding_parameters, decoding_sentence = modelfile_decoding(decoding)
        settings = {**decoding_parameters, **MODELFILE_PARAMETERS, **(parameters or {})}
        settings["num_ctx"] = min(int(settings["num_ctx"]), FAMILIES[family].context_length)
        (staging / MODELFILE).write_text(modelfile(file_name, tokens, template, system, settings), encoding="utf-8")
        if card is None:
            card = model_card("gguf", backbone, extra={"file": file_name, "quantization": quant})
        (staging / "README.md").write_text(card.rstrip("\n") + f"\n\n{decoding_sentence}\n", encoding="utf-8")
    return out / file_name


def gguf_tensors(backbone, family: str) -> dict:
    """float32 numpy tensors under llama.cpp names (Gemma norms as 1 + w)."""
    if family in LLAMA_FAMILIES:
        return _llama_tensors(backbone, hf_state_dict(backbone))
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
            gguf_name = f"blk.{layer}.{BLOCK_TENSORS[module]}.weight"
        # keras-hub and transformers scale by (1 + w); llama.cpp multiplies by the stored weight.
        tensors[gguf_name] = array + 1.0 if gguf_name.endswith("norm.weight") else array
    return tensors


def _llama_tensors(backbone, state: dict) -> dict:
    """llama.cpp's names for a LlamaForCausalLM state dict, as its convert_hf_to_gguf.py writes them."""
    heads, kv_heads = backbone.num_query_heads, backbone.num_key_value_heads
    tensors = {"token_embd.weight": state.pop("model.embed_tokens.weight")}
    if "lm_head.weight" in state:
        tensors["output.weight"] = state.pop("lm_head.weight")
    tensors["output_norm.weight"] = state.pop("model.norm.weight")
    factors = _llama3_rope_factors(backbone)
    if factors is not None:
        tensors["rope_freqs.weight"] = factors
    for name, array in state.items():
        _, _, layer, module = name.split(".", 3)
        module = module.removesuffix(".weight")
        if module == "self_attn.q_proj":
            array = _permute_rotary(array, heads)
        elif module == "self_attn.k_proj":
            array = _permute_rotary(array, kv_heads)
        tensors[f"blk.{layer}.{(BLOCK_TENSORS | LLAMA_NORM_TENSORS)[module]}.weight"] = np.ascontiguousarray(array)
    return tensors


def unpermute_rotary(weight, heads: int):
    """The inverse of _permute_rotary."""
    return weight.reshape(heads, weight.shape[0] // heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _permute_rotary(weight, heads: int):
    """llama.cpp rotates adjacent pairs of each head (GPT-J style); transformers rotates halves:
    the rows of each head go from (half, pair) to (pair, half) order."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _llama3_rope_factors(backbone):
    """Llama 3.1/3.2's frequency-dependent rope scaling as the per-frequency divisors llama.cpp
    reads from `rope_freqs.weight`, or None."""
    factor = getattr(backbone, "rope_frequency_adjustment_factor", None)
    if not factor:
        return None
    return llama3_rope_factors(backbone.hidden_dim // backbone.num_query_heads, float(backbone.rope_max_wavelength),
                               float(factor), float(backbone.rope_low_freq_factor),
                               float(backbone.rope_high_freq_factor), float(backbone.rope_pretraining_sequence_length))


def gguf_vocabulary(tokenizer, size: int | None = None) -> dict:
    """Pieces, scores, types and special ids of a keras-hub SentencePiece tokenizer (or tokens,
    types and merges of a byte-level BPE one, filled up to `size` entries), as llama.cpp stores them."""
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    if tokenizer_kind(tokenizer) == "bpe":
        return _bpe_vocabulary(tokenizer, size)

    model = sp_pb2.ModelProto()
    model.ParseFromString(tokenizer.proto)
    tokens, scores, types = [], [], []
    for piece in model.pieces:
        text, kind = piece.piece, int(piece.type)
        if kind == _UNKNOWN or (kind == _USER_DEFINED and (text in _HF_SPECIAL_PIECES or _looks_special(text))):
            kind = _CONTROL
        elif kind == _USER_DEFINED:
            text = text.replace("\u2581", " ")  # llama.cpp's converter pre-normalizes these
        tokens.append(text)
        scores.append(float(piece.score))
        types.append(kind)
    trainer = model.trainer_spec
    end_of_turn = model.pieces[tokenizer.token_to_id("<end_of_turn>")].piece == "<end_of_turn>"
    return {
        "tokens": tokens,
        "scores": scores,
        "types": types,
        "bos": trainer.bos_id,
        "eos": trainer.eos_id,
        "unk": trainer.unk_id,
        "pad": trainer.pad_id,
        "end_of_turn": tokenizer.token_to_id("<end_of_turn>") if end_of_turn else None,
        "add_space_prefix": model.normalizer_spec.add_dummy_prefix,
        "model": "llama",
        "pre": "default",
    }


def _looks_special(piece: str) -> bool:
    """llama.cpp's converter's does_token_look_special: pieces typed CONTROL even when the
    tokenizer does not mark them special."""
    return (piece in ("<pad>", "<mask>", "<2mass>", "[@BOS@]") or (piece.startswith("<|") and piece.endswith("|>"))
            or (piece.startswith("<unused") and piece.endswith(">")))


def _bpe_vocabulary(tokenizer, size: int | None = None) -> dict:
    """A Llama 3 byte-level BPE vocabulary: tokens in id order, control type for <|...|> tokens.

    keras-hub's Llama 3 tokenizer leaves the <|reserved_special_token_N|> entries out (ids
    128002-128005, 128011-128255 in Llama 3.1/3.2), while GGUF stores one token per embedding
    row: the gaps, and the ids up to `size`, get those names back in order.
    """
    by_id = {int(i): token for token, i in tokenizer.vocabulary.items()}
    count = max(size or 0, max(by_id) + 1)
    reserved = (f"<|reserved_special_token_{n}|>" for n in range(count))
    taken = set(by_id.values())
    tokens = [by_id[i] if i in by_id else next(r for r in reserved if r not in taken) for i in range(count)]
    control, normal = 3, 1  # llama.cpp token types
    vocabulary = dict(tokenizer.vocabulary)
    return {
        "tokens": tokens,
        "scores": None,
        "types": [control if t.startswith("<|") and t.endswith("|>") else normal for t in tokens],
        "merges": [m if isinstance(m, str) else " ".join(m) for m in tokenizer.merges],
        "bos": vocabulary[tokenizer.start_token],
        "eos": vocabulary[tokenizer.end_token],
        "unk": None,
        "pad": -1,
        "end_of_turn": vocabulary.get(EOT),
        "add_space_prefix": False,
        "model": "gpt2",
        "pre": "llama-bpe",
    }


def _write_metadata(writer, backbone, family: str, quant: str, vocabulary: dict, chat_template: str = "gemma") -> None:
    import gguf

    file_types = {"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                  "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0, "q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
                  "q5_0": gguf.LlamaFileType.MOSTLY_Q5_0}
    writer.add_type("model")
    writer.add_name(f"kerasft {family} export")
    if family not in LLAMA_FAMILIES:
        writer.add_license("gemma")
    writer.add_file_type(file_types[quant])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(FAMILIES[family].context_length)
    writer.add_embedding_length(backbone.hidden_dim)
    writer.add_block_count(backbone.num_layers)
    # keras-hub's Gemma 1/2 intermediate_dim counts both gate and up projections.
    writer.add_feed_forward_length(backbone.intermediate_dim if family in ("gemma3", *LLAMA_FAMILIES)
                                   else backbone.intermediate_dim // 2)
    writer.add_head_count(backbone.num_query_heads)
    writer.add_head_count_kv(backbone.num_key_value_heads)
    head_dim = backbone.hidden_dim // backbone.num_query_heads if family in LLAMA_FAMILIES else backbone.head_dim
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(float(backbone.layer_norm_epsilon))
    if family in LLAMA_FAMILIES:
        writer.add_vocab_size(backbone.vocabulary_size)
        writer.add_rope_dimension_count(head_dim)
        writer.add_rope_freq_base(float(backbone.rope_max_wavelength))
        linear = float(backbone.rope_position_scaling_factor or 1.0)
        if linear != 1.0 and not backbone.rope_frequency_adjustment_factor:
            writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            writer.add_rope_scaling_factor(linear)
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
    writer.add_tokenizer_model(vocabulary["model"])
    writer.add_tokenizer_pre(vocabulary["pre"])
    writer.add_token_list(vocabulary["tokens"])
    if vocabulary["scores"] is not None:
        writer.add_token_scores(vocabulary["scores"])
    writer.add_token_types(vocabulary["types"])
    if vocabulary.get("merges"):
        writer.add_token_merges(vocabulary["merges"])
    writer.add_bos_token_id(vocabulary["bos"])
    writer.add_eos_token_id(vocabulary["eos"])
    if vocabulary["unk"] is not None:
        writer.add_unk_token_id(vocabulary["unk"])
    if vocabulary["pad"] >= 0:
        writer.add_pad_token_id(vocabulary["pad"])
    if vocabulary["end_of_turn"] is not None:
        writer.add_uint32("tokenizer.ggml.eot_token_id", int(vocabulary["end_of_turn"]))
    writer.add_add_bos_token(True)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(bool(vocabulary["add_space_prefix"]))
    writer.add_chat_template(hf_chat_template(chat_template))


# The chat templates as Ollama Go templates: the same text as kerasft.data.template.render_chat
# without the bos (llama.cpp adds it). A system message (or the Modelfile's SYSTEM) goes where
# training put it.
_GO_SYSTEM = (
    '{{ $system := .System }}'
    '{{ range .Messages }}{{ if eq .Role "system" }}{{ $system = .Content }}{{ end }}{{ end }}'
)
_GO_TEMPLATES = {
    "gemma": _GO_SYSTEM + (
        '{{ $first := true }}'
        '{{ range .Messages }}'
        '{{ if eq .Role "user" }}<start_of_turn>user\n'
        '{{ if and $first $system }}{{ $system }}\n\n{{ end }}{{ .Content }}<end_of_turn>\n<start_of_turn>model\n'
        '{{ $first = false }}'
        '{{ else if eq .Role "assistant" }}{{ .Content }}<end_of_turn>\n'
        '{{ end }}'
        '{{ end }}'
    ),
    "llama3": _GO_SYSTEM + (
        '{{ if $system }}<|start_header_id|>system<|end_header_id|>\n\n{{ $system }}<|eot_id|>{{ end }}'
        '{{ range .Messages }}'
        '{{ if eq .Role "user" }}<|start_header_id|>user<|end_header_id|>\n\n{{ .Content }}<|eot_id|>'
        '<|start_header_id|>assistant<|end_header_id|>\n\n'
        '{{ else if eq .Role "assistant" }}{{ .Content }}<|eot_id|>'
        '{{ end }}'
        '{{ end }}'
    ),
    "zephyr": _GO_SYSTEM + (
        '{{ if $system }}<|system|>\n{{ $system }}{EOS}\n{{ end }}'
        '{{ range .Messages }}'
        '{{ if eq .Role "user" }}<|user|>\n{{ .Content }}{EOS}\n<|assistant|>\n'
        '{{ else if eq .Role "assistant" }}{{ .Content }}{EOS}\n'
        '{{ end }}'
        '{{ end }}'
    ),
    "plain": _GO_SYSTEM + (
        '{{ if $system }}{{ $system }}\n\n{{ end }}'
        '{{ $later := false }}'
        '{{ range .Messages }}'
        '{{ if eq .Role "user" }}{{ if $later }}\n\n{{ end }}### Instruction:\n{{ .Content }}\n\n### Response:\n'
        '{{ $later = true }}'
        '{{ else if eq .Role "assistant" }}{{ .Content }}{EOS}'
        '{{ end }}'
        '{{ end }}'
    ),
}


def go_template(template: str, eos_text: str) -> str:
    """The Ollama (Go text/template) form of a resolved chat template."""
    return _GO_TEMPLATES[template].replace("{EOS}", eos_text)


def modelfile(gguf_name: str, tokens, template: str, system: str, parameters: dict) -> str:
    """An Ollama Modelfile for a GGUF file beside it: FROM, TEMPLATE, a PARAMETER stop for each
    stop token of the template, the sampling/context PARAMETERs, and SYSTEM if there is one."""
    stops = dict.fromkeys(tokens.encoder.piece(i) for i in (closing_id(tokens, template), tokens.eos))
    for text in [system, *stops]:
        if '"""' in text:
            raise KerasftError(f'a Modelfile cannot hold {text[:40]!r}: it contains """')
    lines = [f"FROM ./{gguf_name}", f'TEMPLATE """{go_template(template, tokens.eos_text)}"""']
    lines += [f'PARAMETER stop "{stop}"' for stop in stops]
    lines += [f"PARAMETER {key} {value}" for key, value in parameters.items()]
    if system:
        lines.append(f'SYSTEM """{system}"""')
    return "\n".join(lines) + "\n"


def read_modelfile(path: str | Path) -> dict:
    """Parses a Modelfile written by `modelfile` back into {"FROM", "TEMPLATE", "SYSTEM",
    "PARAMETER": {name: [values]}} (triple-quoted values may span lines)."""
    text = Path(path).read_text(encoding="utf-8")
    parsed: dict = {"PARAMETER": {}}
    position = 0
    while position < len(text):
        end = text.find("\n", position)
        line = text[position: end if end >= 0 else len(text)]
        if not line.strip() or line.startswith("#"):
            position = (end if end >= 0 else len(text)) + 1
            continue
        command, _, rest = line.partition(" ")
        if rest.startswith('"""'):
            close = text.find('"""', position + len(command) + 4)
            if close < 0:
                raise KerasftError(f"{path}: {command}: unterminated \"\"\"")
            value = text[position + len(command) + 4: close]
            position = close + 3
            position = text.find("\n", position) + 1 if text.find("\n", position) >= 0 else len(text)
        else:
            value = rest
            position = (end if end >= 0 else len(text)) + 1
        command = command.upper()
        if command == "PARAMETER":
            name, _, raw = value.partition(" ")
            parsed["PARAMETER"].setdefault(name, []).append(shlex.split(raw)[0] if raw.startswith('"') else raw)
        else:
            parsed[command] = value
    return parsed


def _add_tensor(writer, name: str, array, quant: str) -> None:
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import quantize

    if array.ndim == 1 or quant == "f32":
        writer.add_tensor(name, np.ascontiguousarray(array, dtype=np.float32))
        return
    qtype = GGMLQuantizationType[quant.upper()]
    if quant == "f16" or array.shape[-1] % GGML_QUANT_SIZES[qtype][0]:
        writer.add_tensor(name, array.astype(np.float16))
        return
    writer.add_tensor(name, quantize(np.ascontiguousarray(array, dtype=np.float32), qtype), raw_dtype=qtype)


def _check_query_scaling(backbone, family: str) -> None:
    """llama.cpp scales queries by 1/sqrt(head_dim), except in the 27B models (recognised by
    their layer count), where it uses hidden / heads; keras-hub always uses head_dim."""
    per_head = backbone.hidden_dim // backbone.num_query_heads
    if (family, backbone.num_layers) in QUERY_SCALED_BY_HIDDEN and per_head != backbone.head_dim:
        raise KerasftError(
            f"llama.cpp would scale this {backbone.num_layers}-layer {family} model's queries by "
            f"1/sqrt({per_head}) instead of 1/sqrt(head size {backbone.head_dim}); it cannot be exported to GGUF exactly"
        )
