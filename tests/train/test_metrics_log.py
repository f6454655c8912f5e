"""metrics.jsonl, the one training log: its reader (a half-written last line is a killed process, a bad
line anywhere else is an error), resuming after a kill mid-write, the loss-curve plot, and the
Weights & Biases and MLflow loggers writing the same numbers (offline, to local files)."""

import json
import shutil
import struct
from pathlib import Path

import numpy as np
import pytest

from kerasft.cli import main
from kerasft.errors import KerasftError
from kerasft.train.logs import RunLog, draw_loss_curve, drop_records_after, read_metrics

ROOT = Path(__file__).resolve().parents[2]
RECORDS = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.5, "eval_loss": 2.7}, {"step": 3, "loss": 2.25}]


def _lines(records) -> str:
    return "".join(json.dumps(r) + "\n" for r in records)


def test_reader_leaves_out_a_half_written_last_line(tmp_path):
    log = tmp_path / "metrics.jsonl"
    assert read_metrics(log) == []  # no file yet
    log.write_text(_lines(RECORDS) + '{"step": 4, "lo')
    assert read_metrics(log) == RECORDS
    log.write_text(_lines(RECORDS) + "\n\n")  # blank lines are not records
    assert read_metrics(log) == RECORDS
    log.write_text(_lines(RECORDS[:2]) + json.dumps(RECORDS[2]))  # complete, only the newline missing
    assert read_metrics(log) == RECORDS


@pytest.mark.parametrize("bad", ['{"step": 2, "lo', "[1, 2]", '{"loss": 1.0}', '"text"'])
def test_reader_names_file_and_line_of_a_bad_line_in_the_middle(tmp_path, bad):
    log = tmp_path / "metrics.jsonl"
    log.write_text(_lines(RECORDS[:1]) + bad + "\n" + _lines(RECORDS[2:]))
    with pytest.raises(KerasftError) as err:
        read_metrics(log)
    assert str(err.value).startswith(f"{log}:2: not a JSON object with a step") and "\n" not in str(err.value)


def test_drop_records_after_keeps_whole_lines_up_to_the_step(tmp_path):
    log = tmp_path / "metrics.jsonl"
    drop_records_after(log, 2)  # no file: nothing to do
    assert not log.exists()
    log.write_text(_lines(RECORDS) + '{"step": 4, "lo')
    drop_records_after(log, 2)
    assert log.read_text() == _lines(RECORDS[:2])
    mtime = log.stat().st_mtime_ns
    drop_records_after(log, 5)  # nothing past step 5: the file is left alone
    assert log.stat().st_mtime_ns == mtime
    log.write_text(_lines(RECORDS[:1]) + "not json\n" + _lines(RECORDS[2:]))
    with pytest.raises(KerasftError, match=r"metrics\.jsonl:2: "):
        drop_records_after(log, 1)


def test_run_log_appends_whole_lines_after_a_killed_writer(tmp_path):
    (tmp_path / "metrics.jsonl").write_text(_lines(RECORDS[:2]) + '{"step": 3, "lo')
    log = RunLog(tmp_path)
    log.log({"step": 3, "loss": 2.25})
    log.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [*RECORDS[:2], {"step": 3, "loss": 2.25}]
    (tmp_path / "metrics.jsonl").write_text(_lines(RECORDS[:2]) + json.dumps(RECORDS[2]))  # no final newline
    log = RunLog(tmp_path)
    log.log({"step": 4, "loss": 2.0})
    log.close()
    assert (tmp_path / "metrics.jsonl").read_text() == _lines([*RECORDS, {"step": 4, "loss": 2.0}])


def test_loss_curve_draws_train_and_eval_loss(tmp_path):
    pytest.importorskip("matplotlib")
    from PIL import Image

    path = draw_loss_curve([*RECORDS, {"step": 4, "loss": float("nan")}], tmp_path / "loss.png")
    assert path == tmp_path / "loss.png"
    with Image.open(path) as image:
        assert image.size == (600, 350)
        r, g, b = np.asarray(image.convert("RGB"), dtype=np.int32).transpose(2, 0, 1)
    blue = int(np.sum((b > r + 60) & (b > g + 20)))  # tab:blue: the train loss
    red = int(np.sum((r > g + 100) & (r > b + 100)))  # tab:red: the eval loss
    assert blue > 300 and red > 100, (blue, red)


def _data(tmp_path) -> Path:
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Pregunta {i}", "response": "La respuesta es Zaragoza."}) + "\n"
                            for i in range(8)))
    return path


def _train(tmp_path, tiny_preset, name, *extra, resume=False):
    argv = ["train", str(ROOT / "configs/quickstart.yaml"), f"model.preset={tiny_preset}", f"output_dir={tmp_path}",
            f"name={name}", f"data.train={_data(tmp_path)}", "data.sequence_length=64", "train.batch_size=4",
            "train.warmup_ratio=0", "train.plots=false", *extra]
    assert main(argv + (["--resume"] if resume else [])) == 0
    return tmp_path / name


def test_resume_after_a_half_written_last_line(tiny_preset, tmp_path):
    """A process killed while writing step 4's line: --resume goes back to the checkpoint at step 2,
    drops steps 3 and the cut line, and logs 3 and 4 again as whole lines."""
    run = _train(tmp_path, tiny_preset, "cut", "train.max_steps=4", "train.checkpoint_every=2",
                 "train.keep_checkpoints=2", "train.learning_rate=1e-2")
    whole = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in whole] == [1, 2, 3, 4]
    # What a kill while writing step 4 leaves: no step-4 checkpoint or adapter yet, a cut line.
    shutil.rmtree(run / "checkpoints" / "4")
    shutil.rmtree(run / "adapter")
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines[:3]) + lines[3][:20])
    _train(tmp_path, tiny_preset, "cut", "train.max_steps=4", "train.checkpoint_every=2", "train.keep_checkpoints=2",
           "train.learning_rate=1e-2", resume=True)
    text = (run / "metrics.jsonl").read_text()
    resumed = [json.loads(line) for line in text.splitlines()]  # every line whole
    assert text.endswith("\n") and [r["step"] for r in resumed] == [1, 2, 3, 4]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in whole], rel=1e-5)


def _wandb_records(path: Path) -> list:
    """The protobuf records of a W&B .wandb file: a LevelDB-style log (7-byte file header, then
    32 KiB blocks of chunks, each with crc32, length and type FULL=1, FIRST=2, MIDDLE=3, LAST=4)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's last bytes too short for a chunk header are padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        pending += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def test_wandb_and_mlflow_loggers_write_the_logged_numbers(tiny_preset, tmp_path, monkeypatch):
    """One run with both loggers: W&B offline (its .wandb file read back) and MLflow on a local
    file store (read back with its client) hold metrics.jsonl's per-step numbers and the config."""
    pytest.importorskip("wandb")
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    for key in ("WANDB_API_KEY", "WANDB_BASE_URL", "WANDB_ENTITY"):
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")  # nothing leaves the machine
    monkeypatch.setenv("WANDB_SILENT", "true")
    for key in ("WANDB_DIR", "WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(key, str(tmp_path / "wandb-home" / key.lower()))
    store = tmp_path / "mlruns"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.as_uri())  # a local file store: no server
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 wants a database unless told otherwise
    run = _train(tmp_path, tiny_preset, "logged", "train.max_steps=3", "train.loggers=[wandb,mlflow]")
    logged = read_metrics(run / "metrics.jsonl")
    assert [r["step"] for r in logged] == [1, 2, 3]

    files = list((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    records = _wandb_records(files[0])
    history = [r.history for r in records if r.WhichOneof("record_type") == "history"]
    assert [h.step.num for h in history] == [1, 2, 3]
    values = [{item.key or ".".join(item.nested_key): json.loads(item.value_json) for item in h.item} for h in history]
    assert [v["loss"] for v in values] == pytest.approx([r["loss"] for r in logged])
    assert [v["learning_rate"] for v in values] == pytest.approx([r["learning_rate"] for r in logged])
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert runs and runs[0].display_name == "logged" and runs[0].project == "kerasft"
    config = {item.key: json.loads(item.value_json) for r in runs for item in r.config.update}
    assert config["lora"]["rank"] == 8 and config["train"]["max_steps"] == 3

    client = MlflowClient(tracking_uri=store.as_uri())
    runs = client.search_runs(experiment_ids=["0"])
    assert [r.info.run_name for r in runs] == ["logged"] and runs[0].info.status == "FINISHED"
    run_id = runs[0].info.run_id
    loss = client.get_metric_history(run_id, "loss")
    assert [m.step for m in loss] == [1, 2, 3]
    assert [m.value for m in loss] == pytest.approx([r["loss"] for r in logged])
    assert [m.step for m in client.get_metric_history(run_id, "grad_norm")] == [1, 2, 3]
    params = client.get_run(run_id).data.params
    assert params["lora.rank"] == "8" and params["train.max_steps"] == "3" and params["name"] == "logged"
