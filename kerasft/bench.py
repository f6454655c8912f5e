"""The accelerator acceptance run (`kerasft bench --accelerator`): does the training step kerasft
plans run on this GPU or TPU as planned, how fast, and computing the same numbers?

One process, no download, meant to take under 8 minutes on one GPU or one TPU host:
- the step: a Gemma-2-2B-architecture backbone with random bfloat16 weights, LoRA r16 (alpha 32) on
  query and value, batch B x 1024 tokens with the loss on every position. It is the trainer's step
  (kerasft.train.loop.build_step), and kerasft.train.plan plans it first without the device (XLA's
  CUDA compiler on the card's description in kerasft/gpu_targets/, the TPU compiler on a TPU): B
  starts at 8 and halves until the plan fits, so what is planned is what runs;
- real tokens/s, and MFU: the step's matrix-product FLOPs (step_products) / median step time / the
  chip's dense bfloat16 peak (PEAK_BF16, with sources);
- the device's peak memory (peak_bytes_in_use of device.memory_stats()) next to the plan's peak;
- the first losses with kerasft's attention and with keras-hub's fused attention path forced, from
  the same weights and batches (off TPUs both without Gemma 2's attention soft cap, which keras
  passes to the fused op on TPUs only);
- a tiny Gemma 2 model with non-zero LoRA exported to Hugging Face and checked in transformers
  (float64, on the CPU) against logits computed on the device.
It writes acceptance.json and acceptance.md (a markdown table). `--tiny` runs the same on the tiny
Gemma 2 preset of kerasft.testing: what the default test suite runs on CPU, in seconds.
"""

from __future__ import annotations

import json
import re
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from kerasft.config import load_config
from kerasft.errors import KerasftError
from kerasft.runtime import init_backend

# Dense (no sparsity) bfloat16 matrix peak of one JAX device, by device_kind: (pattern, FLOP/s,
# plan target key, source). A TPU v3 chip is two JAX devices (one per TensorCore); v4, v5e and
# v6e chips are one each.
PEAK_BF16 = [
    (r"H100.*PCIe", 756e12, "h100", "NVIDIA H100 Tensor Core GPU datasheet: H100 PCIe BF16 1,513 TFLOPS with "
                                    "sparsity, half of it dense"),
    (r"H100", 989e12, "h100", "NVIDIA H100 Tensor Core GPU datasheet: H100 SXM BF16 1,979 TFLOPS with sparsity, "
                              "half of it dense"),
    (r"H200", 989e12, "h200", "NVIDIA H200 Tensor Core GPU datasheet: BF16 1,979 TFLOPS with sparsity, half dense"),
    (r"A100.*40GB", 312e12, "a100-40g", "NVIDIA A100 Tensor Core GPU datasheet: BF16 Tensor Core 312 TFLOPS"),
    (r"A100", 312e12, "a100-80g", "NVIDIA A100 Tensor Core GPU datasheet: BF16 Tensor Core 312 TFLOPS"),
    (r"\bL4\b", 121e12, "l4", "NVIDIA L4 Tensor Core GPU datasheet: BF16 242 TFLOPS with sparsity, half dense"),
    (r"RTX 4090", 165.2e12, "4090", "NVIDIA Ada Lovelace GPU architecture whitepaper, GeForce RTX 4090: peak BF16 "
                                    "Tensor TFLOPS with FP32 accumulate 165.2 (330.4 with sparsity)"),
    (r"\bT4\b", 65e12, "t4", "NVIDIA T4 datasheet: mixed precision (FP16/FP32) 65 TFLOPS; Turing has no bfloat16 "
                             "tensor cores, so a bfloat16 step runs converted and cannot reach it"),
    (r"TPU v3", 61.5e12, "tpu-v3-8", "Cloud TPU system architecture: v3 chip 123 TFLOPS bf16, 2 TensorCores"),
    (r"TPU v4", 275e12, None, "Cloud TPU v4 documentation: 275 TFLOPS bf16 per chip"),
    (r"TPU v5 ?lite|TPU v5e", 197e12, "tpu-v5e-8", "Cloud TPU v5e documentation: 197 TFLOPS bf16 per chip"),
    (r"TPU v6 ?lite|TPU v6e", 918e12, None, "Cloud TPU v6e (Trillium) documentation: 918 TFLOPS bf16 per chip"),
]
ARCHITECTURE = "gemma2_2b_en"  # keras-hub's preset name: its architecture, not its weights


def chip_peak(device_kind: str) -> tuple[float | None, str | None, str]:
    """(dense bfloat16 FLOP/s, plan target key, source) of a JAX device_kind; (None, None, "")
    for a device the table does not know (a CPU)."""
    for pattern, flops, target, source in PEAK_BF16:
        if re.search(pattern, device_kind):
            return flops, target, source
    return None, None, ""


def step_products(dims: dict, batch: int, seq: int, targets: int, chunk: int) -> list[tuple[str, tuple[int, int, int], int]]:
    """(name, (m, k, n), times per step) for every matrix product of one LoRA training step of a Gemma
    backbone: B x S tokens, `targets` positions through the vocabulary head (in chunks of `chunk`).

    Forward projections of every layer, the same products again for the input gradients (the base is
    frozen: no weight gradients), attention scores and values forward plus their two backward products
    each, and the head twice (logits, hidden-state gradient). LoRA's rank-r products (under 1% of the
    FLOPs at rank 8) are left out. XLA's cost analysis counts a loop body once, so it cannot count a
    chunked head; this count can.

    Args:
        dims: the backbone's constructor arguments (vocabulary_size, num_layers, num_query_heads,
            num_key_value_heads, hidden_dim, head_dim, intermediate_dim) and "ffw_dim", the width of
            one feed-forward projection (keras-hub's Gemma 1/2 intermediate_dim is twice it).
    """
    tokens, hidden, layers = batch * seq, dims["hidden_dim"], dims["num_layers"]
    q, kv = dims["num_query_heads"] * dims["head_dim"], dims["num_key_value_heads"] * dims["head_dim"]
    ffw = dims["ffw_dim"]
    products = []
    for name, (m, k, n) in [("q projection", (tokens, hidden, q)), ("k projection", (tokens, hidden, kv)),
                            ("v projection", (tokens, hidden, kv)), ("attention output", (tokens, q, hidden)),
                            ("ffw gate", (tokens, hidden, ffw)), ("ffw up", (tokens, hidden, ffw)),
                            ("ffw down", (tokens, ffw, hidden))]:
        products.append((f"{name} (fwd)", (m, k, n), layers))
        products.append((f"{name} (input grad)", (m, n, k), layers))
    heads = batch * dims["num_query_heads"]
    products.append(("attention scores", (seq, dims["head_dim"], seq), 2 * layers * heads))
    products.append(("attention values", (seq, seq, dims["head_dim"]), 2 * layers * heads))
    rows = min(chunk, targets)
    head_calls = -(-targets // rows)
    products.append(("vocabulary head logits", (rows, hidden, dims["vocabulary_size"]), head_calls))
    products.append(("vocabulary head input grad", (rows, dims["vocabulary_size"], hidden), head_calls))
    return products


def backbone_dims(backbone) -> dict:
    """step_products' dims of a keras-hub Gemma backbone."""
    dims = {key: getattr(backbone, key) for key in ("vocabulary_size", "num_layers", "num_query_heads",
                                                    "num_key_value_heads", "hidden_dim", "head_dim", "intermediate_dim")}
    is_gemma3 = type(backbone).__name__.startswith("Gemma3")
    dims["ffw_dim"] = dims["intermediate_dim"] if is_gemma3 else dims["intermediate_dim"] // 2
    return dims


def step_flops(backbone, batch: int, seq: int, targets: int) -> float:
    """Matrix-product FLOPs of one training step (step_products), the numerator of MFU."""
    from kerasft.train.loss import FUSED_ABOVE, LOSS_CHUNK

    chunk = LOSS_CHUNK if targets > FUSED_ABOVE else targets
    return sum(2.0 * m * k * n * times for _, (m, k, n), times in
               step_products(backbone_dims(backbone), batch, seq, targets, chunk))


def acceptance_run(out_dir: str | Path, *, tiny: bool = False, batch: int = 0, seq: int = 0, steps: int = 0,
                   loss_steps: int = 3) -> dict:
    """Runs the acceptance run on this machine's first device and writes acceptance.json and
    acceptance.md into out_dir. Returns the JSON's dict.

    Args:
        tiny: the tiny Gemma 2 preset instead of the 2B architecture (defaults: batch 2, sequence
            64, 4 steps): checks the harness on any machine.
        batch: rows per step; default 8 (2 tiny), halved until the deviceless plan fits.
        seq: sequence length; default 1024 (64 tiny).
        steps: training steps timed after two warm-up steps; default 10 (4 tiny).
        loss_steps: how many first losses each attention path reports.
    """
    keras = init_backend(seed=0)
    import jax

    from kerasft.train.plan import format_plan, plan_step

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="kerasft-acceptance-"))
    seq = seq or (64 if tiny else 1024)
    steps = steps or (4 if tiny else 10)
    device = jax.devices()[0]
    peak_flops, target_key, peak_source = chip_peak(device.device_kind)
    plan_target = target_key or ("cpu" if device.platform == "cpu" else None)
    from kerasft.testing import build_tiny_preset

    tiny_preset = build_tiny_preset("gemma2", work / "tiny_gemma2")  # the export check's model too
    preset = str(tiny_preset) if tiny else ARCHITECTURE
    started = time.perf_counter()
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "device_kind": device.device_kind,
              "platform": device.platform, "device_count": jax.device_count(), "jax": jax.__version__,
              "keras": keras.__version__,
              "model": f"{'tiny Gemma 2 preset' if tiny else ARCHITECTURE} architecture, random bfloat16 weights",
              "lora": "r16 alpha 32 on query, value", "sequence_length": seq, "peak_bf16_flops": peak_flops,
              "peak_source": peak_source}

    # The deviceless plan of the step, at the largest of 8, 4, 2, 1 rows (tiny: 2, 1) that fits.
    batch = batch or (2 if tiny else 8)
    plan, plan_error = None, None
    while plan_target is not None:
        try:
            plan = plan_step(_run_config(preset, batch, seq), plan_target, search=False)
        except Exception as err:  # the run still measures; the report says why there is no plan
            plan_error = f"{type(err).__name__}: {(str(err).strip().splitlines() or [''])[0]}"
            break
        if plan.fits or batch == 1:
            break
        batch //= 2
    cfg = _run_config(preset, batch, seq)
    result["batch_size"] = batch
    if plan is not None:
        result["plan"] = {"target": plan_target, "compiler": plan.compiler, "compiled_for": plan.compiled_for,
                          "peak_bytes": plan.step.peak, "usable_bytes": plan.usable, "fits": plan.fits}
        (out / "plan.txt").write_text(format_plan(plan, plan_target) + "\n")
    else:
        result["plan"] = {"target": None, "not_planned": plan_error or f"no plan target for {device.device_kind}"}

    # The step as the trainer runs it: kerasft's attention (keras-hub's, and the copy-free multi-query
    # layout where it applies), timed.
    backbone = _random_backbone(cfg, tiny_preset if tiny else None)
    initial = [np.asarray(v.value) for v in backbone.trainable_variables]  # LoRA A random, B zero
    batches = _batches(cfg, backbone, max(2 + steps, loss_steps))
    memory_before = _memory_stats(device)
    losses, times = _train(backbone, cfg, initial, batches, loss_steps, timed_from=2)
    memory = _memory_stats(device)
    median = statistics.median(times)
    tokens = batch * seq  # every row is full length: all tokens are real
    flops = step_flops(backbone, batch, seq, seq)
    result["step"] = {"median_step_s": median, "tokens_per_s": tokens / median, "model_flops_per_step": flops,
                      "achieved_flops": flops / median, "mfu": flops / median / peak_flops if peak_flops else None,
                      "timed_steps": len(times)}
    result["memory"] = {"peak_bytes_in_use": memory.get("peak_bytes_in_use"),
                        "bytes_in_use_before_step": memory_before.get("bytes_in_use"),
                        "planned_peak_bytes": plan.step.peak if plan is not None else None,
                        "planned_over_measured": (plan.step.peak / memory["peak_bytes_in_use"]
                                                  if plan is not None and memory.get("peak_bytes_in_use") else None),
                        "note": None if memory else f"{device.platform} reports no memory_stats()"}

    # keras-hub's fused attention path (jax.nn.dot_product_attention: cuDNN on GPUs, splash on TPUs),
    # forced on, from the same initial weights and batches. Off TPUs keras refuses the fused op with
    # Gemma 2's attention soft cap, so there both paths run without it (the same model twice).
    attention_layers = [block.attention for block in backbone.transformer_layers]
    keras_hub_would_fuse = attention_layers[0]._use_fused_attention_op()
    soft_caps = [layer.logit_soft_cap for layer in attention_layers]
    caps_off = device.platform != "tpu" and any(cap is not None for cap in soft_caps)
    reference_losses = losses
    if caps_off:
        for layer in attention_layers:
            layer.logit_soft_cap = None
        reference_losses, _ = _train(backbone, cfg, initial, batches[:loss_steps], loss_steps, timed_from=loss_steps)
    for layer in attention_layers:
        layer._use_fused_attention_op = lambda: True
    fused_losses, _ = _train(backbone, cfg, initial, batches[:loss_steps], loss_steps, timed_from=loss_steps)
    for layer, cap in zip(attention_layers, soft_caps):
        del layer._use_fused_attention_op
        layer.logit_soft_cap = cap
    differences = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(reference_losses, fused_losses)]
    result["attention"] = {"losses": losses, "kerasft_losses": reference_losses, "fused_losses": fused_losses,
                           "max_relative_difference": max(differences), "soft_cap_off_in_comparison": caps_off,
                           "keras_hub_chooses_fused_here": bool(keras_hub_would_fuse)}
    del backbone
    result["hf_export_parity"] = _hf_parity(tiny_preset, work)
    result["seconds"] = time.perf_counter() - started
    (out / "acceptance.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "acceptance.md").write_text(format_acceptance(result))
    return result


def _run_config(preset: str, batch: int, seq: int):
    return load_config(None, [f"model.preset={preset}", "model.dtype=bfloat16", "lora.rank=16", "lora.alpha=32",
                              "lora.targets=[query,value]", "lora.trainable_tokens=[]", f"data.sequence_length={seq}",
                              f"train.batch_size={batch}", "train.warmup_ratio=0"])


def _random_backbone(cfg, tiny_preset: Path | None = None):
    """The configured architecture with random weights on the device (no download), LoRA and the
    attention layout as load_model and the plan give them. The tiny preset is loaded instead (its
    weights are random too): building it a second time would compile every initializer again."""
    import keras_hub

    from kerasft.models.attention import use_mqa_layout
    from kerasft.models.lora import apply_lora
    from kerasft.models.presets import load_model
    from kerasft.train.plan import backbone_spec

    if tiny_preset is not None:
        backbone = load_model(cfg.model).backbone  # cfg.model.preset is the tiny preset
    else:
        class_name, kwargs = backbone_spec(cfg.model)
        backbone = getattr(keras_hub.models, class_name)(**kwargs, dtype=cfg.model.dtype)
    apply_lora(backbone, cfg.lora)
    use_mqa_layout(backbone)
    return backbone


def _batches(cfg, backbone, count: int) -> list[dict]:
    """`count` steps of the plan's synthetic batch (random full-length rows, loss on every
    position): one batch, so each step has the same shapes and work, and both attention paths
    see the same data."""
    from kerasft.train.plan import synthetic_batch

    vocabulary = backbone.token_embedding.embeddings.shape[0]
    seq = cfg.data.sequence_length
    return [synthetic_batch(cfg, cfg.train.batch_size, seq, seq, vocabulary)] * count


def _train(backbone, cfg, initial: list, batches: list[dict], loss_steps: int, timed_from: int) -> tuple[list, list]:
    """Runs the trainer's step over `batches` from the `initial` adapters: the first `loss_steps`
    losses and the seconds of each step from `timed_from` on (earlier ones compile and warm up)."""
    import jax
    import jax.numpy as jnp

    from kerasft.train.loop import TrainSpec, build_step

    train_step = build_step(backbone, TrainSpec.of(cfg), total_steps=1000)  # one schedule for every run
    for variable, value in zip(backbone.trainable_variables, initial):
        variable.assign(jnp.asarray(value))
    trainable, opt_state, non_trainable = train_step.state(backbone)
    losses, times = [], []
    for i, batch in enumerate(batches):
        batch = jax.device_put(batch)
        start = time.perf_counter()
        trainable, opt_state, stats = train_step.fn(trainable, opt_state, non_trainable, batch, *train_step.rng(i))
        loss = float(stats["loss"])  # waits for the step
        if i >= timed_from:
            times.append(time.perf_counter() - start)
        if i < loss_steps:
            losses.append(loss)
    return losses, times


def _memory_stats(device) -> dict:
    try:
        return dict(device.memory_stats() or {})
    except Exception:  # some backends raise instead of returning None
        return {}


def _hf_parity(tiny_preset: Path, work: Path) -> dict:
    """The tiny Gemma 2 model with LoRA (random non-zero A and B) on every projection, exported to
    Hugging Face and read back by transformers in float64 on the CPU, against logits computed on
    this device at JAX's default matmul precision and (on a GPU or TPU, where the default may
    round float32 products through TF32 or bfloat16 passes) at full float32 precision."""
    import jax

    from kerasft.config import LoraConfig, ModelConfig
    from kerasft.export.hf import export_hf
    from kerasft.export.verify import verify_hf_export
    from kerasft.models.lora import apply_lora, lora_layers
    from kerasft.models.presets import load_model

    loaded = load_model(ModelConfig(preset=str(tiny_preset)))
    backbone = loaded.backbone
    apply_lora(backbone, LoraConfig(rank=4, alpha=8.0, targets=("query", "key", "value", "attention_output",
                                                                 "ffw_gating", "ffw_gating_2", "ffw_linear")))
    rng = np.random.default_rng(7)
    for layer in lora_layers(backbone):
        for variable in (layer.lora_kernel_a, layer.lora_kernel_b):
            variable.assign(rng.normal(0, 0.2, size=variable.shape).astype("float32"))
    export_hf(backbone, loaded.tokenizer, work / "parity_hf")
    # Longer than the tiny model's sliding window, so local attention is checked too.
    ids = rng.integers(4, backbone.vocabulary_size, (2, 48))
    device = jax.devices()[0]
    report = {"device": device.device_kind}
    precisions = [("default_precision", None)] + ([] if device.platform == "cpu" else [("float32_precision", "float32")])
    for name, precision in precisions:
        try:
            if precision is None:
                report[name] = verify_hf_export(work / "parity_hf", backbone, ids)
            else:
                with jax.default_matmul_precision(precision):
                    report[name] = verify_hf_export(work / "parity_hf", backbone, ids)
        except KerasftError as err:  # transformers missing: the report says so
            report[name] = {"ok": None, "not_checked": str(err)}
    return report


def format_acceptance(result: dict) -> str:
    """The acceptance run as a markdown table (acceptance.md)."""
    step, memory, attention, parity = result["step"], result["memory"], result["attention"], result["hf_export_parity"]
    plan = result["plan"]

    def gib(value):
        if value is None:
            return "not reported"
        return f"{value / 2**30:.2f} GiB" if value >= 2**30 else f"{value / 2**20:.1f} MiB"

    def check(report):
        if report.get("ok") is None:
            return f"not checked: {report.get('not_checked')}"
        return (f"{'ok' if report['ok'] else 'FAILED'}: max abs diff {report['max_abs_diff']:.2e} "
                f"(tolerance {report['tolerance']:.2e}, logit scale {report['logit_scale']:.2f})")

    rows = [
        ("device", f"{result['device_kind']} ({result['platform']}, {result['device_count']} device(s) on the host; "
                   "one used)"),
        ("date, jax, keras", f"{result['date']}, jax {result['jax']}, keras {result['keras']}"),
        ("model", f"{result['model']}; LoRA {result['lora']}"),
        ("step", f"batch {result['batch_size']} x {result['sequence_length']} tokens, loss on every position"),
        ("tokens/s", f"{step['tokens_per_s']:,.0f} (median step {step['median_step_s'] * 1000:.1f} ms over "
                     f"{step['timed_steps']} steps)"),
        ("MFU", "no bfloat16 peak for this device" if step["mfu"] is None else
                f"{step['mfu']:.1%} ({step['achieved_flops'] / 1e12:.1f} of {result['peak_bf16_flops'] / 1e12:.1f} "
                f"TFLOP/s dense bfloat16)"),
        ("peak device memory (measured)", gib(memory["peak_bytes_in_use"])),
        ("planned peak, deviceless", f"not planned: {plan['not_planned']}" if plan.get("target") is None else
         f"{gib(plan['peak_bytes'])} ({plan['compiler']} compiler for {plan['compiled_for']}, target {plan['target']})"
         + ("" if memory["planned_over_measured"] is None else f"; planned/measured {memory['planned_over_measured']:.2f}")),
        ("first losses of the step", ", ".join(f"{x:.4f}" for x in attention["losses"])),
        ("first losses, kerasft attention" + (" (soft cap off)" if attention["soft_cap_off_in_comparison"] else ""),
         ", ".join(f"{x:.4f}" for x in attention["kerasft_losses"])),
        ("first losses, keras-hub fused path" + (" (soft cap off)" if attention["soft_cap_off_in_comparison"] else ""),
         ", ".join(f"{x:.4f}" for x in attention["fused_losses"])
         + f" (max relative difference {attention['max_relative_difference']:.1e})"),
        ("HF export parity (tiny Gemma 2), default precision", check(parity["default_precision"])),
        ("HF export parity (tiny Gemma 2), float32 precision",
         check(parity["float32_precision"]) if "float32_precision" in parity else "the default on a CPU"),
        ("whole run", f"{result['seconds']:.0f} s"),
    ]
    lines = ["| | |", "| --- | --- |"] + [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines) + "\n"
