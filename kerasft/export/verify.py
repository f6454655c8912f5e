"""Checks of an export in its consumer, with one result shape.

Each check runs the exported file in a reader that is not kerasft's exporter (transformers in
float64 for Hugging Face folders and Llama GGUF files, kerasft's GGUF importer for Gemma GGUF
files) and compares its logits with the Keras model's on the same tokens. Every check returns
compare_logits' report: {"max_abs_diff", "tolerance", "logit_scale", "ok", "reference"}.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize

from kerasft.config import ModelConfig
from kerasft.errors import KerasftError
from kerasft.export import gguf as gguf_export
from kerasft.export.hf import hf_family, keras_logits, llama_config
from kerasft.models.families import LLAMA_FAMILIES, model_family
from kerasft.models.gguf import import_gguf
from kerasft.models.presets import load_model


def compare_logits(ours, theirs, atol: float, rtol: float, reference: str) -> dict:
    """The one report of every export check: max |ours - theirs| against atol + rtol * max |theirs|.

    float32 error grows with the logits' scale, while a mapping mistake (a missing soft cap, a
    wrong window) moves logits by 1e-2 or more.
    """
    diff = float(np.max(np.abs(np.asarray(theirs) - np.asarray(ours))))
    scale = float(np.max(np.abs(theirs)))
    tolerance = atol + rtol * scale
    return {"max_abs_diff": diff, "tolerance": tolerance, "logit_scale": scale, "ok": diff <= tolerance,
            "reference": reference}


def unchecked(reason: str) -> dict:
    """The report of an export written without a logits check, saying why."""
    return {"ok": None, "reference": None, "not_checked": reason}


def verify_hf_export(out_dir: str | Path, backbone, token_ids, *, atol: float = 1e-4, rtol: float = 1e-5) -> dict:
    """Loads the export with transformers and compares its logits with the Keras model's.

    transformers runs in float64, the exact reference for a float32 Keras model. The check is
    max |keras - reference| <= atol + rtol * max |reference|: float32 error grows with the
    logits' scale (on the fine-tuned 270M, logits reach 105 and transformers' own float32 run
    is 1.7e-4 off its float64 run), while a mapping mistake (a missing soft cap, a wrong window)
    moves logits by 1e-2 or more.

    Args:
        token_ids: a (batch, length) integer array of unpadded sequences; make them longer than
            the sliding window so local attention is checked too.

    Returns:
        compare_logits' report. Raises KerasftError when transformers is missing.
    """
    torch, transformers = _reference_runtime()
    # Eager attention: the implementation that applies Gemma 2's attention soft cap.
    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(out_dir), dtype=torch.float64, attn_implementation="eager"
    )
    model.eval()
    ids = np.asarray(token_ids, dtype=np.int64)
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids)).logits.numpy()
    return compare_logits(keras_logits(backbone, ids.astype(np.int32)), theirs, atol, rtol, "transformers float64")


def verify_llama_gguf(gguf_path: str | Path, backbone, token_ids, *, atol: float = 1e-4, rtol: float = 1e-5) -> dict:
    """Reads a Llama GGUF export back with the `gguf` package (metadata, names, shapes, values:
    dequantized, rotary rows un-permuted, rope factors) and runs the weights in transformers'
    LlamaForCausalLM (float64) under the export's config, comparing logits with the Keras model.

    transformers' own GGUF loader would do, but it drops Llama 3's rope_freqs; this check reads
    them and requires them equal to the backbone's scaling. Returns the report of
    verify_hf_export; raises KerasftError on a structural mismatch.
    """
    torch, transformers = _reference_runtime()
    expected = gguf_export.gguf_tensors(backbone, hf_family(backbone))
    reader = GGUFReader(str(gguf_path))
    fields = {"llama.block_count": backbone.num_layers, "llama.embedding_length": backbone.hidden_dim,
              "llama.attention.head_count": backbone.num_query_heads,
              "llama.attention.head_count_kv": backbone.num_key_value_heads,
              "llama.feed_forward_length": backbone.intermediate_dim}
    for key, value in fields.items():
        field = reader.get_field(key)
        if field is None or int(field.contents()) != int(value):
            raise KerasftError(f"{gguf_path}: {key} is {None if field is None else field.contents()}, expected {value}")
    found = {t.name: np.asarray(dequantize(t.data, t.tensor_type), dtype=np.float32).reshape(expected[t.name].shape)
             for t in reader.tensors if t.name in expected}
    names = {t.name for t in reader.tensors}
    if names != set(expected):
        raise KerasftError(f"{gguf_path}: tensors differ from the model's: {sorted(names ^ set(expected))[:3]}")
    rope = found.pop("rope_freqs.weight", None)
    if rope is not None and not np.allclose(rope, expected["rope_freqs.weight"], rtol=1e-6):
        raise KerasftError(f"{gguf_path}: rope_freqs differ from the backbone's llama3 rope scaling")
    state = {}
    for name, array in found.items():
        if name.startswith("blk."):
            _, layer, module, _ = name.split(".")
            hf_module = {v: k for k, v in (gguf_export.BLOCK_TENSORS | gguf_export.LLAMA_NORM_TENSORS).items()}[module]
            if module in ("attn_q", "attn_k"):
                heads = backbone.num_query_heads if module == "attn_q" else backbone.num_key_value_heads
                array = gguf_export.unpermute_rotary(array, heads)
            state[f"model.layers.{layer}.{hf_module}.weight"] = array
        else:
            state[{"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
                   "output_norm.weight": "model.norm.weight"}[name]] = array
    special = [int(reader.get_field(f"tokenizer.ggml.{name}_token_id").contents()) for name in ("bos", "eos")]
    config = transformers.LlamaConfig(**{k: v for k, v in llama_config(backbone, "float32", *special).items()
                                         if k not in ("architectures", "model_type", "torch_dtype", "dtype")})
    model = transformers.LlamaForCausalLM(config).to(torch.float64).eval()
    missing, unexpected = model.load_state_dict({k: torch.from_numpy(np.array(v)).double() for k, v in state.items()}, strict=False)
    if unexpected or [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]:
        raise KerasftError(f"{gguf_path}: weights do not fill LlamaForCausalLM (missing {missing[:2]}, extra {unexpected[:2]})")
    if config.tie_word_embeddings:
        model.tie_weights()
    ids = np.asarray(token_ids, dtype=np.int64)
    with torch.no_grad():
        theirs = model(torch.from_numpy(ids)).logits.numpy()
    return compare_logits(keras_logits(backbone, ids.astype(np.int32)), theirs, atol, rtol,
                          "GGUF read back (gguf package) in transformers LlamaForCausalLM float64")


def verify_gguf_export(gguf_path: Path, backbone, token_ids, *, atol: float = 1e-4, rtol: float = 1e-5) -> dict:
    """Checks a GGUF export: Llama files in transformers (verify_llama_gguf), Gemma files
    imported with kerasft's importer (into a temporary folder) and loaded as every model is."""
    if model_family(backbone) in LLAMA_FAMILIES:  # kerasft's importer reads Gemma files only
        return verify_llama_gguf(gguf_path, backbone, token_ids, atol=atol, rtol=rtol)
    with tempfile.TemporaryDirectory(prefix="kerasft-gguf-check-") as folder:
        preset = import_gguf(gguf_path, Path(folder) / "preset")
        # Loaded as every model is (same attention code): the check compares the weights.
        theirs = keras_logits(load_model(ModelConfig(preset=str(preset))).backbone, token_ids)
    return compare_logits(keras_logits(backbone, token_ids), theirs, atol, rtol, "kerasft GGUF import")


def _reference_runtime():
    """(torch, transformers), or a one-line error naming the extra."""
    try:
        import torch
        import transformers
    except ImportError:
        raise KerasftError("checking an export needs transformers and torch: pip install 'kerasft[verify]'") from None
    return torch, transformers
