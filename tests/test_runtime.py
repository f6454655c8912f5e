"""runtime.init_backend: TensorFlow (keras-hub's tokenizers run on it) is imported quietly and sees
no GPU, so it never claims accelerator memory ahead of JAX; TF_CPP_MIN_LOG_LEVEL=0 shows its lines."""

import os
import subprocess
import sys

SCRIPT = """
import jax
jax.devices()  # JAX started first, as `kerasft run` does (its mesh is checked before the model loads)
from kerasft.runtime import init_backend
init_backend()
import keras_hub, tensorflow as tf
print(tf.config.get_visible_devices("GPU"), keras_hub.tokenizers.Tokenizer.__name__)
"""


def _run(**env):
    return subprocess.run([sys.executable, "-c", SCRIPT], capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in {**os.environ, **env}.items() if v is not None})


def test_tensorflow_is_imported_quietly_and_without_gpus():
    quiet = _run(TF_CPP_MIN_LOG_LEVEL=None)
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout.strip() == "[] Tokenizer"
    for line in ("absl::InitializeLog", "port.cc", "cuda_platform"):
        assert line not in quiet.stderr, quiet.stderr
    loud = _run(TF_CPP_MIN_LOG_LEVEL="0")
    assert loud.returncode == 0 and loud.stdout.strip() == "[] Tokenizer"
    assert "absl::InitializeLog" in loud.stderr  # TensorFlow's own start-up lines, when asked for
