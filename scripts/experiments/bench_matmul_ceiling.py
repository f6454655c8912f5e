"""How close to the square-matmul peak can XLA's CPU backend get on the matrix products a training step
of the embedded Gemma 3 270M is made of?

    .venv/bin/python scripts/experiments/bench_matmul_ceiling.py [--batch 2] [--seq 256] [--json ceiling.json]
    .venv/bin/python scripts/experiments/bench_matmul_ceiling.py --head-rows 128,256,512   # the head's gradient product only

Issue 9 asks a full-sequence LoRA step for 90% of the f32 matmul peak. A step is at best as fast as its
matrix products run on their own, so this times each distinct product of the step in isolation (same
shapes, f32, jitted, best of several runs) and reports, in one run:
  - the square n x n peak (what scripts/bench.py divides by);
  - per shape: FLOPs, time, and share of that peak;
  - the ceiling: total matmul FLOPs of one step / total isolated time of its products, as a share of the
    peak; no step that does these products can beat it.
The step's products, for B x S tokens, each counted with how often one step runs it:
  forward projections (q, k, v, o, gate, up, down) in every layer, attention scores and values per head,
  the same products again for the input gradients (the base weights are frozen: no weight gradients), the
  attention's backward products, and the vocabulary head in chunks of LOSS_CHUNK positions, twice (logits,
  and the hidden-state gradient): bench.step_products, the count bench.py divides by.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default="")
    parser.add_argument("--head-rows", default="", help="comma-separated chunk sizes: time only the vocabulary "
                        "head's gradient product (rows x vocabulary) @ (vocabulary x hidden) at each")
    args = parser.parse_args()

    from kerasft.config import ModelConfig
    from kerasft.runtime import init_backend
    from kerasft.train.loss import LOSS_CHUNK
    from kerasft.train.plan import backbone_spec

    init_backend()
    sys.path.insert(0, str(ROOT / "scripts"))
    from bench import matmul_peak, matmul_seconds, step_products

    dims = dict(backbone_spec(ModelConfig(preset="embedded"))[1])
    dims["ffw_dim"] = dims["intermediate_dim"]  # Gemma 3: one projection's width

    peak = matmul_peak(2048)
    print(f"square f32 matmul peak (2048^3): {peak / 1e9:.1f} GFLOP/s")
    if args.head_rows:
        vocabulary, hidden = dims["vocabulary_size"], dims["hidden_dim"]
        for rows in (int(r) for r in args.head_rows.split(",")):
            seconds = matmul_seconds(rows, vocabulary, hidden, args.repeats)
            rate = 2.0 * rows * vocabulary * hidden / seconds
            print(f"  head gradient {rows:>5} x {vocabulary} x {hidden}: {seconds * 1e3:7.1f} ms, "
                  f"{rate / 1e9:6.1f} GFLOP/s ({rate / peak:.0%}); {seconds * 512 / rows * 1e3:7.1f} ms per 512 rows")
        return 0
    rows, total_flops, total_seconds = [], 0.0, 0.0
    for name, (m, k, n), times in step_products(dims, args.batch, args.seq, args.batch * args.seq, LOSS_CHUNK):
        seconds = matmul_seconds(m, k, n, args.repeats)
        flops = 2.0 * m * k * n
        share = flops / seconds / peak
        rows.append({"product": name, "shape": [m, k, n], "per_step": times, "gflop": flops / 1e9,
                     "seconds": seconds, "share_of_peak": share})
        total_flops += flops * times
        total_seconds += seconds * times
        print(f"  {name:<28} {m:>5} x {k:>6} x {n:>6}  x{times:<4} {flops / seconds / 1e9:7.1f} GFLOP/s ({share:.0%})",
              flush=True)
    ceiling = total_flops / total_seconds
    print(f"one step: {total_flops / 1e9:.1f} GFLOP of matmuls, {total_seconds:.2f} s when each runs alone")
    print(f"ceiling: {ceiling / 1e9:.1f} GFLOP/s = {ceiling / peak:.0%} of the square peak")
    if args.json:
        Path(args.json).write_text(json.dumps({"peak_flops": peak, "ceiling_flops": ceiling,
                                               "ceiling_share": ceiling / peak, "step_gflop": total_flops / 1e9,
                                               "batch": args.batch, "seq": args.seq, "products": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
