"""Memory plan: will this training step fit on a target device, and with what batch size?

The backbone is built inside `jax.eval_shape` (every variable's shape, nothing allocated), the
training step of loop.py is lowered on ShapeDtypeStructs (sharded as runtime.mesh says) and
compiled, and XLA's memory analysis gives the per-device peak: arguments + outputs - donated
aliases + temporaries. What is planned is the step that runs.

Which compiler: a TPU target with libtpu installed (the tpu-plan extra) compiles with the TPU
compiler for abstract TPU devices; a GPU target with the CUDA plugin installed (the gpu-plan
extra) with XLA's CUDA compiler for abstract GPUs described by kerasft/gpu_targets/ (no GPU
needed; JAX must start with JAX_PLATFORMS=cpu, which `kerasft plan` sets). Otherwise the step
compiles on this machine's backend: on CPU the compiler upcasts bfloat16 matmuls to float32, so
CPU figures overstate GPU/TPU memory for bfloat16 models (the report says so).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import jax
import numpy as np

from kerasft.data.pipeline import TokenizedSet, make_batch
from kerasft.errors import KerasftError
from kerasft.models.attention import use_mqa_layout
from kerasft.models.families import KNOWN_ARCHITECTURES
from kerasft.models.lora import apply_lora
from kerasft.models.presets import load_model
from kerasft.models.quant import parameter_count, quantize_abstract
from kerasft.runtime import (GIB, Target, batch_shards, cuda_compiler_installed, gpu_target_config, init_backend,
                             peak_rss_bytes, proc_status, reset_peak_rss, resolve_target, set_distribution)
from kerasft.train.loop import TrainSpec, accumulation_batches, build_step

HEADROOM = 0.9  # runtimes and fragmentation take a share of device memory; plan to 90 %
# What the 10 % held back on a GPU covers: XLA's figure is the program's own buffers only.
GPU_MARGIN_COVERS = ("the CUDA context and the cuBLAS/cuDNN handles (a few hundred MiB, outside JAX's pool), the "
                     "allocator's fragmentation, and the cuBLAS and autotuning workspaces that a compile without a GPU "
                     "does not size")


@dataclass
class StepMemory:
    """Per-device bytes of one compiled training step."""

    batch_size: int
    peak: int
    arguments: int
    outputs: int
    aliased: int
    temporaries: int
    weights: int
    trainable_and_optimizer: int
    logits: int
    optimizer_state: int = 0  # of trainable_and_optimizer: train.optimizer's state (train.moments for adamw)


@dataclass
class Plan:
    target: Target
    usable: int
    compiler: str
    devices: int
    mesh: str
    sequence_length: int
    targets_per_row: int
    parameters: int
    trainable_parameters: int
    step: StepMemory
    quantize: str = "none"
    remat: str = "none"
    optimizer: str = "adamw"  # train.optimizer, with train.moments for adamw ("adamw, int8 moments")
    compiled_for: str = ""  # the abstract device the compiler targeted (its device_kind), or this machine's backend
    margin: int = 0  # bytes per device held back from the target's memory (HEADROOM)
    margin_covers: str = ""
    largest_batch: int | None = None
    tried: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return self.step.peak <= self.usable


def backbone_spec(model_cfg) -> tuple[str, dict]:
    """(keras-hub backbone class name, constructor kwargs) for a ModelConfig's preset, offline.

    Known keras-hub preset names and `embedded` come from KNOWN_ARCHITECTURES; a local
    keras-hub preset folder from its config.json.
    """
    preset = model_cfg.preset or "embedded"
    if preset in KNOWN_ARCHITECTURES:
        class_name, kwargs = KNOWN_ARCHITECTURES[preset]
        return class_name, dict(kwargs)
    config_path = Path(preset).expanduser() / "config.json"
    if not config_path.is_file():
        raise KerasftError(
            f"model.preset: cannot plan {preset!r} offline; use a local keras-hub preset folder or one of "
            + ", ".join(sorted(k for k in KNOWN_ARCHITECTURES if "instruct" not in k))
        )
    try:
        config = json.loads(config_path.read_text())
        class_name, kwargs = config["class_name"], dict(config["config"])
    except (json.JSONDecodeError, KeyError, TypeError):
        raise KerasftError(f"{config_path}: not a keras-hub preset config (Hugging Face folders cannot be planned)") from None
    for key in ("name", "trainable", "dtype"):
        kwargs.pop(key, None)
    return class_name, kwargs


def abstract_backbone(model_cfg, lora_cfg):
    """Builds the backbone with LoRA inside jax.eval_shape: real variables' shapes, no memory.
    model.quantize gives the projections their int8/int4 variables, so their bytes count."""
    import keras_hub  # not at the top: keras must be imported after runtime.init_backend picks JAX

    class_name, kwargs = backbone_spec(model_cfg)
    if class_name not in ("GemmaBackbone", "Gemma3Backbone", "LlamaBackbone", "Llama3Backbone"):
        raise KerasftError(f"model.preset: {class_name} is not a Gemma or Llama backbone")
    built = {}

    def build():
        backbone = getattr(keras_hub.models, class_name)(**kwargs, dtype=model_cfg.dtype)
        quantize_abstract(backbone, model_cfg.quantize)
        apply_lora(backbone, lora_cfg)
        use_mqa_layout(backbone)  # as load_model does: the planned step is the one that runs
        built["backbone"] = backbone
        return [v.value for v in backbone.weights]

    jax.eval_shape(build)
    return built["backbone"]


def plan_step(cfg, target_name: str, targets_per_row: int | None = None, search: bool = True,
              devices: int = 0) -> Plan:
    """Plans the training step of a RunConfig on a target and searches the largest batch that fits.

    Args:
        cfg: kerasft.config.RunConfig (model, lora, data.sequence_length, train, runtime).
        target_name: a key of TARGETS, or N x a GPU key ("4xa100-80g").
        targets_per_row: loss positions per row (the response length); default sequence_length,
            the worst case.
        search: compile more batch sizes to find the largest that fits.
        devices: GPUs of a GPU target (kerasft plan --devices); 0: the target's own count.

    keras' global distribution is set for the plan (abstract TPU or GPU devices) and put back as
    it was afterwards, so a model loaded later in the process lands on real devices.
    """
    keras = init_backend()
    previous = keras.distribution.distribution()
    try:
        return _plan_step(cfg, target_name, targets_per_row, search, devices)
    finally:
        keras.distribution.set_distribution(previous)


def _plan_step(cfg, target_name: str, targets_per_row: int | None, search: bool, devices: int) -> Plan:
    key, target = resolve_target(target_name, devices)
    usable = int((target.bytes_per_device or _available_memory()) * HEADROOM)
    abstract_devices = tpu_topology_devices(key) or gpu_topology_devices(target)
    runtime = cfg.runtime
    if abstract_devices and runtime.mesh == "none":  # one abstract device; without a sharding jit would pick the CPU
        abstract_devices, runtime = abstract_devices[:1], dataclasses.replace(runtime, mesh="data", mesh_shape="auto")
    distribution = set_distribution(runtime, devices=abstract_devices)
    backbone = abstract_backbone(cfg.model, cfg.lora)
    sequence_length = cfg.data.sequence_length
    k = min(targets_per_row or sequence_length, sequence_length)
    shards = batch_shards()
    notes = []
    if abstract_devices:
        backend = "tpu" if abstract_devices[0].platform == "tpu" else "cuda"
        compiled_for = abstract_devices[0].device_kind
    else:
        backend = jax.default_backend()
        compiled_for = jax.devices()[0].device_kind
    device_count = len(abstract_devices) if abstract_devices else len(jax.devices())
    if backend == "tpu" and abstract_devices:
        notes.append(f"compiled with the TPU compiler (libtpu) for {device_count} abstract {compiled_for} "
                     f"devices (topology {TPU_TOPOLOGIES[key]}): no TPU needed, the figures are the TPU's own")
    elif backend == "cuda":
        notes.append(f"compiled with XLA's CUDA compiler for {device_count} abstract {compiled_for} "
                     f"({_compute_capability(target)}; kerasft/gpu_targets/{target.gpu_spec}): no GPU needed, the "
                     "figures are the GPU compiler's own; without a GPU it does not autotune, so cuBLAS workspaces "
                     "may differ by a few MiB")
    elif backend != target.kind:
        notes.append(f"compiled with the {backend} compiler, not {target.kind}'s"
                     + ("; it upcasts bfloat16 matmuls to float32, so bfloat16 plans overstate memory"
                        if backend == "cpu" and "bfloat16" in cfg.model.dtype else ""))
    if target.kind == "tpu" and backend != "tpu":
        notes.append("exact TPU plans need the TPU compiler on abstract TPU devices: pip install 'jax[tpu]' "
                     "(libtpu from PyPI, no TPU needed) and plan again")
    if target.kind == "gpu" and backend not in ("cuda", "gpu"):
        notes.append("exact GPU plans need XLA's CUDA compiler: pip install 'kerasft[gpu-plan]' (the CUDA plugin of "
                     "jax, no GPU or CUDA driver needed) and plan again")
    if device_count != target.devices:
        notes.append(f"planned on {device_count} device(s); {target.name} has {target.devices}")
    if cfg.runtime.mesh == "none" and target.devices > 1:
        notes.append("runtime.mesh is none: one device holds everything; try runtime.mesh=model")
    margin_covers = ""
    if target.kind == "gpu":
        margin_covers = GPU_MARGIN_COVERS
        notes.append(f"usable is {int(HEADROOM * 100)} % of the card; the {_gib(usable / HEADROOM - usable)} held back "
                     f"covers {GPU_MARGIN_COVERS}. JAX's own pool is 75 % of the card unless "
                     "XLA_PYTHON_CLIENT_MEM_FRACTION says more (scripts/launch_local_gpu.sh sets 0.92)")

    def measure(batch_size: int) -> StepMemory:
        return _compile_step(backbone, cfg, distribution, batch_size, sequence_length, k)

    step = measure(cfg.train.batch_size)
    plan = Plan(target=target, usable=usable, compiler=backend, devices=device_count, compiled_for=compiled_for,
                margin=int(usable / HEADROOM) - usable, margin_covers=margin_covers,
                mesh=f"{cfg.runtime.mesh} {cfg.runtime.mesh_shape}", sequence_length=sequence_length, targets_per_row=k,
                parameters=parameter_count(backbone),
                trainable_parameters=sum(_size(v) for v in backbone.trainable_variables), step=step, notes=notes,
                quantize=cfg.model.quantize, remat=cfg.train.remat,
                optimizer=cfg.train.optimizer + (f", {cfg.train.moments} moments" if cfg.train.optimizer == "adamw" else ""))
    plan.tried.append((step.batch_size, step.peak))
    if not plan.fits:
        if cfg.train.remat == "none":
            notes.append("train.remat=full recomputes block activations in the backward pass: smaller temporaries")
        if cfg.model.quantize == "none":
            notes.append("model.quantize=int8 (or int4) stores the frozen projections in 1 (or 1/2) byte per weight")
    if search:
        plan.largest_batch = _largest_batch(measure, plan, shards)
    return plan


# Abstract TPU topologies of the TPU targets: with libtpu installed (pip install 'jax[tpu]'),
# jax.experimental.topologies describes their devices on any machine and the real TPU compiler
# compiles the step for them (as maxtext's train_compile does).
TPU_TOPOLOGIES = {"tpu-v3-8": "v3:2x2", "tpu-v5e-8": "v5e:2x4"}


def tpu_topology_devices(target_name: str):
    """The abstract devices of a TPU target for the TPU compiler, or None: not a TPU target, no
    libtpu installed, or real TPUs present (then the plan compiles on them)."""
    import importlib.util

    if target_name not in TPU_TOPOLOGIES or importlib.util.find_spec("libtpu") is None:
        return None
    # libtpu admits one process per machine (/tmp/libtpu_lockfile) unless told otherwise; a plan
    # only compiles, so several may load it side by side. Read when JAX first starts its backends.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    if jax.default_backend() == "tpu":
        return None
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(platform="tpu", topology_name=TPU_TOPOLOGIES[target_name]).devices
    except Exception as err:  # a libtpu that does not match jax raises RuntimeError/XlaRuntimeError
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise KerasftError(f"--target {target_name}: libtpu cannot describe TPU topology "
                           f"{TPU_TOPOLOGIES[target_name]} ({first_line}); install the libtpu that matches jax: "
                           "pip install 'jax[tpu]'") from None


def gpu_topology_devices(target: Target):
    """Abstract GPUs of a GPU target for XLA's CUDA compiler, or None: not a GPU target, or no CUDA
    plugin of jax installed (pip install 'kerasft[gpu-plan]').

    `topology` "1x1xN" is one slice of one host with N GPUs; every input of the step must then be
    sharded over a mesh of these devices, or jit compiles for the CPU instead.
    """
    if target.kind != "gpu" or not target.gpu_spec or not cuda_compiler_installed():
        return None
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(platform="cuda", topology=f"1x1x{target.devices}",
                                            target_config=gpu_target_config(target)).devices
    except NotImplementedError:  # the plugin failed to start (cuInit) and never registered
        raise KerasftError(f"--target: XLA's CUDA compiler is installed but did not start: without a GPU, JAX must "
                           f"start with JAX_PLATFORMS=cpu (kerasft plan sets it unless JAX_PLATFORMS is set); "
                           f"{target.name} was not planned") from None
    except Exception as err:  # a plugin that does not match jax, or a description it cannot parse
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise KerasftError(f"--target: XLA's CUDA compiler refused kerasft/gpu_targets/{target.gpu_spec} "
                           f"({first_line}); install the CUDA plugin that matches jax: pip install "
                           "'kerasft[gpu-plan]'") from None


def _compute_capability(target: Target) -> str:
    import re

    text = gpu_target_config(target)
    major = re.search(r"cuda_compute_capability \{[^}]*major: (\d+)", text)
    minor = re.search(r"cuda_compute_capability \{[^}]*minor: (\d+)", text)
    return f"compute capability {major.group(1) if major else '?'}.{minor.group(1) if minor else 0}"


def _largest_batch(measure, plan: Plan, shards: int, max_compiles: int = 6) -> int | None:
    """Doubles the batch until it does not fit, then bisects; at most `max_compiles` compiles."""
    fits = {b: p <= plan.usable for b, p in plan.tried}
    start = plan.step.batch_size
    good = start if fits[start] else None
    bad = None if fits[start] else start
    compiles = 0
    while compiles < max_compiles:
        if bad is None:
            candidate = good * 2
        elif good is None:
            candidate = max(shards, (bad // 2) // shards * shards)
            if candidate >= bad:
                break
        else:
            candidate = (good + bad) // 2 // shards * shards
            if candidate <= good:
                break
        memory = measure(candidate)
        compiles += 1
        plan.tried.append((candidate, memory.peak))
        if memory.peak <= plan.usable:
            good = candidate
        else:
            bad = candidate
        if good is None and candidate == shards and bad == candidate:
            break
    return good


def _plan_spec(cfg) -> TrainSpec:
    """The run's TrainSpec, with stand-in ids (0, 1, ...) for the trained token rows: only
    their number matters to the step's memory."""
    return TrainSpec.of(cfg, range(len(cfg.lora.trainable_tokens)))


def synthetic_batch(cfg, batch_size: int, sequence_length: int, k: int, vocabulary: int) -> dict:
    """A step batch (make_batch's, as training builds it, with the loss normaliser under
    gradient accumulation) of full-length random rows whose last k tokens carry the loss."""
    numbers = np.random.default_rng(0)
    weights = np.zeros(sequence_length, np.uint8)
    weights[sequence_length - min(k, sequence_length - 1) :] = 1  # the first token predicts nothing
    pairs = cfg.train.objective != "sft"  # dpo / orpo: a pair is two rows (chosen, rejected)
    rows = [(numbers.integers(4, vocabulary, sequence_length), weights) for _ in range(batch_size * (1 + pairs))]
    data = TokenizedSet.from_rows(rows, sequence_length=sequence_length, pairs=pairs)
    if cfg.train.precompute_reference:
        data.reference_logps = np.zeros(len(rows), np.float32)
    batch = make_batch(data, range(batch_size), k, width=sequence_length)
    return accumulation_batches([batch] * cfg.train.grad_accum)[0]


def _compile_step(backbone, cfg, distribution, batch_size: int, sequence_length: int, k: int) -> StepMemory:
    train_step = build_step(backbone, _plan_spec(cfg), total_steps=1000)

    def abstract(variable):
        sharding = None
        if distribution is not None:
            sharding = distribution.get_variable_layout(variable).backend_layout
        return jax.ShapeDtypeStruct(tuple(variable.shape), variable.dtype, sharding=sharding)

    def replicate(struct):  # the token rows' update and the optimizer state live on every device
        return jax.ShapeDtypeStruct(struct.shape, struct.dtype, sharding=replicated)

    replicated = None if distribution is None else _replicated(distribution)
    trainable, opt_state, non_trainable = train_step.state(backbone, leaf=abstract)
    if "token_delta" in trainable:
        trainable["token_delta"] = replicate(trainable["token_delta"])
    opt_state = jax.tree.map(replicate, opt_state)

    def data(value):
        sharding = None if distribution is None else distribution.get_data_layout(value.shape).backend_layout
        return jax.ShapeDtypeStruct(value.shape, value.dtype, sharding=sharding)

    vocabulary = backbone.token_embedding.embeddings.shape[0]
    batch = {key: data(value) for key, value in synthetic_batch(cfg, batch_size, sequence_length, k, vocabulary).items()}
    arguments = sum(_device_bytes(s) for s in jax.tree.leaves([trainable, opt_state, non_trainable, batch]))
    try:
        analysis = train_step.fn.lower(trainable, opt_state, non_trainable, batch, *train_step.rng(0)).compile().memory_analysis()
        sizes = (analysis.argument_size_in_bytes, analysis.output_size_in_bytes, analysis.alias_size_in_bytes,
                 analysis.temp_size_in_bytes)
        # The TPU compiler's own peak: on v3 it equals the sum, on v5e temp_size is 0 and only the
        # peak counts the temporaries. (The CPU compiler's peak field counts arguments only.)
        unexplained = getattr(analysis, "peak_memory_in_bytes", 0) - (sizes[0] + sizes[1] - sizes[2] + sizes[3])
        if unexplained > 0 and any(str(getattr(d, "platform", d)).startswith("tpu") for d in _mesh_devices(distribution)):
            sizes = (*sizes[:3], sizes[3] + unexplained)
    except Exception as err:  # the TPU compiler refuses a program larger than HBM (RESOURCE_EXHAUSTED)
        temporaries = _refused_temporaries(err)
        if temporaries is None:
            raise
        sizes = (arguments, 0, 0, temporaries)  # outputs are donated arguments
    peak = sizes[0] + sizes[1] - sizes[2] + sizes[3]
    per_device_rows = batch_size // batch_shards()
    return StepMemory(
        batch_size=batch_size,
        peak=int(peak),
        arguments=int(sizes[0]),
        outputs=int(sizes[1]),
        aliased=int(sizes[2]),
        temporaries=int(sizes[3]),
        weights=sum(_device_bytes(s) for s in non_trainable),
        trainable_and_optimizer=sum(_device_bytes(s) for s in jax.tree.leaves([trainable, opt_state])),
        optimizer_state=sum(_device_bytes(s) for s in jax.tree.leaves(opt_state)),
        # float32 logits at the loss positions (the step never forms the full-sequence logits)
        logits=int(per_device_rows * k * vocabulary * np.dtype("float32").itemsize),
    )


def _mesh_devices(distribution) -> list:
    return [] if distribution is None else list(distribution.device_mesh.devices.flatten())


def _refused_temporaries(err: Exception) -> int | None:
    """The temporaries' bytes from the TPU compiler's out-of-memory refusal, e.g. "Ran out of memory
    on HBM, the total memory required for HLO temporaries (25.94G) exceeds available HBM (15.48G)";
    None for any other error."""
    import re

    text = str(err)
    found = re.search(r"required for HLO temporaries \(([\d.]+)([KMGT])\)", text)
    if "RESOURCE_EXHAUSTED" not in text or not found:
        return None
    return int(float(found.group(1)) * 1024 ** " KMGT".index(found.group(2)))


def measure_step(cfg, targets_per_row: int | None = None) -> dict:
    """Runs one real training step of the configured model on this host and measures its peak.

    Measured = resident bytes of the step's arguments + the rise of the process's peak RSS
    (VmHWM, reset just before the step) over its RSS before it. Linux only.
    """
    if not reset_peak_rss():  # checked before the slow part; reset again just before the step
        raise KerasftError("--measure needs Linux (/proc/self/clear_refs)")
    loaded = load_model(cfg.model)
    backbone = loaded.backbone  # model.quantize applied by load_model
    apply_lora(backbone, cfg.lora)
    train_step = build_step(backbone, _plan_spec(cfg), total_steps=1000)
    trainable, opt_state, non_trainable = train_step.state(backbone)
    s = cfg.data.sequence_length
    k = min(targets_per_row or s, s)
    vocabulary = backbone.token_embedding.embeddings.shape[0]
    batch = jax.device_put(synthetic_batch(cfg, cfg.train.batch_size, s, k, vocabulary))
    rng = train_step.rng(0)
    compiled = train_step.fn.lower(trainable, opt_state, non_trainable, batch, *rng).compile()
    arguments = sum(x.nbytes for x in jax.tree.leaves([trainable, opt_state, non_trainable, batch]))
    jax.block_until_ready([trainable, opt_state, non_trainable, batch])
    before = proc_status("VmRSS")
    reset_peak_rss()
    out = compiled(trainable, opt_state, non_trainable, batch, *rng)
    jax.block_until_ready(out)
    peak_rise = peak_rss_bytes() - before
    return {"arguments": arguments, "peak_rise": peak_rise, "measured_peak": arguments + peak_rise}


def format_plan(plan: Plan, target_key: str) -> str:
    """The plan as the lines `kerasft plan` prints."""
    step = plan.step
    verdict = "FITS" if plan.fits else "DOES NOT FIT"
    lines = [
        f"target {target_key}: {plan.target.name}; usable {_gib(plan.usable)} per device "
        f"({int(HEADROOM * 100)} % of {_gib(plan.usable / HEADROOM)})",
        f"model: {_count(plan.parameters)} parameters, {_count(plan.trainable_parameters)} trainable (LoRA); "
        f"compiled for {plan.compiler} on {plan.devices} device(s), mesh {plan.mesh}"
        + (f" ({plan.compiled_for})" if plan.compiler in ("cuda", "tpu") else ""),
        f"step: batch {step.batch_size} x sequence {plan.sequence_length}, {plan.targets_per_row} loss positions a row"
        + (", decoder blocks rematerialised (train.remat=full)" if plan.remat == "full" else ""),
        "per device:",
        f"  weights (frozen)               {_gib(step.weights):>11}"
        + (f"  (projections {plan.quantize}, weight-only)" if plan.quantize != "none" else ""),
        f"  trainable + optimizer state    {_gib(step.trainable_and_optimizer):>11}",
        f"    of which optimizer state     {_gib(step.optimizer_state):>11}  ({plan.optimizer})",
        f"  activations and temporaries    {_gib(step.temporaries):>11}  (float32 logits alone: {_gib(step.logits)})",
        f"  peak                           {_gib(step.peak):>11}  (arguments + outputs - donated + temporaries) -> {verdict}",
    ]
    if plan.largest_batch is not None or len(plan.tried) > 1:
        tried = ", ".join(f"{b}: {_gib(p)}" for b, p in sorted(plan.tried))
        best = plan.largest_batch if plan.largest_batch is not None else "none (even the smallest batch does not fit)"
        lines.append(f"largest batch that fits: {best}  (compiled {tried})")
    lines += [f"note: {note}" for note in plan.notes]
    return "\n".join(lines)


def _replicated(distribution):
    from jax.sharding import NamedSharding, PartitionSpec

    mesh = distribution.get_data_layout((1,)).backend_layout.mesh
    return NamedSharding(mesh, PartitionSpec())


def _device_bytes(struct) -> int:
    shape = struct.shape if struct.sharding is None else struct.sharding.shard_shape(struct.shape)
    return int(np.prod(shape, dtype=np.int64)) * np.dtype(struct.dtype).itemsize


def _size(variable) -> int:
    return int(np.prod(variable.shape, dtype=np.int64))


def _available_memory() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def _gib(value: float) -> str:
    if value >= GIB:
        return f"{value / GIB:.2f} GiB"
    return f"{value / 2**20:.1f} MiB"


def _count(value: int) -> str:
    return f"{value / 1e9:.2f} B" if value >= 1e8 else f"{value / 1e6:.3f} M"
