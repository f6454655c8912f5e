"""Where training metrics go: RUN_DIR/metrics.jsonl always, plus TensorBoard, Weights & Biases or
MLflow when train.loggers names them, and PNGs of the learning-rate schedule and the loss curves
at the end. Only the primary process of a multi-process job logs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from kerasft.errors import KerasftError
from kerasft.paths import RunDir

LR_PLOT = "lr_schedule.png"
LOSS_PLOT = "loss_curves.png"
PREFERENCE_PLOT = "preference_curves.png"


class RunLog:
    """Appends one JSON line per record to metrics.jsonl and forwards the numbers to the
    configured loggers. `log(record)` takes a dict with a "step" and numeric fields."""

    def __init__(self, run_dir: str | Path, loggers=(), *, config: dict | None = None, name: str = "run",
                 primary: bool = True):
        self.run_dir = Path(run_dir)
        self.primary = primary
        path = RunDir(self.run_dir).metrics
        if primary and path.is_file():
            drop_records_after(path, math.inf)  # a killed run's half-written line must not prefix the next record
        self._jsonl = path.open("a", encoding="utf-8") if primary else None
        self._sinks = [_open_sink(kind, self.run_dir, config or {}, name) for kind in loggers] if primary else []

    def log(self, record: dict) -> None:
        if not self.primary:
            return
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()
        step = int(record["step"])
        scalars = {k: float(v) for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for sink in self._sinks:
            sink.log(step, scalars)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
            self._jsonl = None
        for sink in self._sinks:
            sink.close()
        self._sinks = []


def _open_sink(kind: str, run_dir: Path, config: dict, name: str):
    if kind == "tensorboard":
        return _TensorBoard(RunDir(run_dir).tensorboard)
    if kind == "wandb":
        return _WandB(run_dir, config, name)
    if kind == "mlflow":
        return _MLflow(config, name)
    raise KerasftError(f"train.loggers: {kind!r} is not one of tensorboard, wandb, mlflow")


class _TensorBoard:
    """Event files through tensorflow's tf.summary (tensorflow comes with keras-hub), else tensorboardX."""

    def __init__(self, folder: Path):
        folder.mkdir(parents=True, exist_ok=True)
        try:
            import tensorflow as tf

            from tensorflow.core.framework import summary_pb2

            self._tf, self._writer = tf, tf.summary.create_file_writer(str(folder))
            plugin = summary_pb2.SummaryMetadata.PluginData(plugin_name="scalars")
            self._scalar_metadata = summary_pb2.SummaryMetadata(plugin_data=plugin).SerializeToString()
        except ImportError:
            try:
                from tensorboardX import SummaryWriter
            except ImportError:
                raise KerasftError("train.loggers: tensorboard needs tensorflow or tensorboardX: "
                                   "pip install tensorboardX") from None
            self._tf, self._writer = None, SummaryWriter(str(folder))

    def log(self, step: int, scalars: dict) -> None:
        if self._tf is None:
            for key, value in scalars.items():
                self._writer.add_scalar(key, value, step)
            return
        with self._writer.as_default(step=step):
            for key, value in scalars.items():
                # tf.summary.scalar needs the tensorboard package; this is what it writes.
                self._tf.summary.write(key, self._tf.constant(value, self._tf.float32), metadata=self._scalar_metadata)
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()


class _WandB:
    def __init__(self, run_dir: Path, config: dict, name: str):
        try:
            import wandb
        except ImportError:
            raise KerasftError("train.loggers: wandb is not installed: pip install wandb") from None
        self._run = wandb.init(project="kerasft", name=name, dir=str(run_dir), config=config)

    def log(self, step: int, scalars: dict) -> None:
        self._run.log(scalars, step=step)

    def close(self) -> None:
        self._run.finish()


class _MLflow:
    def __init__(self, config: dict, name: str):
        try:
            import mlflow
        except ImportError:
            raise KerasftError("train.loggers: mlflow is not installed: pip install mlflow") from None
        self._mlflow = mlflow
        mlflow.start_run(run_name=name)
        mlflow.log_params(_flatten(config))

    def log(self, step: int, scalars: dict) -> None:
        self._mlflow.log_metrics(scalars, step=step)

    def close(self) -> None:
        self._mlflow.end_run()


def _flatten(config: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = str(value)[:250]  # MLflow caps parameter values
    return flat


def read_metrics(path: str | Path) -> list[dict]:
    """The records of a metrics.jsonl file (or any step-keyed JSON-lines log such as samples.jsonl),
    in order; [] when there is no file.

    A last line that is not a complete record is left out: a process killed mid-write leaves one.
    Any other line that is not a JSON object with a "step" raises a KerasftError naming the file
    and line. Blank lines are ignored.
    """
    path = Path(path)
    if not path.is_file():
        return []
    return [record for _, record in _records(path)]


def drop_records_after(path: str | Path, last_step: int) -> None:
    """Rewrites a step-keyed JSON-lines log without the records past `last_step` and without a
    half-written last line, so a resumed run can log those steps again and append whole lines."""
    path = Path(path)
    if not path.is_file():
        return
    text = path.read_text(encoding="utf-8")
    kept = [line for line, record in _records(path, text) if record["step"] <= last_step]
    if "".join(line + "\n" for line in kept) != text:
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _records(path: Path, text: str | None = None) -> list[tuple[str, dict]]:
    """(line, record) for each record line of a JSON-lines log; see read_metrics."""
    text = path.read_text(encoding="utf-8") if text is None else text
    lines = text.splitlines()
    last = max((n for n, line in enumerate(lines) if line.strip()), default=-1)
    records = []
    for n, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict) and isinstance(record.get("step"), (int, float)):
            records.append((line, record))
        elif n != last:
            raise KerasftError(f"{path}:{n + 1}: not a JSON object with a step: {line[:80]!r}")
    return records


def draw_loss_curve(records: list[dict], path: str | Path) -> Path:
    """Draws the training loss per step and eval_loss where it was measured (records as
    read_metrics returns them) into a PNG at `path`. Needs matplotlib (the eval extra)."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    train = [r for r in records if "loss" in r and math.isfinite(r["loss"])]
    evals = [r for r in records if "eval_loss" in r and math.isfinite(r["eval_loss"])]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], color="tab:blue", alpha=0.8, label="train loss")
    if evals:
        ax.plot([r["step"] for r in evals], [r["eval_loss"] for r in evals], "o-", color="tab:red", label="eval loss")
    ax.set(xlabel="optimizer step", ylabel="loss (nats per target token)", title="Loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def write_plots(run_dir: str | Path, schedule, total_steps: int) -> list[Path]:
    """Writes RUN_DIR/lr_schedule.png (the whole planned schedule, with the steps run marked) and
    RUN_DIR/loss_curves.png (draw_loss_curve).

    Args:
        schedule: the optax schedule, step -> learning rate (step 0 is the first update).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise KerasftError("train.plots needs matplotlib: pip install 'kerasft[eval]' (or set train.plots=false)") from None
    run_dir = Path(run_dir)
    records = read_metrics(RunDir(run_dir).metrics)
    train = [r for r in records if "loss" in r]

    fig, ax = plt.subplots(figsize=(6, 3.5))
    steps = list(range(1, total_steps + 1))
    ax.plot(steps, [float(schedule(s - 1)) for s in steps], color="tab:blue", label="planned")
    if train:
        ax.plot([r["step"] for r in train], [r["learning_rate"] for r in train], ".", color="tab:orange",
                markersize=3, label="steps run")
    ax.set(xlabel="optimizer step", ylabel="learning rate", title="Learning-rate schedule")
    ax.legend()
    fig.tight_layout()
    fig.savefig(run_dir / LR_PLOT, dpi=100)
    plt.close(fig)
    written = [run_dir / LR_PLOT, draw_loss_curve(records, run_dir / LOSS_PLOT)]
    if any("reward_accuracy" in r for r in records):
        written.append(draw_preference_curves(records, run_dir / PREFERENCE_PLOT))
    return written


def draw_preference_curves(records: list[dict], path: str | Path) -> Path:
    """A dpo / orpo run's reward accuracy and margin (left) and chosen / rejected log-probs
    (right) per step, with the held-out pairs' values where they were measured."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [r for r in records if "reward_accuracy" in r]
    evals = [r for r in records if "eval_reward_accuracy" in r]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    steps = [r["step"] for r in train]
    left.plot(steps, [r["reward_accuracy"] for r in train], color="tab:blue", alpha=0.8, label="reward accuracy")
    left.plot(steps, [r["reward_margin"] for r in train], color="tab:green", alpha=0.8, label="reward margin")
    right.plot(steps, [r["chosen_logps"] for r in train], color="tab:blue", alpha=0.8, label="chosen log-prob")
    right.plot(steps, [r["rejected_logps"] for r in train], color="tab:red", alpha=0.8, label="rejected log-prob")
    if evals:
        eval_steps = [r["step"] for r in evals]
        left.plot(eval_steps, [r["eval_reward_accuracy"] for r in evals], "o-", color="tab:purple",
                  label="held-out accuracy")
        left.plot(eval_steps, [r["eval_reward_margin"] for r in evals], "s-", color="tab:olive", label="held-out margin")
    left.set(xlabel="optimizer step", title="Rewards")
    right.set(xlabel="optimizer step", title="Log-probabilities of the answers")
    left.legend(fontsize=7)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)
