"""Process set-up that must happen before keras is imported: the JAX backend, seeds, devices."""

from __future__ import annotations

import os
import random

from kerasft.errors import KerasftError


def init_backend(seed: int | None = None):
    """Selects the JAX backend, imports keras, seeds every random source; returns keras.

    Raises KerasftError when keras was already imported with another backend.
    """
    os.environ.setdefault("KERAS_BACKEND", "jax")
    # TensorFlow comes in through keras-hub; keep it quiet and off the accelerators JAX uses.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras

    if keras.backend.backend() != "jax":
        raise KerasftError(
            f"keras is using the {keras.backend.backend()} backend; kerasft needs JAX: "
            "set KERAS_BACKEND=jax before starting Python"
        )
    if seed is not None:
        random.seed(seed)
        keras.utils.set_random_seed(seed)
    return keras


def set_distribution(cfg):
    """Lays the devices out as `runtime.mesh` says and makes it keras' global distribution.

    Call it before the model is loaded: keras creates each variable with its layout. Returns
    the keras distribution, or None for `mesh: none`.

    Args:
        cfg: kerasft.config.RuntimeConfig.
    """
    keras = init_backend()
    if cfg.mesh == "none":
        keras.distribution.set_distribution(None)
        return None
    devices = keras.distribution.list_devices()
    count = len(devices)
    if cfg.mesh_shape == "auto":
        shape = (count, 1) if cfg.mesh == "data" else (1, count)
    else:
        shape = tuple(int(part) for part in cfg.mesh_shape.split("x"))
    if shape[0] * shape[1] != count:
        raise KerasftError(
            f"runtime.mesh_shape: {cfg.mesh_shape} needs {shape[0] * shape[1]} devices, this machine has {count}"
        )
    if cfg.mesh == "data":
        if shape[1] != 1:
            raise KerasftError(f"runtime.mesh_shape: {cfg.mesh_shape} has a model axis; use runtime.mesh=model")
        mesh = keras.distribution.DeviceMesh((count,), ["batch"], devices)
        distribution = keras.distribution.DataParallel(device_mesh=mesh)
    else:
        mesh = keras.distribution.DeviceMesh(shape, ["batch", "model"], devices)
        distribution = _divisible_model_parallel(keras)(layout_map=gemma_layout_map(mesh), batch_dim_name="batch")
    keras.distribution.set_distribution(distribution)
    return distribution


def gemma_layout_map(device_mesh):
    """Weight layouts of Gemma 1, 2 and 3 over a ("batch", "model") mesh.

    keras-hub's Gemma layout (the Gemma team's training sharding: heads and feed-forward width
    over `model`, the hidden width over `batch`) names its variables the same way in all three
    families (Gemma3Backbone has no layout map of its own), so one map serves them. LoRA A/B
    matrices match no rule and are replicated.
    """
    import keras_hub

    return keras_hub.models.GemmaBackbone.get_layout_map(
        device_mesh, model_parallel_dim_name="model", data_parallel_dim_name="batch"
    )


def batch_shards() -> int:
    """How many ways the batch axis is split under the current distribution (1 without one)."""
    import keras

    distribution = keras.distribution.distribution()
    if distribution is None:
        return 1
    mesh = distribution.device_mesh
    return mesh.shape[mesh.axis_names.index(distribution.batch_dim_name)]


def place_batch(batch: dict) -> dict:
    """Puts a numpy batch on the devices, split along its first axis under a distribution.

    Without a distribution the arrays are returned as they are (jit copies them in).
    """
    import keras

    distribution = keras.distribution.distribution()
    if distribution is None:
        return batch
    import jax

    return {key: jax.device_put(value, distribution.get_data_layout(value.shape).backend_layout)
            for key, value in batch.items()}


def _divisible_model_parallel(keras):
    """keras' ModelParallel, except that a weight axis the mesh cannot split evenly is replicated.

    keras-hub's Gemma layout splits key/value heads over the model axis and raises an
    IndivisibleError when there are fewer of them than model devices (Gemma 2B and 3 270M have
    one): those projections are small, so a copy on every device is the right layout.
    """

    class DivisibleModelParallel(keras.distribution.ModelParallel):
        def get_variable_layout(self, variable):
            layout = super().get_variable_layout(variable)
            mesh = layout.device_mesh
            axes = list(layout.axes)
            for i, (axis, size) in enumerate(zip(axes, variable.shape)):
                if axis is not None and size % mesh.shape[mesh.axis_names.index(axis)]:
                    axes[i] = None
            if axes == list(layout.axes):
                return layout
            return keras.distribution.TensorLayout(axes, mesh)

    return DivisibleModelParallel
