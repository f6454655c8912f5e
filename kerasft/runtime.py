"""Process set-up that must happen before keras is imported or JAX computes anything: the JAX
backend, seeds, the distributed runtime of multi-host jobs, the device mesh."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import random
import sys
from dataclasses import dataclass

from kerasft.errors import KerasftError


GIB = 1024**3


@dataclass(frozen=True)
class Target:
    name: str
    bytes_per_device: int
    devices: int
    kind: str  # gpu | tpu | cpu
    gpu_spec: str = ""  # GPU targets: the GpuTargetConfig text proto in kerasft/gpu_targets/ (gpu_target_config)


TARGETS = {
    "4090": Target("RTX 4090 (24 GiB)", 24 * GIB, 1, "gpu", "4090.txtpb"),
    "t4": Target("T4 (16 GiB, 15 usable)", 15 * GIB, 1, "gpu", "t4.txtpb"),
    "l4": Target("L4 (24 GB, 22.5 GiB usable)", 23034 * 2**20, 1, "gpu", "l4.txtpb"),
    "a100-40g": Target("A100 40 GB", 40 * 10**9, 1, "gpu", "a100-40g.txtpb"),
    "a100-80g": Target("A100 80 GB", 80 * 10**9, 1, "gpu", "a100-80g.txtpb"),
    "h100": Target("H100 80 GB", 80 * 10**9, 1, "gpu", "h100.txtpb"),
    "h200": Target("H200 141 GB", 141 * 10**9, 1, "gpu", "h200.txtpb"),
    "tpu-v3-8": Target("TPU v3-8 (8 cores x 16 GiB)", 16 * GIB, 8, "tpu"),
    "tpu-v5e-8": Target("TPU v5e-8 (8 chips x 16 GiB)", 16 * GIB, 8, "tpu"),
    "cpu": Target("this machine's free memory", 0, 1, "cpu"),
}


def resolve_target(text: str, devices: int = 0) -> tuple[str, Target]:
    """(key of TARGETS, Target) for `kerasft plan --target`: a key, or N x a GPU key ("4xa100-80g");
    `devices` (--devices) sets the GPU count too. Raises KerasftError naming the flag."""
    import re

    key, count = text, 0
    if text not in TARGETS and re.fullmatch(r"\d+x.+", text):
        count_text, _, key = text.partition("x")
        count = int(count_text)
    if key not in TARGETS:
        raise KerasftError(f"--target: {text!r} is not one of {', '.join(TARGETS)} (GPUs also as NxKEY, e.g. 4xa100-80g)")
    target = TARGETS[key]
    wanted = {n for n in (count, devices) if n}
    if not wanted and not (count or devices):
        if text != key:
            raise KerasftError(f"--target {text}: give a device count of 1 or more")
        return key, target
    if min(wanted) < 1:
        raise KerasftError(f"--devices {devices}: give a device count of 1 or more")
    if len(wanted) > 1:
        raise KerasftError(f"--target {text} --devices {devices}: the two device counts differ")
    if target.kind != "gpu":
        raise KerasftError(f"--devices: only GPU targets take a device count; {key} has {target.devices}")
    n = wanted.pop()
    return key, dataclasses.replace(target, devices=n, name=target.name if n == 1 else f"{n} x {target.name}")


CUDA_PLUGINS = ("jax_cuda12_plugin", "jax_cuda13_plugin")  # jax[cuda12-local] (the gpu-plan extra), jax[cuda13]


def cuda_compiler_installed() -> bool:
    """Whether one of jax's CUDA plugins, and with it XLA's CUDA compiler, is installed (JAX not started)."""
    import importlib.util

    return any(importlib.util.find_spec(name) is not None for name in CUDA_PLUGINS)


def gpu_target_config(target: Target) -> str:
    """The GpuTargetConfig text proto of a GPU target (XLA's own dump for A100/H100/H200; written
    from the vendor's public specifications for the 4090, T4 and L4: each file names its sources)."""
    from importlib import resources

    if not target.gpu_spec:
        raise KerasftError(f"{target.name}: no GPU target description")
    return resources.files("kerasft").joinpath("gpu_targets", target.gpu_spec).read_text(encoding="utf-8")


def init_backend(seed: int | None = None):
    """Selects the JAX backend, imports keras, seeds every random source; returns keras.

    Raises KerasftError when keras was already imported with another backend.
    """
    os.environ.setdefault("KERAS_BACKEND", "jax")
    _tensorflow_quiet_and_off_gpus()
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


def _tensorflow_quiet_and_off_gpus() -> None:
    """TensorFlow comes in through keras-hub, whose tokenizers run on it. Left alone it would
    initialise every GPU it can see and claim most of its memory ahead of JAX (the JAX guides that
    load data with TensorFlow hide the GPUs from it the same way), and its import writes start-up
    lines (oneDNN, CUDA drivers) to stderr that TF_CPP_MIN_LOG_LEVEL does not govern: they are
    written before absl's logging starts. So it is imported here with stderr closed, unless
    TF_CPP_MIN_LOG_LEVEL is set to 0; an import that fails still raises its own error."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    quiet = os.environ["TF_CPP_MIN_LOG_LEVEL"] != "0"
    with _stderr_closed() if quiet else contextlib.nullcontext():  # listing the GPUs can log a cuInit failure
        try:
            import tensorflow as tf
        except ImportError:
            return  # keras-hub will say what is missing
        try:
            tf.config.set_visible_devices([], "GPU")
        except (RuntimeError, ValueError, AttributeError):  # its devices are initialised already
            pass


def tokenizer_logs_quiet():
    """For building a keras-hub SentencePiece tokenizer: the first one in a process logs
    `normalizer.cc(51) LOG(INFO) precompiled_charsmap is empty` from C++ (Gemma's identity
    normaliser), which no Python log level governs, so stderr is closed for the block.
    TF_CPP_MIN_LOG_LEVEL=0 keeps it open, as it does for TensorFlow's start-up lines."""
    return _stderr_closed() if os.environ.get("TF_CPP_MIN_LOG_LEVEL") != "0" else contextlib.nullcontext()


@contextlib.contextmanager
def _stderr_closed():
    """Sends file descriptor 2 (what C++ libraries write to) to /dev/null for the block."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def set_distribution(cfg, devices=None):
    """Lays the devices out as `runtime.mesh` says and makes it keras' global distribution.

    Call it before the model is loaded: keras creates each variable with its layout. Returns
    the keras distribution, or None for `mesh: none`.

    Args:
        cfg: kerasft.config.RuntimeConfig.
        devices: the devices to lay out; default every device of the job. The memory plan passes
            abstract TPU devices to compile for a TPU this machine does not have.
    """
    if devices is None:
        init_distributed(cfg)
    keras = init_backend()
    if cfg.mesh == "none" and devices is None and process_count() > 1:
        raise KerasftError(f"runtime.mesh: none in a job of {process_count()} processes would train the whole batch "
                           "in each; use runtime.mesh=data or model")
    if cfg.mesh == "none":
        keras.distribution.set_distribution(None)
        return None
    devices = list(devices) if devices is not None else keras.distribution.list_devices()
    count = len(devices)
    if cfg.mesh_shape == "auto":
        shape = (count, 1) if cfg.mesh == "data" else (1, count)
    else:
        shape = tuple(int(part) for part in cfg.mesh_shape.split("x"))
    if shape[0] * shape[1] != count:
        raise KerasftError(
            f"runtime.mesh_shape: {cfg.mesh_shape} needs {shape[0] * shape[1]} devices, "
            + (f"this machine has {count}" if process_count() == 1 else f"the {process_count()} processes have {count}")
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
    """Weight layouts of Gemma 1, 2 and 3 and Llama over a ("batch", "model") mesh.

    keras-hub's Gemma layout (the Gemma team's training sharding: heads and feed-forward width
    over `model`, the hidden width over `batch`) names its variables the same way in all three
    families (Gemma3Backbone has no layout map of its own), so one map serves them; Llama's
    variables have other names, and their rules (llama_layout_rules) join the same map. LoRA A/B
    matrices match no rule and are replicated.
    """
    import keras_hub

    layout_map = keras_hub.models.GemmaBackbone.get_layout_map(
        device_mesh, model_parallel_dim_name="model", data_parallel_dim_name="batch"
    )
    for key, axes in llama_layout_rules("model", "batch").items():
        layout_map[key] = axes
    return layout_map


def llama_layout_rules(model_dim: str = "model", data_dim: str = "batch") -> dict:
    """keras LayoutMap rules for Llama weights over a ("batch", "model") mesh, following
    keras-hub's LlamaBackbone.get_layout_map but keeping key/value kernels whole: their head
    count (8 in Llama 3, 4 in TinyLlama) need not divide the model axis, and they are small."""
    return {
        "transformer_layer.*self_attention.*query.kernel": (model_dim, data_dim, None),
        "transformer_layer.*self_attention.*(key|value).kernel": (None, None, None),
        "transformer_layer.*attention_output.kernel": (model_dim, None, data_dim),
        "transformer_layer.*feedforward_(intermediate|gate)_dense.kernel": (data_dim, model_dim),
        "transformer_layer.*feedforward_output_dense.kernel": (model_dim, data_dim),
        "token_embedding/reverse_embeddings": (data_dim, model_dim),
    }


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

    Every process holds the same global batch (batches are a pure function of the seed and the
    data position), and each copies only the rows its own devices hold: in a multi-host job no
    process sends data to another. Without a distribution the arrays are returned as they are
    (jit copies them in).
    """
    import keras

    distribution = keras.distribution.distribution()
    if distribution is None:
        return batch
    import jax

    def place(value):
        sharding = distribution.get_data_layout(value.shape).backend_layout
        return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])

    return {key: place(value) for key, value in batch.items()}


def init_distributed(cfg) -> bool:
    """Joins this process to a multi-process JAX job when `runtime.distributed` says so.

    Must run before JAX computes anything (it fixes the set of devices). Safe to call twice.
    Returns whether the distributed runtime is up.

    Args:
        cfg: kerasft.config.RuntimeConfig.
    """
    import jax

    if jax.distributed.is_initialized():
        return True
    if cfg.distributed == "off" or (cfg.distributed == "auto" and not multi_process_environment(cfg)):
        return False
    address = cfg.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    count = cfg.num_processes or _env_int("JAX_NUM_PROCESSES")
    index = cfg.process_id if cfg.process_id >= 0 else _env_int("JAX_PROCESS_ID")
    # CPU devices of different processes talk through gloo (JAX's CPU default has no
    # cross-process collectives); GPU and TPU clients ignore this setting.
    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    try:
        jax.distributed.initialize(coordinator_address=address, num_processes=count, process_id=index)
    except (RuntimeError, ValueError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise KerasftError(
            f"runtime.distributed={cfg.distributed}: jax.distributed.initialize failed: {first_line} (set "
            "runtime.coordinator_address, num_processes and process_id, or JAX_COORDINATOR_ADDRESS, "
            "JAX_NUM_PROCESSES and JAX_PROCESS_ID)"
        ) from None
    print(f"distributed: process {jax.process_index()} of {jax.process_count()}, "
          f"{jax.local_device_count()} local of {jax.device_count()} devices", flush=True)
    return True


def multi_process_environment(cfg) -> bool:
    """Whether the config or the environment describes a job of more than one process."""
    env = os.environ
    if cfg.coordinator_address or env.get("JAX_COORDINATOR_ADDRESS"):
        return True
    if (cfg.num_processes or _env_int("JAX_NUM_PROCESSES") or 1) > 1:
        return True
    if _env_int("SLURM_NTASKS") and _env_int("SLURM_NTASKS") > 1 and "SLURM_JOB_ID" in env:
        return True
    if "OMPI_MCA_orte_hnp_uri" in env:
        return True
    hosts = env.get("TPU_WORKER_HOSTNAMES") or env.get("TPU_PROCESS_ADDRESSES") or ""
    return len([h for h in hosts.split(",") if h.strip()]) > 1


def process_index() -> int:
    """This process's index in a multi-process job (0 when alone)."""
    import jax

    return jax.process_index()


def process_count() -> int:
    """How many processes share the devices (1 without a distributed runtime)."""
    import jax

    return jax.process_count()


def is_primary() -> bool:
    """Whether this process writes the run's files: logs, metrics, reports, exports, the config."""
    return process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process of a multi-process job gets here; nothing when alone."""
    if process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def _env_int(name: str) -> int | None:
    value = os.environ.get(name, "").strip()
    if not value:
        return None
    if not value.lstrip("-").isdigit():
        raise KerasftError(f"{name}={value!r}: expected a whole number")
    return int(value)


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


def reset_peak_rss() -> bool:
    """Resets this process's peak resident memory (Linux VmHWM) to its current RSS, so that a
    later peak_rss_bytes() measures only what runs in between. False where that cannot be done."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
    except OSError:
        return False
    return True


def peak_rss_bytes() -> int:
    """Peak resident memory since the last reset_peak_rss() (or since the process started)."""
    try:
        return proc_status("VmHWM")
    except (OSError, KerasftError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def proc_status(key: str) -> int:
    """A size field of /proc/self/status (VmRSS, VmHWM ...) in bytes."""
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise KerasftError(f"/proc/self/status has no {key}")
