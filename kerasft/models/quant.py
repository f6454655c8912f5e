"""Weight-only int8 / int4 base weights for QLoRA-like training, and their float inverse.

Only the projection kernels of the decoder blocks (keras EinsumDense: query, key, value,
attention output and the feed-forward matrices) are quantized; the token embedding stays float.
It is tied to the output head, its rows can be trained (lora.trainable_tokens), and keras' int8
embedding quantizes the head's input activations with no gradient, so LoRA stops learning.

int8: per-output-channel absmax scales, activations left in float (keras'
`Int8QuantizationConfig(activation_quantizer=None)`; keras' default int8 config also
quantizes activations). int4: keras' sub-channel int4 (groups of 128 inputs, a scale and a zero
point per group and output), also weight-only. LoRA adapters stay float32 and are added to the
quantized projection's output (keras' int8/int4 EinsumDense compute that branch separately).
"""

from __future__ import annotations

import contextlib
import gc

import numpy as np

from kerasft.errors import KerasftError

QUANTIZE_MODES = ("none", "int8", "int4")
INT4_BLOCK_SIZE = 128


def quantization_config(mode: str):
    """The keras QuantizationConfig of a QUANTIZE_MODES mode (weight-only)."""
    from keras.quantizers import Int4QuantizationConfig, Int8QuantizationConfig

    if mode == "int8":
        return Int8QuantizationConfig(activation_quantizer=None)
    if mode == "int4":
        return Int4QuantizationConfig(activation_quantizer=None, block_size=INT4_BLOCK_SIZE)
    raise KerasftError(f"model.quantize: {mode!r} is not one of {', '.join(QUANTIZE_MODES)}")


def quantize_backbone(backbone, mode: str) -> dict:
    """Quantizes the decoder blocks' projection kernels in place (before LoRA is enabled).

    Returns:
        {"mode", "weights_bytes_before", "weights_bytes_after", "layers"}: bytes of all the
        backbone's weights before and after, and how many layers were quantized.
    """
    if mode == "none":
        size = weight_bytes(backbone)
        return {"mode": "none", "weights_bytes_before": size, "weights_bytes_after": size, "layers": 0}
    if any(getattr(layer, "lora_enabled", False) for layer in _projections(backbone)):
        raise KerasftError("model.quantize: quantize the backbone before enabling LoRA")
    config = quantization_config(mode)
    before = weight_bytes(backbone)
    layers = _projections(backbone)
    with one_collection():
        for layer in layers:
            layer.quantize(mode, config=config)
    return {"mode": mode, "weights_bytes_before": before, "weights_bytes_after": weight_bytes(backbone),
            "layers": len(layers)}


def quantize_abstract(backbone, mode: str) -> None:
    """Gives the projection layers the variables (shapes and dtypes) of `mode` without computing
    any value: for a backbone built inside jax.eval_shape (kerasft plan), where keras'
    `quantize` cannot run (it reads the float kernel into numpy)."""
    if mode == "none":
        return
    config = quantization_config(mode)
    with one_collection():
        _abstract_layers(backbone, mode, config)


def _abstract_layers(backbone, mode: str, config) -> None:
    from keras import dtype_policies

    for layer in _projections(backbone):
        kernel_shape = tuple(layer._kernel.shape)
        layer.quantization_config = config
        layer._set_quantization_info()
        layer._tracker.unlock()  # keras' quantize() does the same to replace a built layer's kernel
        del layer._kernel
        layer.quantized_build(kernel_shape, mode, config)
        layer._tracker.lock()
        policy = mode if mode == "int8" else f"int4/{INT4_BLOCK_SIZE}"
        layer.dtype_policy = dtype_policies.get(f"{policy}_from_{layer.dtype_policy.name}")


@contextlib.contextmanager
def one_collection():
    """Runs the block with one garbage collection at its end instead of one per deleted variable.

    keras' Layer.__delattr__ calls gc.collect() for every variable it drops, and quantize() drops
    each float kernel: with TensorFlow and keras loaded a full collection takes 1-3 s on this CPU,
    so quantizing the 42 projections of a tiny preset took about 115 s (py-spy, issue 18's slowest test).
    """
    collect = gc.collect
    gc.collect = lambda generation=2: 0
    try:
        yield
    finally:
        gc.collect = collect
        gc.collect()


def float_kernel(layer):
    """An EinsumDense's kernel as float32 numpy with LoRA merged; int8 and int4 kernels are
    dequantized first (keras stores q = round(w * scale), with a zero point for grouped int4)."""
    from keras import ops, quantizers

    mode = getattr(layer, "quantization_mode", None)
    if mode is None:
        return np.asarray(ops.convert_to_numpy(layer.kernel), dtype=np.float32)  # keras merges LoRA here
    if mode == "int8":
        # keras' own inverse of the scale's storage layout (its LoRA merge on save uses it too).
        scale = np.asarray(layer._adjust_scale_for_dequant(layer.kernel_scale), dtype=np.float32)
        kernel = np.asarray(layer._kernel, dtype=np.float32) / scale
    elif mode == "int4":
        unpacked = quantizers.unpack_int4(layer._kernel, layer._int4_unpacked_column_size, axis=-1)
        if getattr(layer, "_int4_block_size", None):
            from keras.src.quantizers.quantizers import dequantize_with_sz_map  # no public name in keras 3.15

            kernel = dequantize_with_sz_map(
                unpacked, layer.kernel_scale, layer.kernel_zero, layer.g_idx, group_axis=0)
        else:
            kernel = ops.divide(ops.cast(unpacked, "float32"), layer.kernel_scale)
        kernel = np.asarray(ops.convert_to_numpy(kernel), dtype=np.float32).reshape(layer.original_kernel_shape)
    else:
        raise KerasftError(f"{layer.name}: cannot dequantize keras quantization mode {mode!r} (only int8 and int4)")
    if getattr(layer, "lora_enabled", False):
        lora_a = np.asarray(layer.lora_kernel_a, dtype=np.float32)
        lora_b = np.asarray(layer.lora_kernel_b, dtype=np.float32)
        kernel = kernel + (layer.lora_alpha / layer.lora_rank) * np.matmul(lora_a, lora_b)
    return kernel


def weight_bytes(backbone) -> int:
    """Bytes of every weight of a backbone (shapes and dtypes only; nothing is copied)."""
    return sum(int(np.prod(v.shape, dtype=np.int64)) * np.dtype(v.dtype).itemsize for v in backbone.weights)


def parameter_count(backbone) -> int:
    """Parameters of a backbone as a float model has them: quantization scales, zero points and
    group indices are not parameters, and a packed int4 kernel holds two per byte."""
    packed = {id(layer._kernel): layer for layer in _projections(backbone) if layer.quantization_mode == "int4"}
    total = 0
    for variable in backbone.weights:
        if variable.path.rsplit("/", 1)[-1] in ("kernel_scale", "kernel_zero", "g_idx"):
            continue
        layer = packed.get(id(variable))
        total += int(np.prod(layer.original_kernel_shape if layer else variable.shape, dtype=np.int64))
    return total


def quantized_modes(backbone) -> set:
    """The keras quantization modes present in a backbone's layers (empty for a float model)."""
    return {layer.quantization_mode for layer in backbone._flatten_layers()
            if getattr(layer, "quantization_mode", None)}


def _projections(backbone) -> list:
    """The EinsumDense layers: the decoder blocks' projections (not the embedding or norms)."""
    import keras

    return [layer for layer in backbone._flatten_layers(include_self=False) if isinstance(layer, keras.layers.EinsumDense)]
