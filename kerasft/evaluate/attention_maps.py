"""Attention weights of a prompt, read from the model's own attention computation.

Every Gemma attention layer (keras-hub's, and kerasft's multi-query layout in
kerasft.models.attention) turns its scores into weights with its own `softmax` sublayer, after
the logit soft cap (Gemma 2) and with the causal and sliding-window mask applied, and multiplies
those weights by the values. `attention_weights` records what that softmax returns during one
forward pass, so the maps are the weights the model used, not a second copy of the math.

On accelerators keras-hub may use a fused attention kernel that never materialises the weights;
while recording, each layer takes its unfused path (the same arithmetic).
"""

from __future__ import annotations

import contextlib
import types
from pathlib import Path

import numpy as np

from kerasft.errors import KerasftError


def attention_layers(backbone) -> list:
    """The attention sublayer of each transformer block, in order."""
    layers = [getattr(block, "attention", None) for block in getattr(backbone, "transformer_layers", [])]
    if not layers or any(layer is None or not hasattr(layer, "softmax") for layer in layers):
        raise KerasftError(f"attention maps: {type(backbone).__name__} is not a Gemma backbone with a softmax per "
                           "attention layer")
    return layers


@contextlib.contextmanager
def recording(backbone, layers: list[int]):
    """Within the block, each listed layer's softmax output is appended to records[layer] (as
    (batch, heads, query, key) numpy arrays), and the layer takes its unfused path."""
    records = {index: [] for index in layers}
    attention = attention_layers(backbone)
    patched = []
    for index in layers:
        layer = attention[index]
        softmax = layer.softmax
        original_call = softmax.call

        def call(*args, _original=original_call, _index=index, **kwargs):
            weights = _original(*args, **kwargs)
            records[_index].append(_heads_first(np.asarray(weights)))
            return weights

        softmax.call = call
        fused = vars(layer).get("_use_fused_attention_op")
        layer._use_fused_attention_op = types.MethodType(lambda self: False, layer)
        patched.append((layer, softmax, fused))
    try:
        yield records
    finally:
        for layer, softmax, fused in patched:
            del softmax.call  # back to the class's method
            if fused is None:
                del layer._use_fused_attention_op
            else:
                layer._use_fused_attention_op = fused


def _heads_first(weights: np.ndarray) -> np.ndarray:
    """(batch, heads, query, key) from either layout: keras-hub's (batch, kv heads, groups, query,
    key), where query head n = kv head * groups + group, or kerasft's multi-query (batch, query,
    heads, key)."""
    if weights.ndim == 5:
        batch, kv_heads, groups, queries, keys = weights.shape
        return weights.reshape(batch, kv_heads * groups, queries, keys)
    if weights.ndim == 4:
        return weights.transpose(0, 2, 1, 3)
    raise KerasftError(f"attention maps: unexpected attention weights of shape {weights.shape}")


def attention_weights(backbone, token_ids: list[int], layers: list[int] | None = None) -> dict[int, np.ndarray]:
    """Attention weights of one sequence: {layer index: (heads, query, key) float32 array}, each row
    summing to 1 over the keys it may see (causal, and within the window on sliding-window layers).

    Args:
        layers: which layers (negative counts from the end); default all.
    """
    count = len(attention_layers(backbone))
    chosen = sorted({_layer_index(layer, count) for layer in (range(count) if layers is None else layers)})
    ids = np.asarray([token_ids], dtype="int32")
    with recording(backbone, chosen) as records:
        backbone({"token_ids": ids, "padding_mask": np.ones_like(ids, dtype="bool")})
    return {index: records[index][-1][0].astype("float32") for index in chosen}


def _layer_index(layer: int, count: int) -> int:
    if not -count <= layer < count:
        raise KerasftError(f"--layer {layer}: the model has {count} attention layers (0..{count - 1}, or negative from the end)")
    return layer % count


def draw_attention(weights: np.ndarray, pieces: list[str], path: str | Path, *, title: str = "",
                   head: int | None = None) -> Path:
    """A heatmap PNG of one layer's (heads, query, key) weights: one panel for `head`, or one per
    head (at most 16). Axis labels are the token pieces."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heads = weights.shape[0]
    if head is not None and not -heads <= head < heads:
        raise KerasftError(f"--head {head}: the layer has {heads} query heads (0..{heads - 1})")
    shown = [head % heads] if head is not None else list(range(min(heads, 16)))
    columns = min(len(shown), 4)
    rows = (len(shown) + columns - 1) // columns
    size = max(3.0, min(0.18 * len(pieces) + 1.5, 12.0))
    fig, axes = plt.subplots(rows, columns, figsize=(size * columns, size * rows), squeeze=False)
    labels = [piece.replace("\n", "\\n") for piece in pieces]
    step = max(1, len(labels) // 40)  # at most ~40 tick labels per axis
    for panel, ax in zip(shown, axes.flat):
        image = ax.imshow(weights[panel], cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
        ax.set_title(f"head {panel}", fontsize=9)
        ax.set_xticks(range(0, len(labels), step), labels[::step], rotation=90, fontsize=6)
        ax.set_yticks(range(0, len(labels), step), labels[::step], fontsize=6)
        ax.set_xlabel("key (attended) token", fontsize=8)
        ax.set_ylabel("query token", fontsize=8)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.6, label="attention weight")
    if title:
        fig.suptitle(title, fontsize=10)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)
    return path
