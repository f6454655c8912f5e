"""Training and generation speed of kerasft next to Hugging Face transformers + PEFT, in one run.

    .venv/bin/python scripts/bench.py [--workloads qa,pretrain] [--steps 8] [--json bench.json]
    .venv/bin/python scripts/bench.py --smoke        # tiny random model, seconds: what CI runs

Workloads on the embedded Gemma 3 270M (f32), LoRA r=8 alpha=16 on query and value plus the embedding rows of
the turn tokens (<start_of_turn>, <end_of_turn>: what `kerasft train` trains by default), batch 2, sequence 256:
  qa        SFT on the shipped Spanish QA set: loss on the answer tokens only
  pretrain  continued pretraining on the set's passages: loss on every token

Each framework trains in its own subprocess on the same batches (same token ids, padding and loss
positions), so peak RSS is per framework. kerasft runs the step the trainer runs, built the same way
(kerasft.train.loop.build_step); the peer is transformers' model(..., labels=...) with a PEFT LoRA on
q_proj/v_proj plus the same token rows (trainable_token_indices) and torch AdamW, on our Hugging Face
export of the same weights. Reported:
real (non-padding) tokens/s and median step time after warm-up, peak RSS, achieved FLOP/s (the step's
matrix products counted from the architecture, see step_products, / median step time) against an f32
matmul peak measured in the same run,
kerasft's generation prefill and decode tokens/s, and the ratios. No assertion on any timing.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("KERAS_BACKEND", "jax")

# Below the sys.path and KERAS_BACKEND lines: the script runs from a checkout. None of these imports
# jax, keras or torch at its top: the peer worker's peak RSS must be its own (the kerasft worker
# imports the trainer, which brings jax, itself).
from kerasft.bench import backbone_dims, step_products  # noqa: E402,F401 (bench_matmul_ceiling imports step_products from here)
from kerasft.config import LoraConfig, ModelConfig, TrainConfig, load_config  # noqa: E402
from kerasft.data.pipeline import (  # noqa: E402
    batch_width, epoch_batches, make_batch, tokenize_documents, tokenize_examples)
from kerasft.data.prepare import build_datasets  # noqa: E402
from kerasft.data.records import Example  # noqa: E402
from kerasft.data.template import chat_tokens, resolve_template  # noqa: E402
from kerasft.evaluate.evaluator import system_metrics  # noqa: E402
from kerasft.evaluate.generate import KerasModel  # noqa: E402
from kerasft.export.hf import export_hf  # noqa: E402
from kerasft.models.families import trainable_turn_tokens  # noqa: E402
from kerasft.models.lora import apply_lora  # noqa: E402
from kerasft.models.presets import load_model, load_tokenizer  # noqa: E402
from kerasft.testing import build_tiny_preset  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="embedded")
    parser.add_argument("--workloads", default="qa,pretrain")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per framework and workload")
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--no-peer", action="store_true", help="skip transformers + PEFT")
    parser.add_argument("--smoke", action="store_true", help="tiny random model, 2 steps: checks the harness")
    parser.add_argument("--json", default="")
    parser.add_argument("--worker", choices=["export", "kerasft", "peer"], help=argparse.SUPPRESS)
    parser.add_argument("--work", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return {"export": _export_worker, "kerasft": _kerasft_worker, "peer": _peer_worker}[args.worker](args)

    work = Path(tempfile.mkdtemp(prefix="kerasft-bench-"))
    if args.smoke:
        args.preset = str(build_tiny_preset("gemma3", work / "tiny"))
        args.steps, args.seq, args.workloads = 2, 512, "qa"  # the tiny vocabulary needs long rows
    workloads = [w.strip() for w in args.workloads.split(",") if w.strip()]
    peak = matmul_peak(512 if args.smoke else 2048)
    print(f"f32 matmul peak: {peak / 1e9:.1f} GFLOP/s", flush=True)
    results = {"preset": args.preset, "batch": args.batch, "sequence_length": args.seq, "lora_rank": args.rank,
               "steps": args.steps, "cpu_count": os.cpu_count(), "matmul_peak_flops": peak, "workloads": {}}
    for workload in workloads:
        write_batches(args, workload, work / workload)
    if not args.no_peer:
        _run_worker("export", args, work)
    for workload in workloads:
        folder = work / workload
        row = {"kerasft": _run_worker("kerasft", args, folder)}
        if not args.no_peer:
            row["peer"] = _run_worker("peer", args, folder)
            row["throughput_ratio"] = row["kerasft"]["tokens_per_s"] / row["peer"]["tokens_per_s"]
            row["peak_rss_ratio"] = row["kerasft"]["peak_rss_mib"] / row["peer"]["peak_rss_mib"]
        row["kerasft"]["flops_utilization"] = row["kerasft"]["achieved_flops"] / peak
        results["workloads"][workload] = row
        _print_row(workload, row)
    print(json.dumps(results, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


def matmul_peak(n: int, repeats: int = 10) -> float:
    """Best f32 FLOP/s of an n x n matmul through XLA on this machine, now."""
    return 2 * n**3 / matmul_seconds(n, n, n, repeats)


def matmul_seconds(m: int, k: int, n: int, repeats: int = 10) -> float:
    """Best time of an (m, k) @ (k, n) f32 matmul through XLA (jitted, compiled before timing)."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.PRNGKey(0), (m, k), jnp.float32)
    b = jax.random.normal(jax.random.PRNGKey(1), (k, n), jnp.float32)
    matmul = jax.jit(lambda x, y: x @ y)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return best


def turn_token_pieces(tokens) -> tuple[str, ...]:
    """The turn tokens `kerasft train` trains the embedding rows of by default, for this vocabulary."""
    return trainable_turn_tokens(LoraConfig.trainable_tokens, resolve_template("auto", tokens))


def write_batches(args, workload: str, folder: Path) -> None:
    """Tokenises the workload once and saves its batches (make_batch's, all one width: no
    recompiles) and the trained token rows, so both frameworks see the same ids."""
    import numpy as np

    cfg = load_config(ROOT / "configs" / "quickstart.yaml")
    tokens = chat_tokens(load_tokenizer(ModelConfig(preset=args.preset)))
    examples = build_datasets(cfg.data, need_eval=False).train
    if workload == "qa":
        data = tokenize_examples(tokens, examples, args.seq)
    else:
        passages = list(dict.fromkeys(ex.context for ex in examples))
        data = tokenize_documents(tokens, [Example(str(i), "", p) for i, p in enumerate(passages)], args.seq)
    order = [i for epoch in range(4) for i in epoch_batches(data, args.batch, 0, epoch)]
    chosen = [order[i % len(order)] for i in range(args.steps + 2)]  # warm-up steps first
    width = max(batch_width(data, indices) for indices in chosen)
    num_targets = data.num_targets
    batches = [make_batch(data, indices, num_targets, tokens.pad, width=width) for indices in chosen]
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / "batches.npz", **{key: np.stack([b[key] for b in batches]) for key in batches[0]})
    token_rows = [tokens.special[piece] for piece in turn_token_pieces(tokens)]  # the template's own tokens
    (folder / "token_rows.json").write_text(json.dumps(token_rows))


def _run_worker(kind: str, args, folder: Path) -> dict:
    cmd = [sys.executable, __file__, "--worker", kind, "--work", str(folder), "--preset", args.preset,
           "--rank", str(args.rank), "--steps", str(args.steps), "--seq", str(args.seq)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"bench: {kind} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _rss_mib() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def load_lora_model(args):
    """The preset with fresh LoRA adapters (B = 0) of rank --rank, alpha 2 x rank, on query and value."""
    loaded = load_model(ModelConfig(preset=args.preset))
    apply_lora(loaded.backbone, LoraConfig(rank=args.rank, alpha=2.0 * args.rank, targets=("query", "value")))
    return loaded


def bench_step(backbone, work: Path, steps: int):
    """The training step of `kerasft train` for the saved batches (learning rate 2e-4, the
    trainer's other defaults, the turn-token rows trained), its first state, and the batches."""
    import numpy as np

    from kerasft.train.loop import TrainSpec, build_step  # brings jax: see the imports at the top

    arrays = dict(np.load(work / "batches.npz"))
    token_rows = json.loads((work / "token_rows.json").read_text())
    spec = TrainSpec(TrainConfig(learning_rate=2e-4), token_rows=tuple(token_rows))
    train_step = build_step(backbone, spec, steps)
    batches = [{key: value[i] for key, value in arrays.items()} for i in range(arrays["token_ids"].shape[0])]
    return train_step, train_step.state(backbone), batches


def _export_worker(args) -> int:
    """Our HF export of the base weights (LoRA B = 0 merges to the base), for the peer."""
    loaded = load_lora_model(args)
    export_hf(loaded.backbone, loaded.tokenizer, Path(args.work) / "hf", overwrite=True)
    print(json.dumps({"ok": True}))
    return 0


def _kerasft_worker(args) -> int:
    import jax
    import numpy as np

    from kerasft.train.loss import FUSED_ABOVE, LOSS_CHUNK  # brings jax: see the imports at the top

    loaded = load_lora_model(args)
    backbone = loaded.backbone
    rss_loaded = _rss_mib()
    arrays = dict(np.load(Path(args.work) / "batches.npz"))
    count = arrays["token_ids"].shape[0]
    train_step, (trainable, opt_state, non_trainable), batches = bench_step(backbone, Path(args.work), count)
    batch0 = batches[0]
    xla_flops = train_step.fn.lower(trainable, opt_state, non_trainable, batch0).compile().cost_analysis()
    xla_flops = (xla_flops[0] if isinstance(xla_flops, (list, tuple)) else xla_flops).get("flops", 0.0)

    batch_size, seq = batch0["token_ids"].shape
    targets = batch0["target_positions"].size
    chunk = LOSS_CHUNK if targets > FUSED_ABOVE else targets
    flops = sum(2.0 * m * k * n * times for _, (m, k, n), times in
                step_products(backbone_dims(backbone), batch_size, seq, targets, chunk))
    times, real = [], []
    for i, batch in enumerate(batches):
        start = time.perf_counter()
        trainable, opt_state, stats = train_step.fn(trainable, opt_state, non_trainable, batch, *train_step.rng(i))
        jax.block_until_ready(stats["loss"])
        if i == 0:
            first_loss = float(stats["loss"])
        if i >= 2:  # the first two include compilation and warm-up
            times.append(time.perf_counter() - start)
            real.append(int(batch["padding_mask"].sum()))
    median = statistics.median(times)
    result = {
        "median_step_s": median,
        "tokens_per_s": sum(real) / sum(times),
        "flops_per_step": flops,
        "xla_cost_analysis_flops": xla_flops,
        "achieved_flops": flops / median,
        "first_loss": first_loss,
        "final_loss": float(stats["loss"]),
        "rss_after_load_mib": rss_loaded,
        "peak_rss_mib": _peak_rss_mib(),
    }
    for variable, value in zip(backbone.trainable_variables, trainable["lora"]):
        variable.assign(value)  # the step donated the adapters' first buffers (the token rows stay base)
    # Generation: prefill and decode rates on a few prompts of the batches (greedy, 32 new tokens).
    model = KerasModel(backbone, loaded.tokenizer)
    prompts = []
    for ids, positions in zip(arrays["token_ids"][:2].reshape(-1, arrays["token_ids"].shape[-1]),
                              arrays["target_positions"][:2].reshape(-1, arrays["target_positions"].shape[-1])):
        prompts.append([int(t) for t in ids[: int(positions[0]) + 1]])
    model.generate(prompts, 32, len(prompts))  # compile
    _, timing = model.generate(prompts, 32, len(prompts))
    stats = system_metrics(model, prompts, timing, len(prompts))
    result["prefill_tokens_per_s"] = stats["prefill_tokens_per_s"]
    result["decode_tokens_per_s"] = stats["decode_tokens_per_s"]
    print(json.dumps(result))
    return 0


def _peer_worker(args) -> int:
    import numpy as np
    import torch
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)
    model = AutoModelForCausalLM.from_pretrained(Path(args.work).parent / "hf", torch_dtype=torch.float32)
    token_rows = json.loads((Path(args.work) / "token_rows.json").read_text())
    model = get_peft_model(model, PeftLoraConfig(r=args.rank, lora_alpha=2 * args.rank, lora_dropout=0.0,
                                                 target_modules=["q_proj", "v_proj"], bias="none",
                                                 trainable_token_indices=token_rows))
    model.train()
    rss_loaded = _rss_mib()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-4, weight_decay=0.01)
    arrays = dict(np.load(Path(args.work) / "batches.npz"))
    times, real = [], []
    for i in range(arrays["token_ids"].shape[0]):
        ids = torch.from_numpy(arrays["token_ids"][i].astype(np.int64))
        mask = torch.from_numpy(arrays["padding_mask"][i].astype(np.int64))
        # Labels: -100 everywhere but the weighted tokens (transformers shifts them itself).
        labels = torch.full_like(ids, -100)
        for row in range(ids.shape[0]):
            keep = arrays["target_weights"][i][row] > 0
            positions = arrays["target_positions"][i][row][keep] + 1
            labels[row, torch.from_numpy(positions.astype(np.int64))] = torch.from_numpy(
                arrays["target_ids"][i][row][keep].astype(np.int64))
        start = time.perf_counter()
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        if i == 0:
            first_loss = float(loss)
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - start)
            real.append(int(mask.sum()))
    print(json.dumps({"median_step_s": statistics.median(times), "tokens_per_s": sum(real) / sum(times),
                      "first_loss": first_loss, "final_loss": float(loss), "rss_after_load_mib": rss_loaded, "peak_rss_mib": _peak_rss_mib(),
                      "torch_threads": torch.get_num_threads()}))
    return 0


def _print_row(workload: str, row: dict) -> None:
    ours = row["kerasft"]
    line = (f"{workload:<9} kerasft {ours['tokens_per_s']:8.1f} tok/s  step {ours['median_step_s']:.2f} s  "
            f"peak RSS {ours['peak_rss_mib']:.0f} MiB  {ours['achieved_flops'] / 1e9:.1f} GFLOP/s "
            f"({ours['flops_utilization']:.0%} of matmul peak)")
    if "peer" in row:
        peer = row["peer"]
        line += (f"\n{'':<9} HF+PEFT {peer['tokens_per_s']:8.1f} tok/s  step {peer['median_step_s']:.2f} s  "
                 f"peak RSS {peer['peak_rss_mib']:.0f} MiB\n{'':<9} ratio: {row['throughput_ratio']:.2f}x "
                 f"throughput, {row['peak_rss_ratio']:.2f}x peak RSS")
    print(line, flush=True)


if __name__ == "__main__":
    sys.exit(main())
