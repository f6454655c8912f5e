"""`kerasft control`: a running job saves a checkpoint, changes its learning rate and stops when
asked, records each request in metrics.jsonl, and a resumed run keeps the changed rate."""

import json
from pathlib import Path

import pytest

from kerasft.cli import main
from kerasft.errors import KerasftError
from kerasft.train import control

ROOT = Path(__file__).resolve().parents[2]


def test_requests_are_checked(tmp_path):
    with pytest.raises(KerasftError, match="not a run dir"):
        control.request(tmp_path, "save")
    (tmp_path / "config.yaml").write_text("name: r\n")
    with pytest.raises(KerasftError, match="the new learning rate must be a number above 0"):
        control.request(tmp_path, "lr", value=-1.0)
    with pytest.raises(KerasftError, match="--keep 'worst'"):
        control.request(tmp_path, "stop", keep="worst")
    first = control.request(tmp_path, "lr", value=3e-4)
    control.request(tmp_path, "stop", keep="best")
    (tmp_path / "control" / "zz-bad.json").write_text("{not json")
    assert first.parent == tmp_path / "control"
    assert control.take_requests(tmp_path) == [{"action": "lr", "value": 3e-4}, {"action": "stop", "keep": "best"}]
    assert list((tmp_path / "control").iterdir()) == []
    records = [{"step": 1}, {"step": 2, "control": [{"action": "lr", "value": 1e-3}, {"action": "save"}]}]
    assert control.recorded_lr_changes(records) == [(2, 1e-3)]


def test_a_running_job_saves_changes_lr_stops_and_resumes_with_the_new_rate(tiny_preset, tmp_path, monkeypatch, capsys):
    import kerasft.train.loop as loop

    monkeypatch.chdir(ROOT)
    run_dir = tmp_path / "t"
    # What a user types in another terminal, at the end of steps 1, 2 and 3.
    asks = {1: ["lr", "1e-3"], 2: ["save"], 3: ["stop", "--keep", "last"]}
    real_take, calls = loop.take_requests, []

    def take(root):
        step = len(calls)  # call 0 clears stale requests before step 1
        calls.append(step)
        if step in asks and not (run_dir / "adapter").exists():
            assert main(["control", str(root), *asks[step]]) == 0
        return real_take(root)

    monkeypatch.setattr(loop, "take_requests", take)
    args = ["train", str(ROOT / "configs/quickstart.yaml"), f"model.preset={tiny_preset}", "train.max_steps=5",
            "train.checkpoint_every=0", "train.plots=false", "train.warmup_ratio=0", "train.schedule=constant", "train.learning_rate=2e-4",
            f"output_dir={tmp_path}", "name=t"]
    assert main(args) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3]  # stopped after step 3 of 5
    assert records[0]["control"] == [{"action": "lr", "value": 1e-3}]
    assert records[0]["learning_rate"] == pytest.approx(2e-4) and records[1]["learning_rate"] == pytest.approx(1e-3)
    assert records[2]["learning_rate"] == pytest.approx(1e-3)
    assert records[1]["control"] == [{"action": "save"}] and (run_dir / "checkpoints" / "2").is_dir()
    assert records[2]["control"] == [{"action": "stop", "keep": "last"}]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train"]["steps"] == 3 and (run_dir / "adapter" / "adapter_config.json").is_file()
    out = capsys.readouterr().out
    assert "learning rate 0.001 from step 2" in out and "stopping at step 3" in out

    # A finished job takes no requests.
    assert main(["control", str(run_dir), "save"]) == 2
    assert "training has finished" in capsys.readouterr().err

    # Resumed from the step-2 checkpoint: step 3 on runs at the changed rate, to the planned 5 steps.
    calls.clear()
    asks.clear()
    (run_dir / "summary.json").unlink()
    assert main([*args, "--resume"]) == 0
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5]
    assert all(r["learning_rate"] == pytest.approx(1e-3) for r in records[1:])


def test_device_memory_is_logged_where_the_device_reports_it(monkeypatch):
    import kerasft.train.loop as loop

    assert loop.device_memory() == {}  # CPU devices report no memory statistics

    class Device:  # what jax's GPU and TPU devices return
        def memory_stats(self):
            return {"bytes_in_use": 3 << 30, "peak_bytes_in_use": 5 << 30, "bytes_limit": 16 << 30, "num_allocs": 9}

    monkeypatch.setattr(loop.jax, "local_devices", lambda: [Device()])
    assert loop.device_memory() == {"device_memory_bytes": 3 << 30, "device_peak_memory_bytes": 5 << 30,
                                    "device_memory_limit_bytes": 16 << 30}
