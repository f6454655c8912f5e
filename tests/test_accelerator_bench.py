"""The accelerator acceptance run (kerasft.bench) on CPU with the tiny Gemma 2 preset: every figure
is produced and the checks agree; no timing is asserted. On a GPU or TPU host the same command
without --tiny is scripts/accelerator_acceptance.sh."""

import json
import math
from pathlib import Path

import pytest

from kerasft.bench import PEAK_BF16, chip_peak
from kerasft.cli import main
from kerasft.runtime import TARGETS


@pytest.mark.parametrize("kind, flops, target", [
    ("NVIDIA H100 80GB HBM3", 989e12, "h100"), ("NVIDIA H100 PCIe", 756e12, "h100"),
    ("NVIDIA H200 141GB HBM3e", 989e12, "h200"), ("NVIDIA A100-SXM4-40GB", 312e12, "a100-40g"),
    ("NVIDIA A100-SXM4-80GB", 312e12, "a100-80g"), ("NVIDIA L4", 121e12, "l4"), ("NVIDIA L40S", None, None),
    ("NVIDIA GeForce RTX 4090", 165.2e12, "4090"), ("Tesla T4", 65e12, "t4"), ("TPU v3", 61.5e12, "tpu-v3-8"),
    ("TPU v4", 275e12, None), ("TPU v5 lite", 197e12, "tpu-v5e-8"), ("TPU v6 lite", 918e12, None), ("cpu", None, None),
])
def test_chip_peak_table(kind, flops, target):
    assert chip_peak(kind)[:2] == (flops, target)


def test_peak_table_names_a_source_and_known_plan_targets():
    for pattern, _, target, source in PEAK_BF16:
        assert source and (target is None or target in TARGETS), pattern


def test_bench_needs_the_accelerator_flag(capsys):
    assert main(["bench"]) == 2
    assert "--accelerator" in capsys.readouterr().err


def test_tiny_acceptance_run_produces_every_figure(tmp_path, capsys):
    assert main(["bench", "--accelerator", "--tiny", "--out", str(tmp_path)]) == 0
    result = json.loads((tmp_path / "acceptance.json").read_text())
    assert result["platform"] == "cpu" and result["batch_size"] == 2 and result["sequence_length"] == 64
    step = result["step"]
    assert step["tokens_per_s"] > 0 and step["model_flops_per_step"] > 0 and step["timed_steps"] == 4
    assert step["mfu"] is None and result["peak_bf16_flops"] is None  # no bfloat16 peak for a CPU
    plan = result["plan"]
    assert plan["compiler"] == "cpu" and plan["fits"] and plan["peak_bytes"] > 0
    assert result["memory"]["planned_peak_bytes"] == plan["peak_bytes"]
    assert result["memory"]["peak_bytes_in_use"] is None and "memory_stats" in result["memory"]["note"]
    attention = result["attention"]
    assert len(attention["kerasft_losses"]) == len(attention["fused_losses"]) == len(attention["losses"]) == 3
    assert all(math.isfinite(x) for x in attention["losses"] + attention["fused_losses"])
    # Gemma 2's soft cap is refused by the fused op off TPUs: the comparison runs both paths without it.
    assert attention["soft_cap_off_in_comparison"] and not attention["keras_hub_chooses_fused_here"]
    assert attention["max_relative_difference"] < 1e-2  # bfloat16 steps through two attention codes
    parity = result["hf_export_parity"]["default_precision"]
    assert parity["ok"] is True and parity["reference"] == "transformers float64"
    table = (tmp_path / "acceptance.md").read_text()
    assert "| tokens/s |" in table and "| MFU | no bfloat16 peak for this device |" in table
    assert (tmp_path / "plan.txt").read_text().startswith("target cpu:")
    assert table in capsys.readouterr().out
