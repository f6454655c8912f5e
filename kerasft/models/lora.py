"""LoRA on keras-hub Gemma backbones: enable with rank, alpha and targets; save, load, merge.

keras-hub's `backbone.enable_lora` has no alpha and its `save_lora_weights` drops it, so adapters
are enabled per layer here (keras' EinsumDense takes `lora_alpha`) and saved as safetensors with
an adapter_config.json that records rank, alpha, targets and the base model.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np

from kerasft.config import LORA_TARGETS, LoraConfig
from kerasft.errors import KerasftError
from kerasft.models.families import lora_target_name, model_family

ADAPTER_WEIGHTS = "adapter.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TOKEN_ROWS = "token_embedding/embeddings/rows"


def apply_lora(backbone, cfg) -> list:
    """Freezes the backbone and adds LoRA adapters to the target projections.

    Args:
        backbone: a keras-hub Gemma backbone.
        cfg: kerasft.config.LoraConfig (rank, alpha, targets).

    Returns:
        The layers that now carry adapters.
    """
    # rank, alpha and targets were checked when the LoraConfig was built (kerasft.config).
    # Order matters: `backbone.trainable = True` recurses into every sublayer, so it comes first.
    backbone.trainable = True
    for layer in backbone._flatten_layers(include_self=False):
        layer.trainable = False
    wrapped = []
    for layer in _projection_layers(backbone):
        if _target_name(backbone, layer) in cfg.targets:
            layer.trainable = True
            layer.enable_lora(cfg.rank, lora_alpha=cfg.alpha)
            wrapped.append(layer)
    if not wrapped:
        raise KerasftError(f"lora.targets {list(cfg.targets)} matched no layer of {type(backbone).__name__}")
    return wrapped


def lora_layers(backbone) -> list:
    """The layers of a backbone whose LoRA adapters are enabled."""
    return [layer for layer in _projection_layers(backbone) if getattr(layer, "lora_enabled", False)]


def adapter_weights(backbone) -> dict:
    """LoRA A and B matrices as numpy arrays keyed by keras variable path."""
    weights = {}
    for layer in lora_layers(backbone):
        for variable in (layer.lora_kernel_a, layer.lora_kernel_b):
            weights[variable.path] = np.asarray(variable.numpy(), dtype=np.float32)
    return weights


def token_ids_for(tokenizer, pieces) -> list[int]:
    """Ids of the named vocabulary pieces; an unknown piece is an error naming it."""
    def lookup(piece):
        try:
            return tokenizer.token_to_id(piece)
        except (ValueError, KeyError):  # byte-level BPE tokenizers (Llama 3) raise; SentencePiece gives <unk>
            return None

    ids = []
    for piece in pieces:
        token_id = lookup(piece)
        if token_id is None or (piece != "<unk>" and token_id == lookup("<unk>")):
            raise KerasftError(f"lora.trainable_tokens: {piece!r} is not in the tokenizer's vocabulary")
        ids.append(int(token_id))
    return ids


def save_adapter(backbone, cfg, out_dir: str | Path, base_model: str, token_ids=()) -> Path:
    """Writes adapter.safetensors and adapter_config.json (rank, alpha, targets, base model).

    The embedding rows of `token_ids` (trained with the adapters) are saved whole under
    TOKEN_ROWS, so loading the adapter onto the base model restores them.
    """
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    weights = adapter_weights(backbone)
    if token_ids:
        table = np.asarray(backbone.token_embedding.embeddings.numpy(), dtype=np.float32)
        weights[TOKEN_ROWS] = np.ascontiguousarray(table[list(token_ids)])
    save_file(weights, str(out / ADAPTER_WEIGHTS))
    meta = {
        "format": "kerasft-lora-v1",
        "base_model": base_model,
        "backbone_class": type(backbone).__name__,
        "rank": cfg.rank,
        "alpha": cfg.alpha,
        "targets": list(cfg.targets),
        "trainable_tokens": {"pieces": list(cfg.trainable_tokens), "ids": [int(i) for i in token_ids]} if token_ids else None,
        "num_layers": len(lora_layers(backbone)),
    }
    (out / ADAPTER_CONFIG).write_text(json.dumps(meta, indent=2) + "\n")
    return out


def read_adapter_config(adapter_dir: str | Path) -> dict:
    """The adapter_config.json of a saved adapter, validated."""
    path = Path(adapter_dir) / ADAPTER_CONFIG
    if not path.is_file():
        raise KerasftError(f"{path}: adapter config not found (is {adapter_dir} a kerasft run dir?)")
    try:
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise KerasftError(f"{path}: line {err.lineno}: invalid JSON: {err.msg}") from None
    for key in ("rank", "alpha", "targets", "base_model"):
        if key not in meta:
            raise KerasftError(f"{path}: missing key {key!r}")
    return meta


def load_adapter(backbone, adapter_dir: str | Path) -> dict:
    """Enables LoRA as the saved adapter was configured and loads its weights.

    Returns:
        The adapter's metadata.
    """
    from safetensors.numpy import load_file

    meta = read_adapter_config(adapter_dir)
    cfg = LoraConfig(rank=int(meta["rank"]), alpha=float(meta["alpha"]), targets=tuple(meta["targets"]),
                     trainable_tokens=tuple((meta.get("trainable_tokens") or {}).get("pieces", ())))
    if not lora_layers(backbone):
        apply_lora(backbone, cfg)
    weights = load_file(str(Path(adapter_dir) / ADAPTER_WEIGHTS))
    rows = weights.pop(TOKEN_ROWS, None)
    if rows is not None:
        ids = (meta.get("trainable_tokens") or {}).get("ids")
        table = backbone.token_embedding.embeddings
        if not ids or len(ids) != len(rows) or rows.shape[1] != table.shape[1] or max(ids) >= table.shape[0]:
            raise KerasftError(f"{adapter_dir}: trained token rows do not fit this model's embedding")

        updated = np.array(table.numpy())
        updated[ids] = rows
        table.assign(updated)
    variables = {v.path: v for layer in lora_layers(backbone) for v in (layer.lora_kernel_a, layer.lora_kernel_b)}
    if set(weights) != set(variables):
        missing = sorted(set(variables) - set(weights)) or sorted(set(weights) - set(variables))
        raise KerasftError(f"{adapter_dir}: adapter does not match the base model (first mismatch: {missing[0]})")
    for path, value in weights.items():
        if tuple(variables[path].shape) != value.shape:
            raise KerasftError(
                f"{adapter_dir}: {path} has shape {value.shape}, the model wants {tuple(variables[path].shape)}"
            )
        variables[path].assign(value)
    return meta


def merge_lora(backbone) -> int:
    """Folds every adapter into its base kernel ((alpha/rank) * A @ B) and disables LoRA.

    Afterwards the backbone computes the same function without adapters, so any exporter or
    `save_to_preset` writes plain kernels. Returns the number of merged layers.
    """
    merged = 0
    for layer in lora_layers(backbone):
        if getattr(layer, "quantization_mode", None):
            raise KerasftError(f"{layer.name}: cannot merge LoRA into a {layer.quantization_mode} kernel in place; "
                               "export the model instead (exports dequantize and merge)")
        kernel = layer.kernel  # keras returns base + (alpha/rank) * A @ B
        layer._kernel.assign(kernel)
        layer.lora_enabled = False
        # Drop the adapter variables so saved presets carry no LoRA state.
        layer._tracker.unlock()
        layer._trainable_variables = [
            v for v in layer._trainable_variables if v is not layer.lora_kernel_a and v is not layer.lora_kernel_b
        ]
        layer._tracker.lock()
        del layer.lora_kernel_a, layer.lora_kernel_b
        layer.lora_rank = None
        merged += 1
    return merged


def _target_name(backbone, layer) -> str:
    """The lora.targets name of a projection layer (Llama's MLP layers have their own names)."""
    return lora_target_name(model_family(backbone), layer.name)


def _projection_layers(backbone) -> list:
    import keras

    return [
        layer
        for layer in backbone._flatten_layers(include_self=False)
        if isinstance(layer, (keras.layers.EinsumDense, keras.layers.Dense))
        and _target_name(backbone, layer) in LORA_TARGETS
    ]


@contextlib.contextmanager
def lora_dropout(backbone, rate: float, key):
    """While a training step is traced inside this block, every LoRA layer computes its adapter
    branch separately, on its input with dropout `rate` (PEFT's lora_dropout), and adds it to the
    frozen projection's output, which sees the undropped input.

    keras merges A @ B into the kernel in the float layer, so dropout on the branch alone needs
    the branch apart. Outside this block (evaluation, generation, export) layers are untouched.
    `key` is a jax PRNG key; each layer folds in its own index.
    """
    if rate <= 0:
        yield
        return
    import jax
    import jax.numpy as jnp
    import keras
    from keras import ops

    layers = lora_layers(backbone)
    for index, layer in enumerate(layers):
        if layer.activation not in (None, keras.activations.linear):  # a bias is fine: the sum commutes
            raise KerasftError(f"lora.dropout: {layer.name} has an activation; dropout supports linear projections")
        quantized = getattr(layer, "quantization_mode", None) is not None
        forward = layer.quantized_call if quantized else layer.call
        einsum = isinstance(layer, keras.layers.EinsumDense)

        def call(inputs, training=None, *, _layer=layer, _forward=forward, _key=jax.random.fold_in(key, index),
                 _einsum=einsum):
            _layer.lora_enabled = False  # the frozen projection alone (float or quantized path)
            try:
                base = _forward(inputs, training=training)
            finally:
                _layer.lora_enabled = True
            keep = jax.random.bernoulli(_key, 1.0 - rate, inputs.shape)
            dropped = jnp.where(keep, inputs / (1.0 - rate), 0).astype(inputs.dtype)
            a, b = _layer.lora_kernel_a, _layer.lora_kernel_b
            low = ops.einsum(_layer.equation, dropped, a) if _einsum else ops.matmul(dropped, a)
            branch = (_layer.lora_alpha / _layer.lora_rank) * ops.matmul(low, b)
            return ops.cast(ops.add(base, ops.cast(branch, base.dtype)), base.dtype)

        object.__setattr__(layer, "quantized_call" if quantized else "call", call)
    try:
        yield
    finally:
        for layer in layers:
            for name in ("call", "quantized_call"):
                layer.__dict__.pop(name, None)
