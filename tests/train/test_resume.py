"""Exact resume: a run killed with SIGKILL and resumed ends with the same adapter, bit for bit,
as a run that was never interrupted."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from kerasft.cli import main

ROOT = Path(__file__).resolve().parents[2]

# Dies by SIGKILL (no cleanup, no FAILED marker, a checkpoint possibly half written) when the
# loop asks for its KILL_AT-th batch.
KILLER = """
import os, signal, sys
import kerasft.train.loop as loop
from kerasft.cli import main

kill_at, calls, real = int(sys.argv[1]), [0], loop.make_batch

def make_batch(*args, **kwargs):
    calls[0] += 1
    if calls[0] == kill_at:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)

loop.make_batch = make_batch
sys.exit(main(sys.argv[2:]))
"""


def _argv(tmp_path, tiny_preset, name, *extra):
    lines = [json.dumps({"prompt": f"Pregunta {i}", "response": f"Respuesta número {i}."}) for i in range(5)]
    data = tmp_path / "five.jsonl"
    data.write_text("\n".join(lines) + "\n")
    # 5 examples in batches of 2: 3 batches an epoch, so 7 steps x 2 micro-batches cross epochs
    # and checkpoints land mid-epoch.
    return ["train", str(ROOT / "configs/quickstart.yaml"), f"model.preset={tiny_preset}", f"output_dir={tmp_path}",
            f"name={name}", f"data.train={data}", "data.sequence_length=128", "train.epochs=5", "train.max_steps=7",
            "train.batch_size=2", "train.grad_accum=2", "train.learning_rate=1e-2", "train.checkpoint_every=2",
            "train.keep_checkpoints=2", *extra]


def _steps(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_killed_run_resumes_bit_for_bit(tiny_preset, tmp_path, capsys):
    assert main(_argv(tmp_path, tiny_preset, "whole")) == 0
    whole = tmp_path / "whole"

    killed = subprocess.run([sys.executable, "-c", KILLER, "10", *_argv(tmp_path, tiny_preset, "cut")],
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == -9, killed.stderr[-2000:]
    cut = tmp_path / "cut"
    assert not (cut / "adapter").exists()
    saved = sorted(int(p.name) for p in (cut / "checkpoints").iterdir() if p.name.isdigit())
    assert saved and max(saved) in (2, 4), saved  # micro-batch 10 is inside step 5
    assert max(r["step"] for r in _steps(cut)) == 4

    capsys.readouterr()
    assert main([*_argv(tmp_path, tiny_preset, "cut"), "--resume"]) == 0
    assert f"resuming at step {max(saved)}/7" in capsys.readouterr().out
    expected, got = load_file(str(whole / "adapter/adapter.safetensors")), load_file(str(cut / "adapter/adapter.safetensors"))
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_array_equal(expected[key], got[key], err_msg=key)
    assert [r["step"] for r in _steps(cut)] == list(range(1, 8))
    assert [r["loss"] for r in _steps(cut)] == [r["loss"] for r in _steps(whole)]
    assert sorted(int(p.name) for p in (cut / "checkpoints").iterdir() if p.name.isdigit()) == [6, 7]


def test_resume_refuses_a_changed_config(tiny_preset, tmp_path, capsys):
    assert main(_argv(tmp_path, tiny_preset, "run", "train.max_steps=2")) == 0
    assert main([*_argv(tmp_path, tiny_preset, "run", "train.max_steps=2", "train.learning_rate=1e-3"), "--resume"]) == 2
    err = capsys.readouterr().err
    assert "train.learning_rate" in err and "config.yaml" in err
