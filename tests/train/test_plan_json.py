"""`kerasft plan --json`: the Plan as one JSON object (what the studio's Model tab reads), on the
tiny preset with one compile (--no-search)."""

import json
import os
from pathlib import Path

os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")  # as in test_plan.py

from kerasft.cli import main
from kerasft.ui.app import _last_json_object, _plan_badge

ROOT = Path(__file__).resolve().parents[2]


def test_plan_json_is_the_plan_dataclass_with_fits_and_target_key(tiny_preset, capsys):
    argv = ["plan", str(ROOT / "configs/quickstart.yaml"), f"model.preset={tiny_preset}", "--target", "t4",
            "data.sequence_length=64", "train.batch_size=2", "--no-search", "--json"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "FITS" not in out  # the JSON replaces the printed report
    lines = [line for line in out.splitlines() if line.strip()]
    plan = json.loads(lines[-1])
    assert plan["target_key"] == "t4" and plan["fits"] is True
    assert plan["target"] == {"name": "T4 (16 GiB, 15 usable)", "bytes_per_device": 15 * 2**30, "devices": 1,
                              "kind": "gpu", "gpu_spec": "t4.txtpb"}
    # Which compiler made the figures: XLA's CUDA compiler with the gpu-plan extra, else this CPU's.
    assert plan["compiler"] in ("cuda", "cpu") and plan["compiled_for"]
    step = plan["step"]
    assert step["batch_size"] == 2 and plan["sequence_length"] == 64
    for key in ("peak", "arguments", "outputs", "aliased", "temporaries", "weights", "trainable_and_optimizer",
                "logits"):
        assert isinstance(step[key], int) and step[key] >= 0, key
    assert isinstance(plan["usable"], int) and plan["usable"] == int(15 * 2**30 * 0.9)
    assert step["peak"] == step["arguments"] + step["outputs"] - step["aliased"] + step["temporaries"] > 0
    assert plan["fits"] == (step["peak"] <= plan["usable"])
    assert plan["largest_batch"] is None and plan["tried"] == [[2, step["peak"]]]  # --no-search: one compile
    assert 0 < plan["trainable_parameters"] < plan["parameters"]
    # The studio reads the same line back: its badge says fits, with the peak, and no batch was searched.
    assert _last_json_object("some log line\n" + out) == plan
    badge = _plan_badge(plan)
    assert "kft-fits" in badge and ">fits<" in badge and "suggested batch size" not in badge
