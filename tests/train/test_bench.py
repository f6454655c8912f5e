"""The benchmark harness in smoke mode: both frameworks train on the same batches and every
figure is produced. No timing is asserted (shared machines are noisy)."""

import json
import math
import subprocess
import sys
from pathlib import Path

from kerasft.testing import build_tiny_preset

ROOT = Path(__file__).resolve().parents[2]


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


def test_profile_step_splits_a_traced_step_by_operation_kind(tmp_path):
    preset = build_tiny_preset("gemma3", tmp_path / "tiny")
    out = tmp_path / "profile.json"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "experiments" / "profile_step.py"), "--preset", str(preset),
                           "--workload", "qa", "--seq", "512", "--steps", "1", "--json", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    result = json.loads(out.read_text())
    kinds = result["kinds"]
    assert result["op_seconds_per_step"] > 0 and kinds["matmul"]["seconds_per_step"] > 0
    assert math.isclose(sum(row["share"] for row in kinds.values()), 1.0)
    assert result["top"] and all(row["kind"] in ("matmul", "fusion", "copy", "other") for row in result["top"])


def test_operation_kinds():
    sys.path.insert(0, str(ROOT / "scripts" / "experiments"))
    from profile_step import kind_of, summarize

    assert [kind_of(n) for n in ("dot.12", "ynn_fusion.3", "loop_fusion.7", "copy.2", "transpose.1", "while.4")] == \
        ["matmul", "matmul", "fusion", "copy", "copy", "other"]
    events = [{"ph": "X", "name": "dot.1", "dur": 3e6}, {"ph": "X", "name": "loop_fusion", "dur": 1e6},
              {"ph": "X", "name": "PjitFunction(step)", "dur": 9e6}, {"ph": "i", "name": "dot.1"}]
    result = summarize(events, steps=2)
    assert result["op_seconds_per_step"] == 2.0
    assert result["kinds"]["matmul"] == {"seconds_per_step": 1.5, "share": 0.75}
