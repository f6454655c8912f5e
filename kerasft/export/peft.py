"""LoRA adapters as a PEFT adapter: the folder `peft.PeftModel.from_pretrained(base, dir)` loads onto
the merged Hugging Face export (kerasft.export.hf) of the LoRA-free base model.

keras' EinsumDense LoRA adds (alpha/r) * A @ B to the kernel, with A of shape kernel[:-1] + (r,)
and B of shape (r, kernel[-1]). PEFT adds (alpha/r) * lora_B @ lora_A to the (out, in) weight.

- MLP kernels (in, out) and the attention output kernel (heads, head_dim, hidden) end in the
  output axis, and HF's weight is kernel.reshape(-1, out).T, so lora_A = A.reshape(-1, r).T and
  lora_B = B.T: the same rank.
- Query, key and value kernels are (heads, hidden, head_dim): A is (heads, hidden, r) and B is
  (r, head_dim), shared by every head. HF's weight stacks the heads' (head_dim, hidden) blocks,
  and block n of the update is B.T @ A[n].T: a different rank-r product per head, of rank
  heads * r in general. It is written exactly with rank heads * r: lora_A stacks the heads'
  A[n].T and lora_B is block-diagonal with B.T in every block. rank_pattern records that
  rank, and alpha_pattern multiplies alpha by heads so alpha / rank stays the same.

Embedding rows trained with the adapters (lora.trainable_tokens) go in as PEFT trainable tokens;
PEFT ties them to the output projection as Gemma ties the embedding.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kerasft.errors import KerasftError
from kerasft.export import hf
from kerasft.export.card import model_card
from kerasft.export.hf import IN_PER_HEAD, PER_HEAD
from kerasft.paths import staged_dir

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
# PEFT's name for trainable-token rows on the embedding (they hold the new rows, not a difference).
TOKEN_ROWS_KEY = "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"


def export_peft(
    backbone, out_dir: str | Path, *, base_model_name_or_path: str, token_ids=(), card: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Writes adapter_config.json, adapter_model.safetensors and a model card (README.md) for the
    backbone's LoRA adapters.

    Args:
        backbone: a keras-hub Gemma 1, 2 or 3 backbone with LoRA enabled (kerasft.models.lora).
        base_model_name_or_path: what PEFT records as the base: the hub name or folder of the
            merged export of the base model.
        token_ids: vocabulary ids whose embedding rows were trained with the adapters
            (lora.trainable_tokens). Their current rows go in as PEFT trainable tokens
            (`trainable_token_indices`), which replace those rows of the tied embedding and
            output projection of the base model.
        card: README.md text (kerasft.export.card.model_card); None writes the card of the
            backbone alone.

    The folder appears atomically (built beside the target, then renamed).
    """
    from safetensors.numpy import save_file

    out = Path(out_dir)
    hf.hf_family(backbone)  # the same checks as the merged export the adapter goes onto
    tensors, placed = {}, []
    scales = {}  # HF module name -> {(PEFT rank, PEFT alpha)}; PEFT needs one pair per name
    rank = alpha = None  # keras' rank and alpha of the first adapter: the config's defaults
    for i in range(backbone.num_layers):
        block = hf.decoder_block(backbone, i)
        for _, attribute, module, layout in hf.projections(backbone):
            layer = hf.projection(block, attribute)
            if not getattr(layer, "lora_enabled", False):
                continue
            kernel_a = np.asarray(layer.lora_kernel_a, dtype=np.float32)
            kernel_b = np.asarray(layer.lora_kernel_b, dtype=np.float32)
            lora_a, lora_b = peft_factors(kernel_a, kernel_b, layout)
            key = f"base_model.model.model.layers.{i}.{module}"
            tensors[key + ".lora_A.weight"] = lora_a
            tensors[key + ".lora_B.weight"] = lora_b
            placed.append(f"model.layers.{i}.{module}")
            if rank is None:
                rank, alpha = int(layer.lora_rank), float(layer.lora_alpha)
            expansion = lora_a.shape[0] // layer.lora_rank
            scales.setdefault(module.split(".")[-1], set()).add(
                (lora_a.shape[0], float(layer.lora_alpha) * expansion)
            )
    if not tensors:
        raise KerasftError("the backbone has no LoRA adapters to export (merged already, or LoRA never enabled)")
    token_ids = sorted({int(i) for i in token_ids})
    if token_ids:
        if not 0 <= token_ids[0] <= token_ids[-1] < backbone.vocabulary_size:
            raise KerasftError(f"token ids {token_ids} are outside the vocabulary of {backbone.vocabulary_size}")
        table = hf.float_embeddings(backbone.token_embedding)
        tensors[TOKEN_ROWS_KEY] = np.ascontiguousarray(table[token_ids])
    uneven = [name for name, pairs in scales.items() if len(pairs) > 1]
    if uneven:
        raise KerasftError(f"LoRA rank or alpha differs between layers of {uneven[0]}; PEFT needs one per module name")
    scales = {name: pairs.pop() for name, pairs in scales.items()}
    rank_pattern = {name: r for name, (r, _) in scales.items() if r != rank}
    alpha_pattern = {name: a for name, (_, a) in scales.items() if a != alpha}
    names = sorted(scales)
    every_layer = len(placed) == len(names) * backbone.num_layers
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": rank,
        "lora_alpha": alpha,
        # Short names when every layer has the adapter; otherwise the exact modules.
        "target_modules": names if every_layer else placed,
        "rank_pattern": rank_pattern,
        "alpha_pattern": alpha_pattern,
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "trainable_token_indices": {"embed_tokens": token_ids} if token_ids else None,
    }
    with staged_dir(out, overwrite) as staging:
        save_file(tensors, str(staging / ADAPTER_WEIGHTS), metadata={"format": "pt"})
        (staging / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        if card is None:
            card = model_card("peft", backbone, source=base_model_name_or_path)
        (staging / "README.md").write_text(card, encoding="utf-8")
    return out


def peft_factors(kernel_a, kernel_b, layout: str) -> tuple:
    """PEFT's (lora_A, lora_B) for keras' LoRA factors of a kernel with a PROJECTIONS layout.

    lora_B @ lora_A equals hf_kernel(kernel_a @ kernel_b, layout) exactly; for PER_HEAD
    kernels the rank grows from r to heads * r (see the module docstring).
    """
    rank = kernel_b.shape[0]
    if layout == PER_HEAD:  # A (heads, hidden, r), B (r, head_dim)
        heads, hidden = kernel_a.shape[:2]
        lora_a = kernel_a.transpose(0, 2, 1).reshape(heads * rank, hidden)
        lora_b = np.kron(np.eye(heads, dtype=kernel_b.dtype), kernel_b.T)
    elif layout == IN_PER_HEAD:  # Llama: A (hidden, heads, r), B (r, head_dim)
        hidden, heads = kernel_a.shape[:2]
        lora_a = kernel_a.transpose(1, 2, 0).reshape(heads * rank, hidden)
        lora_b = np.kron(np.eye(heads, dtype=kernel_b.dtype), kernel_b.T)
    else:  # A (..., r), B (r, out)
        lora_a = kernel_a.reshape(-1, rank).T
        lora_b = kernel_b.T
    return np.ascontiguousarray(lora_a), np.ascontiguousarray(lora_b)
