"""The studio's issue-21 views without a browser: storage and machine usage, live controls (request
files for the running job), the model view, sweeps and the attention command line."""

import json
import os
import sys
import time
from pathlib import Path

import pytest

from kerasft.cli import _parser
from kerasft.errors import KerasftError
from kerasft.ui.workspace import Job, Workspace, machine_usage, storage_usage, sweep_folders

ROOT = Path(__file__).resolve().parents[2]


def test_new_views_are_in_the_app(tmp_path):
    from kerasft.ui.app import build_app

    app = build_app(tmp_path / "ws")
    ids = {getattr(block, "elem_id", None) for block in app.blocks.values()}
    assert {"storage", "machine_usage", "save_now", "stop_best", "stop_last", "new_lr", "change_lr",
            "model_view_button", "model_view_table", "sweep_folder", "sweep_table", "sweep_plots",
            "attention_source", "attention_prompt", "attention_png"} <= ids


def test_storage_usage_counts_checkpoints_run_dir_and_free_disk(tmp_path):
    run = tmp_path / "runs" / "r"
    (run / "checkpoints" / "2").mkdir(parents=True)
    (run / "checkpoints" / "2" / "state").write_bytes(b"x" * 3000)
    (run / "metrics.jsonl").write_bytes(b"y" * 500)
    used = storage_usage(run)
    assert used["checkpoints"] == 3000 and used["run_dir"] == 3500
    assert 0 < used["disk_free"] <= __import__("shutil").disk_usage(tmp_path).total
    assert storage_usage(tmp_path / "runs" / "missing")["run_dir"] == 0  # not started yet: nothing, no error


def _running_job(ws: Workspace, name: str) -> Job:
    return Job([sys.executable, "-c", "import time; time.sleep(60)"], ws.log_path(name, "train")).start(cwd=ws.root)


def test_controls_write_requests_for_the_running_job(tmp_path, monkeypatch):
    from kerasft.train.control import take_requests
    from kerasft.ui.app import Studio, control_job, resources_markdown

    studio = Studio(Workspace(tmp_path / "ws"))
    assert "no training is running" in control_job(studio, "r", "save")
    run = studio.ws.run_dir("r")
    run.root.mkdir(parents=True)
    run.config.write_text("name: r\n")
    job = studio.jobs[("r", "train")] = _running_job(studio.ws, "r")
    try:
        assert "requested: save" in control_job(studio, "r", "save")
        assert "keeping the best" in control_job(studio, "r", "stop", keep="best")
        assert "learning rate 0.0003" in control_job(studio, "r", "lr", value=3e-4)
        assert "must be a number above 0" in control_job(studio, "r", "lr", value=-1.0)
        assert take_requests(run.root) == [{"action": "save"}, {"action": "stop", "keep": "best"},
                                           {"action": "lr", "value": 3e-4}]
        storage, machine = resources_markdown(studio, "r")
        assert "checkpoints 0 B" in storage and "disk free" in storage
        assert "training process CPU" in machine and "accelerator memory: none reported" in machine
        # On a GPU or TPU the trainer logs its device's memory each step (train.loop.device_memory).
        run.metrics.write_text(json.dumps({"step": 7, "loss": 1.0, "device_memory_bytes": 3 * 2**30,
                                           "device_peak_memory_bytes": 5 * 2**30,
                                           "device_memory_limit_bytes": 16 * 2**30}) + "\n")
        assert "accelerator memory 3.0 GiB / 16.0 GiB (peak 5.0 GiB, step 7)" in resources_markdown(studio, "r")[1]
        # A GPU machine: nvidia-smi's answer (a stand-in script first on PATH) is shown per GPU.
        bin_dir = tmp_path / "bin"
        bin_dir.mkdir()
        smi = bin_dir / "nvidia-smi"
        smi.write_text("#!/bin/sh\necho '0, 87, 20480, 24564'\necho '1, 3, 512, 24564'\n")
        smi.chmod(0o755)
        monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
        machine = resources_markdown(studio, "r")[1]
        assert "GPU 0 87 % busy, memory 20.0 GiB / 24.0 GiB" in machine and "GPU 1 3 % busy" in machine
        usage = machine_usage(job.process.pid)
        assert usage["process_rss"] > 1_000_000 and 0 < usage["memory_used"] <= usage["memory_total"]
    finally:
        job.interrupt(timeout=5)


def test_model_view_table_from_the_model_command(tiny_preset, capsys):
    from kerasft.cli import main
    from kerasft.ui.app import model_view_tables

    assert main(["model", str(ROOT / "configs/quickstart.yaml"), f"model.preset={tiny_preset}", "--json"]) == 0
    view = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    summary, frame = model_view_tables(view)
    assert frame["parameters"].sum() == view["parameters"] + view["lora"]["parameters"]
    assert set(frame.loc[frame["LoRA"].isin(["query", "value"]), "weight"]) == set(view["lora"]["kernels"])
    assert f"trainable {view['trainable']:,} of {view['total']:,}" in summary


def test_sweeps_view_reads_sweep_json_and_plots(tmp_path):
    from kerasft.sweep import results_table, sensitivity_plots
    from kerasft.ui.app import sweep_choices, sweep_tables

    ws = Workspace(tmp_path / "ws")
    folder = ws.root / "runs" / "s-sweep"
    folder.mkdir(parents=True)
    axes = {"lora.rank": ["4", "8"]}
    trials = [{"index": i, "name": f"t{i:03d}", "overrides": {"lora.rank": r}, "score": s, "status": "done",
               "train_loss": 1.5 - i} for i, (r, s) in enumerate([("4", 0.25), ("8", 0.5)])]
    spec = {"config": "c.yaml", "axes": axes, "metric": "f1", "rule": "highest validation f1", "best": "t001",
            "test": {"f1": 0.4}, "trials": trials}
    sensitivity_plots(trials, axes, "f1", folder / "plots")
    (folder / "sweep.json").write_text(json.dumps(spec))
    (folder / "results.md").write_text(results_table(spec))
    assert sweep_folders(ws.root) == [folder] and sweep_choices(ws) == ["runs/s-sweep"]
    summary, frame, plots = sweep_tables(ws, "runs/s-sweep")
    assert list(frame.columns) == ["trial", "lora.rank", "status", "validation f1", "final train loss"]
    assert frame["trial"].tolist() == ["t000", "t001 (best)"] and frame["validation f1"].tolist() == [0.25, 0.5]
    assert "best: t001" in summary and "f1 0.4" in summary
    assert [Path(p).name for p in plots] == ["sensitivity_lora_rank.png"]
    with pytest.raises(KerasftError, match="not inside the workspace"):
        sweep_tables(ws, "../..")
    with pytest.raises(KerasftError, match="no sweep.json"):
        sweep_tables(ws, "runs")


def test_attention_command_line(tmp_path):
    from kerasft.ui.app import attention_argv

    ws = Workspace(tmp_path / "ws")
    argv, png = attention_argv(ws, "embedded", "¿Hola?", -2, None)
    args = _parser().parse_args(argv[3:])
    assert (args.src, args.prompt, args.layer, args.head, Path(args.png)) == ("embedded", "¿Hola?", -2, None, png)
    assert png.parent == ws.root / "explore"
    run = ws.run_dir("tuned")
    run.adapter_config.parent.mkdir(parents=True)
    run.adapter_config.write_text("{}")
    argv, second = attention_argv(ws, "tuned", "x", 0, 1)
    args = _parser().parse_args(argv[3:])
    assert args.src == str(run.root) and args.head == 1 and second != png
    with pytest.raises(KerasftError, match="give a model"):
        attention_argv(ws, "embedded", " ", 0, None)
    assert "--head" not in attention_argv(ws, "embedded", "x", 0, " ")[0]  # the text box left empty: every head
    assert attention_argv(ws, "embedded", "x", 0, "2")[0][-2:] == ["--head", "2"]
    with pytest.raises(KerasftError, match="head 'two' is not a whole number"):
        attention_argv(ws, "embedded", "x", 0, "two")
