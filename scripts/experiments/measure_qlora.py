"""Weight bytes, loss and step time of QLoRA-like training (model.quantize none / int8 / int4) on a model.

    .venv/bin/python scripts/experiments/measure_qlora.py [--preset embedded] [--steps 6] [--out /tmp/kerasft-qlora]

Each mode runs `kerasft train configs/quickstart.yaml model.quantize=MODE train.max_steps=STEPS` (the
same data, seed and batches) in its own process, then reads the run's summary.json (weight bytes
before and after quantization) and metrics.jsonl (loss per step, step time). The first step
includes compilation; the median of the others is reported. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

from kerasft.paths import RunDir
from kerasft.train.logs import read_metrics

ROOT = Path(__file__).resolve().parents[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="embedded")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--modes", default="none,int8,int4")
    parser.add_argument("--out", default="/tmp/kerasft-qlora")
    args = parser.parse_args()
    rows = []
    for mode in args.modes.split(","):
        name = f"qlora-{mode}"
        command = [sys.executable, "-m", "kerasft", "train", str(ROOT / "configs/quickstart.yaml"), "--overwrite",
                   f"model.preset={args.preset}", f"model.quantize={mode}", f"train.max_steps={args.steps}",
                   f"output_dir={args.out}", f"name={name}", "train.log_every=1", "train.checkpoint_every=0"]
        print("$ " + " ".join(command[1:]), flush=True)
        subprocess.run(command, check=True, cwd=ROOT)
        run = RunDir(Path(args.out) / name)
        quant = json.loads(run.summary.read_text())["model"]["quantize"]
        log = read_metrics(run.metrics)
        rows.append((mode, quant["weights_bytes_after"] / 2**20, [r["loss"] for r in log],
                     statistics.median(r["step_seconds"] for r in log[1:])))
    print("\n| model.quantize | backbone weights | loss, steps 1.." + str(args.steps) + " | median step (s) |")
    print("| --- | --- | --- | --- |")
    for mode, mib, losses, seconds in rows:
        print(f"| {mode} | {mib:,.1f} MiB | {' '.join(f'{x:.3f}' for x in losses)} | {seconds:.2f} |")


if __name__ == "__main__":
    main()
