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
