"""kerasft: fine-tune Gemma models with Keras 3 on JAX.

Importing this package is instant: keras, jax and tensorflow load only inside the stages that
need them.
"""

__version__ = "0.1.0"
