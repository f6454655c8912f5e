"""A model view before training: the backbone's weights per layer kind, parameter counts, the
kernels LoRA touches with its parameter count, and the trainable share.

The backbone is built as the memory plan builds it (plan.abstract_backbone: inside jax.eval_shape,
so nothing is allocated); presets that cannot be planned offline are loaded. It lives in train/
because it is the training run's model (LoRA and trained embedding rows as training sets them up).
"""

from __future__ import annotations

import re

import numpy as np

from kerasft.errors import KerasftError
from kerasft.models.families import TURN_TOKENS, lora_target_name, model_family, trainable_turn_tokens
from kerasft.models.quant import parameter_count

_BLOCK = re.compile(r"^(.*?)_(\d+)$")
_NOT_PARAMETERS = ("kernel_scale", "kernel_zero", "g_idx")  # as quant.parameter_count


def model_view(cfg) -> dict:
    """What a RunConfig trains, before training: a JSON-able dict.

    Keys: backbone, preset, dtype, quantize, blocks, hidden_dim, vocabulary; weights (one row per
    weight kind: name with `*` for the block index, count, shape, parameters of all of them, lora
    target or ""); parameters (the base model's, as a float model has them); lora (rank, alpha,
    targets, kernels it wraps, layers, parameters); token_rows (trained embedding rows: tokens,
    rows, parameters); trainable (LoRA + rows); total (base + LoRA); trainable_share (trainable /
    total); built ("abstract" or "loaded").
    """
    from kerasft.train.plan import abstract_backbone, backbone_spec

    try:
        backbone_spec(cfg.model)
    except KerasftError:
        backbone, built = _loaded_backbone(cfg), "loaded"
    else:
        backbone, built = abstract_backbone(cfg.model, cfg.lora), "abstract"
    family = model_family(backbone)
    rows, lora_rows, lora_layers = {}, {}, 0
    for variable in backbone.weights:
        parts = variable.path.split("/")
        match = _BLOCK.match(parts[0])
        kind = "/".join([f"{match.group(1)}_*" if match else parts[0], *parts[1:]])
        leaf = parts[-1]
        if leaf in _NOT_PARAMETERS:
            continue
        size = int(np.prod(variable.shape, dtype=np.int64))
        table = lora_rows if leaf in ("lora_kernel_a", "lora_kernel_b") else rows
        row = table.setdefault(kind, {"name": kind, "count": 0, "shape": list(variable.shape), "parameters": 0,
                                      "lora": ""})
        row["count"] += 1
        row["parameters"] += size
        if leaf == "lora_kernel_a":
            lora_layers += 1
            rows[kind.rsplit("/", 1)[0] + "/kernel"]["lora"] = lora_target_name(family, parts[-2])
    lora_parameters = sum(row["parameters"] for row in lora_rows.values())
    parameters = parameter_count(backbone) - lora_parameters  # parameter_count counts every weight
    tokens = _trained_tokens(cfg, family)
    hidden = int(backbone.token_embedding.embeddings.shape[1])
    token_parameters = len(tokens) * hidden
    trainable = lora_parameters + token_parameters
    total = parameters + lora_parameters
    notes = []
    if cfg.lora.train_new_tokens:
        notes.append("lora.train_new_tokens also trains the rows `kerasft vocab add` added (not counted here)")
    return {
        "backbone": type(backbone).__name__, "family": family, "preset": cfg.model.preset,
        "dtype": cfg.model.dtype, "quantize": cfg.model.quantize, "built": built,
        "blocks": int(getattr(backbone, "num_layers", 0)), "hidden_dim": hidden,
        "vocabulary": int(backbone.token_embedding.embeddings.shape[0]),
        "weights": list(rows.values()), "parameters": parameters,
        "lora": {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha, "targets": list(cfg.lora.targets),
                 "kernels": [row["name"] for row in rows.values() if row["lora"]], "layers": lora_layers,
                 "parameters": lora_parameters, "weights": list(lora_rows.values())},
        "token_rows": {"tokens": list(tokens), "rows": len(tokens), "parameters": token_parameters},
        "trainable": trainable, "total": total, "trainable_share": trainable / total if total else 0.0,
        "notes": notes,
    }


def format_model_view(view: dict) -> str:
    """The model view as the text table `kerasft model` prints."""
    lines = [f"{view['backbone']} ({view['family']}) from {view['preset']}: {view['blocks']} blocks, hidden "
             f"{view['hidden_dim']}, vocabulary {view['vocabulary']:,}, dtype {view['dtype']}, quantize "
             f"{view['quantize']} (built {view['built']})", ""]
    width = max(len(row["name"]) for row in view["weights"] + view["lora"]["weights"])
    lines.append(f"{'weight':<{width}}  {'count':>5}  {'shape (each)':<16} {'parameters':>14}  LoRA")
    for row in view["weights"] + view["lora"]["weights"]:
        lines.append(f"{row['name']:<{width}}  {row['count']:>5}  {str(tuple(row['shape'])):<16} "
                     f"{row['parameters']:>14,}  {row['lora']}")
    lora = view["lora"]
    rows = view["token_rows"]
    lines += ["", f"base parameters        {view['parameters']:>14,}",
              f"{'LoRA r%d alpha %g' % (lora['rank'], lora['alpha']):<23}{lora['parameters']:>14,}  on {lora['layers']} "
              f"kernels: {', '.join(lora['kernels'])}",
              f"trained embedding rows {rows['parameters']:>14,}  ({rows['rows']} rows: {' '.join(rows['tokens'])})",
              f"trainable              {view['trainable']:>14,}  of {view['total']:,} "
              f"({view['trainable_share']:.4%}; total = base + LoRA)"]
    lines += [f"note: {note}" for note in view["notes"]]
    return "\n".join(lines)


def _trained_tokens(cfg, family: str | None) -> tuple:
    """lora.trainable_tokens as the training run resolves them (data.template auto: the family's)."""
    template = cfg.data.template
    if template == "auto":
        template = "llama3" if family == "llama3" else "gemma" if (family or "").startswith("gemma") else "plain"
    if template not in TURN_TOKENS:
        return tuple(cfg.lora.trainable_tokens)
    return trainable_turn_tokens(cfg.lora.trainable_tokens, template)


def _loaded_backbone(cfg):
    from kerasft.models.lora import apply_lora
    from kerasft.models.presets import load_model

    backbone = load_model(cfg.model).backbone
    apply_lora(backbone, cfg.lora)
    return backbone
