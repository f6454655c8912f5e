"""Does an XLA CPU flag make kerasft's training step faster? bench.py's kerasft worker under several
XLA_FLAGS settings, in one run, against the default.

    .venv/bin/python scripts/experiments/bench_xla_flags.py [--workloads pretrain,qa] [--steps 4] [--json flags.json]
    .venv/bin/python scripts/experiments/bench_xla_flags.py --variant "--xla_cpu_enable_fast_math=true"

Each variant trains the same batches as bench.py (embedded Gemma 3 270M, f32, LoRA r=8 on query and
value, batch 2 x 256) in its own process with XLA_FLAGS set, so compilation sees the flags. Printed per
workload and variant: median step time, FLOP/s as a share of the f32 square-matmul peak measured once
by this process with the default flags, the first loss (a variant that changes the numbers shows here)
and the speed-up over the default. No assertion on any timing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))

# Flags of the jaxlib this project pins (jax 0.10) that change how CPU code is generated or which
# library runs products and fusions. "" is the default.
VARIANTS = [
    "",
    "--xla_cpu_enable_fast_math=true",
    "--xla_cpu_experimental_onednn_fusion_type=dot,eltwise,reduce",
    "--xla_cpu_experimental_ynn_fusion_type=",
    "--xla_cpu_prefer_vector_width=512",
    "--xla_cpu_enable_concurrency_optimized_scheduler=true",
]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="embedded")
    parser.add_argument("--workloads", default="pretrain,qa")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--variant", action="append", help="XLA_FLAGS value to try (repeatable); default: the list above")
    parser.add_argument("--json", default="")
    args = parser.parse_args()

    from bench import _run_worker, _write_batches, matmul_peak

    variants = [""] + [v for v in args.variant if v] if args.variant else VARIANTS
    peak = matmul_peak(2048)
    print(f"f32 matmul peak (default flags): {peak / 1e9:.1f} GFLOP/s", flush=True)
    work = Path(tempfile.mkdtemp(prefix="kerasft-flags-"))
    results = {"matmul_peak_flops": peak, "batch": args.batch, "seq": args.seq, "workloads": {}}
    base_flags = os.environ.get("XLA_FLAGS", "")
    for workload in [w.strip() for w in args.workloads.split(",") if w.strip()]:
        _write_batches(args, workload, work / workload)
        rows = {}
        for variant in variants:
            os.environ["XLA_FLAGS"] = f"{base_flags} {variant}".strip()
            try:
                row = _run_worker("kerasft", args, work / workload)
            except SystemExit as err:  # a flag this jaxlib refuses: report it, go on
                print(f"  {workload:<9} {variant or 'default':<62} failed: {str(err).splitlines()[-1]}", flush=True)
                continue
            finally:
                os.environ["XLA_FLAGS"] = base_flags
            row["share_of_peak"] = row["achieved_flops"] / peak
            if "" in rows:
                row["speedup"] = rows[""]["median_step_s"] / row["median_step_s"]
            rows[variant] = row
            print(f"  {workload:<9} {variant or 'default':<62} {row['median_step_s']:6.2f} s  "
                  f"{row['share_of_peak']:5.1%} of peak  loss {row['first_loss']:.4f}  "
                  f"x{row.get('speedup', 1.0):.2f}", flush=True)
        results["workloads"][workload] = rows
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
