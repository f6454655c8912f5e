"""The benchmark harness in smoke mode: both frameworks train on the same batches and every
figure is produced. No timing is asserted (shared machines are noisy)."""

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_bench_smoke_produces_every_figure(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench.py"), "--smoke", "--json", str(out)],
                          capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["matmul_peak_flops"] > 0
    row = result["workloads"]["qa"]
    ours, peer = row["kerasft"], row["peer"]
    for key in ("tokens_per_s", "median_step_s", "peak_rss_mib", "flops_per_step", "achieved_flops",
                "prefill_tokens_per_s", "decode_tokens_per_s"):
        assert ours[key] > 0, key
    assert peer["tokens_per_s"] > 0 and peer["peak_rss_mib"] > 0
    assert row["throughput_ratio"] > 0 and row["peak_rss_ratio"] > 0
    # Same weights, batches and loss positions: before any update both compute the same loss.
    assert abs(ours["first_loss"] - peer["first_loss"]) < 1e-3 * abs(peer["first_loss"])
    assert math.isfinite(ours["final_loss"]) and math.isfinite(peer["final_loss"])
    assert "ratio:" in proc.stdout
