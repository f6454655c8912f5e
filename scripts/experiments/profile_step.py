"""Where does a training step of the embedded Gemma 3 270M spend its time? A jax.profiler trace of
kerasft's own jitted step, summed by XLA operation kind.

    .venv/bin/python scripts/experiments/profile_step.py [--workload pretrain|qa] [--steps 3] [--json profile.json]

Builds the batches and the step exactly as scripts/bench.py does (same data, batch 2 x 256, LoRA r=8
on query and value plus the turn-token rows: the step `kerasft train` runs, from
kerasft.train.loop.build_step), compiles and warms up, then traces --steps steps. Every operation XLA's CPU
runtime executes is one event in the trace (a thunk: a matrix product, a fusion of elementwise work,
a copy, a loop); this sums their durations into kinds:
  matmul     dot / convolution thunks, and YNNPACK fusions that contain a product
  fusion     XLA loop/input fusions: elementwise work, reductions, softmax, norms
  copy       copies and transposes that only move data
  other      everything else XLA runs (sort, scatter, custom calls, control flow bodies)
and reports each kind's share of the traced step time, with the 15 most expensive operations. The
matmul share is the most a faster elementwise path could leave for the products; bench.py's FLOP/s
against the square-matmul peak says how fast the products themselves run.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from bench import bench_step, load_lora_model, write_batches  # noqa: E402  (scripts/bench.py)
from kerasft.runtime import init_backend  # noqa: E402

# Events that belong to the runtime around the executable, not to its operations.
_RUNTIME = re.compile(r"^\$|PjitFunction|PjRt|Execute|Thunk|Threadpool|Allocate|Handle |Parse|Wait |Await|"
                      r"CollectGarbage|^end: |CreateOutputs")


def kind_of(name: str) -> str:
    """The operation kind of one trace event name (see the module docstring)."""
    lower = name.lower()
    if re.search(r"dot|conv|gemm|matmul", lower) or lower.startswith("ynn"):  # YNNPACK runs the products
        return "matmul"
    if re.search(r"copy|transpose", lower):
        return "copy"
    if "fusion" in lower:
        return "fusion"
    return "other"


def summarize(events: list[dict], steps: int) -> dict:
    """Per-kind seconds per step and the most expensive operations, from complete ('X') events."""
    by_name = collections.Counter()
    for event in events:
        if event.get("ph") == "X" and not _RUNTIME.search(event["name"]):
            by_name[event["name"]] += event.get("dur", 0.0) / 1e6
    by_kind = collections.Counter()
    for name, seconds in by_name.items():
        by_kind[kind_of(name)] += seconds
    total = sum(by_kind.values()) or 1.0
    return {
        "op_seconds_per_step": total / steps,
        "kinds": {kind: {"seconds_per_step": seconds / steps, "share": seconds / total}
                  for kind, seconds in by_kind.most_common()},
        "top": [{"name": name, "kind": kind_of(name), "seconds_per_step": seconds / steps}
                for name, seconds in by_name.most_common(15)],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=["pretrain", "qa"], default="pretrain")
    parser.add_argument("--preset", default="embedded")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--json", default="")
    args = parser.parse_args()

    init_backend()
    import jax  # after init_backend: keras' backend is chosen first

    work = Path(tempfile.mkdtemp(prefix="kerasft-profile-"))
    write_batches(args, args.workload, work)  # --steps batches after two warm-up ones
    backbone = load_lora_model(args).backbone
    train_step, (trainable, opt_state, non_trainable), batches = bench_step(backbone, work, args.steps + 2)
    for micro, batch in enumerate(batches[:2]):  # compile and warm up
        trainable, opt_state, stats = train_step.fn(trainable, opt_state, non_trainable, batch, *train_step.rng(micro))
        jax.block_until_ready(stats["loss"])
    trace_dir = work / "trace"
    start = time.perf_counter()
    with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
        for micro, batch in enumerate(batches[2:2 + args.steps], start=2):
            trainable, opt_state, stats = train_step.fn(trainable, opt_state, non_trainable, batch,
                                                        *train_step.rng(micro))
            jax.block_until_ready(stats["loss"])
    wall = (time.perf_counter() - start) / args.steps
    trace = next(trace_dir.rglob("*.trace.json.gz"))
    result = summarize(json.load(gzip.open(trace))["traceEvents"], args.steps)
    result.update({"workload": args.workload, "batch": args.batch, "seq": args.seq, "steps": args.steps,
                   "wall_seconds_per_step": wall, "trace": str(trace)})
    print(f"{args.workload}: {wall:.2f} s per traced step (wall, tracing on); operations {result['op_seconds_per_step']:.2f} s")
    for kind, row in result["kinds"].items():
        print(f"  {kind:<7} {row['seconds_per_step']:6.2f} s  {row['share']:6.1%}")
    print("most expensive operations (s per step):")
    for row in result["top"]:
        print(f"  {row['seconds_per_step']:6.3f}  {row['kind']:<7} {row['name']}")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
