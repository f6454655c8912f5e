"""The studio's workspace: uploads stored under sanitised names, configs written from form values,
and `kerasft` commands run as subprocesses with their logs. Stdlib + PyYAML only, so this is
tested without gradio.

Layout of a workspace folder:
    uploads/NAME            uploaded data files (sanitised names, allowed types, size-limited)
    configs/RUN.yaml        the configs the studio wrote; `kerasft run configs/RUN.yaml` repeats a run
    runs/RUN/               run dirs (config output_dir)
    logs/RUN.COMMAND.log    stdout and stderr of each command the studio started
    exports/RUN-FORMAT/     exports
    inspect/RUN/            `kerasft data inspect` reports

A run dir's own files (metrics.jsonl, adapter/, eval.json, ...) are named by kerasft.paths.RunDir.

Nothing from an uploaded file is executed or unpickled: files are copied as bytes and read only by
kerasft's data readers (csv, json, openpyxl); configs are written with yaml.safe_dump.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path

from kerasft.config import DataConfig, load_config
from kerasft.data import sources
from kerasft.errors import KerasftError
from kerasft.paths import RunDir
from kerasft.train.logs import read_metrics

UPLOAD_TYPES = (".csv", ".tsv", ".jsonl", ".json", ".txt", ".xlsx")
DEFAULT_MAX_UPLOAD_MB = 100.0
_RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_NATIVE_LOG = re.compile(r"^([IWE]\d{4} [\d:.]+\s+\d+ \S+:\d+\]|WARNING: All log messages before absl)")


def sanitize_filename(name: str) -> str:
    """A safe file name for an upload: the last path component only, ASCII letters, digits,
    `.`, `_` and `-`, no leading dots; raises KerasftError when nothing usable is left."""
    base = re.split(r"[\\/]", str(name))[-1]
    base = unicodedata.normalize("NFKD", base).encode("ascii", "ignore").decode("ascii")
    base = re.sub(r"[^A-Za-z0-9._-]+", "_", base).lstrip("._-")[:100]
    stem, dot, ext = base.rpartition(".")
    if not dot or not stem.strip("._-"):
        raise KerasftError(f"upload {name!r}: not a usable file name (expected e.g. faq.csv)")
    return base


class Workspace:
    """One studio workspace folder (see the module doc)."""

    def __init__(self, root: str | Path, max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB):
        self.root = Path(root).resolve()
        self.max_upload_bytes = int(max_upload_mb * 2**20)
        for sub in ("uploads", "configs", "runs", "logs", "exports", "inspect"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def save_upload(self, source: str | Path, original_name: str) -> Path:
        """Copies an uploaded file into uploads/ under a sanitised, unused name.

        Raises KerasftError (and writes nothing) for a type outside UPLOAD_TYPES, an empty file
        or one over the size limit.
        """
        name = sanitize_filename(original_name)
        suffix = Path(name).suffix.lower()
        if suffix not in UPLOAD_TYPES:
            raise KerasftError(f"upload {original_name!r}: {suffix or 'no extension'} files are not accepted; "
                               f"use {', '.join(UPLOAD_TYPES)}")
        source = Path(source)
        size = source.stat().st_size
        if size == 0:
            raise KerasftError(f"upload {original_name!r}: the file is empty")
        if size > self.max_upload_bytes:
            raise KerasftError(f"upload {original_name!r}: {size / 2**20:.1f} MB is over the "
                               f"{self.max_upload_bytes / 2**20:.0f} MB limit")
        folder = self.root / "uploads"
        target = folder / name
        n = 1
        while target.exists():
            target = folder / f"{Path(name).stem}-{n}{suffix}"
            n += 1
        # The resolved target must stay inside uploads/, whatever the name was.
        if target.resolve().parent != folder:
            raise KerasftError(f"upload {original_name!r}: refused (outside the workspace)")
        partial = target.with_name(target.name + ".part")
        shutil.copyfile(source, partial)
        partial.rename(target)
        return target

    def uploads(self) -> list[Path]:
        return sorted(p for p in (self.root / "uploads").iterdir() if p.is_file() and p.suffix.lower() in UPLOAD_TYPES)

    def config_path(self, name: str) -> Path:
        return self.root / "configs" / f"{check_run_name(name)}.yaml"

    def run_dir(self, name: str) -> RunDir:
        return RunDir(self.root / "runs" / check_run_name(name))

    def log_path(self, name: str, command: str) -> Path:
        return self.root / "logs" / f"{check_run_name(name)}.{command}.log"

    def export_dir(self, name: str, fmt: str) -> Path:
        return self.root / "exports" / f"{check_run_name(name)}-{fmt}"

    def inspect_dir(self, name: str) -> Path:
        return self.root / "inspect" / check_run_name(name)

    def write_config(self, values: dict) -> Path:
        """Writes configs/NAME.yaml from dotted form values ({"train.learning_rate": 2e-4, ...}).

        `name` is required; output_dir is always the workspace's runs/ folder. The config is
        validated with kerasft.config.load_config before it replaces an earlier one, so a bad
        value gives a KerasftError naming the key and leaves nothing half-written.
        """
        raw = nest_values(values)
        name = check_run_name(str(raw.get("name", "")))
        raw["output_dir"] = str(self.root / "runs")
        path = self.config_path(name)
        import yaml

        text = "# written by kerasft studio; repeat with: kerasft run " + str(path) + "\n"
        text += yaml.safe_dump(raw, sort_keys=False, allow_unicode=True)
        partial = path.with_name(path.name + ".part.yaml")
        partial.write_text(text, encoding="utf-8")
        try:
            load_config(partial)
        except KerasftError as err:
            partial.unlink()
            raise KerasftError(str(err).replace(str(partial), "config")) from None
        partial.replace(path)
        return path


def check_run_name(name: str) -> str:
    """Run names become folder and file names: letters, digits, `_`, `-`, `.`; no path parts."""
    if not _RUN_NAME.match(name or "") or ".." in name:
        raise KerasftError(f"run name {name!r}: use letters, digits, _ - . (at most 64, no path separators)")
    return name


def nest_values(values: dict) -> dict:
    """{"a.b": 1, "a.c": 2} -> {"a": {"b": 1, "c": 2}}; None values are left out (config defaults)."""
    raw: dict = {}
    for key, value in values.items():
        if value is None:
            continue
        node = raw
        *parents, leaf = key.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = list(value) if isinstance(value, tuple) else value
    return raw


def peek_columns(path: str | Path, delimiter: str = "", encoding: str = "utf-8", sheet: str = "") -> list[str]:
    """The column names of a CSV/TSV/XLSX file or the keys of a JSONL file's first record, read
    with kerasft's own readers (so delimiter and encoding behave as in training); [] for text
    and SQuAD JSON files, which have fixed fields."""
    path = Path(path)
    cfg = DataConfig(delimiter=delimiter, encoding=encoding, sheet=sheet)
    kind = sources.EXTENSIONS.get(path.suffix.lower())
    readers = {"csv": sources.csv_rows, "tsv": sources.csv_rows, "excel": sources.excel_rows,
               "jsonl": sources.jsonl_rows}
    if kind not in readers:
        return []
    for _, row in readers[kind](path, cfg):
        return [str(key) for key in row]
    raise KerasftError(f"{path.name}: no records")


@dataclass
class Job:
    """One `kerasft` command running as a subprocess, its output going to a log file."""

    argv: list[str]
    log_path: Path
    process: subprocess.Popen | None = None
    started: float = 0.0
    stop_requested: str = ""  # "", "stop" or "pause"
    env: dict = field(default_factory=dict)

    @property
    def command_line(self) -> str:
        return " ".join(_quote(a) for a in ["kerasft", *self.argv[3:]])

    def start(self, cwd: Path) -> "Job":
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("w", encoding="utf-8") as log:
            log.write(f"$ {self.command_line}\n")
            log.flush()
            self.process = subprocess.Popen(self.argv, stdout=log, stderr=subprocess.STDOUT, cwd=str(cwd),
                                            env={"TF_CPP_MIN_LOG_LEVEL": "2", **os.environ, "PYTHONUNBUFFERED": "1", **self.env})
        self.started = time.time()
        return self

    @property
    def returncode(self) -> int | None:
        return None if self.process is None else self.process.poll()

    @property
    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def interrupt(self, timeout: float | None = 30.0) -> int | None:
        """Ctrl-C for the subprocess (kerasft closes its log and pending checkpoint writes), then
        SIGKILL if it has not ended after `timeout` seconds; timeout None returns at once."""
        if not self.running:
            return self.returncode
        self.process.send_signal(signal.SIGINT)
        if timeout is None:
            return None
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def wait(self, timeout: float | None = None) -> int:
        return self.process.wait(timeout)

    def log_text(self, tail_chars: int = 6000) -> str:
        """The end of the command's output, without the C++ start-up chatter of XLA and TF."""
        if not self.log_path.is_file():
            return ""
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "".join(line for line in text.splitlines(keepends=True) if not _NATIVE_LOG.match(line))[-tail_chars:]


def kerasft_argv(*args: str) -> list[str]:
    """The `kerasft` CLI under this interpreter: the studio runs the same commands a user types."""
    return [sys.executable, "-m", "kerasft", *map(str, args)]


def training_progress(run_dir: str | Path) -> dict:
    """What a training run has done so far, from RUN_DIR/metrics.jsonl: the loss curve, and the
    step, planned total, tokens/s (0.0 until measured) and ETA in seconds of its last record.

    Values the trainer did not record are None. A half-written last line (a run cut mid-write) is
    left out; any other bad line raises KerasftError naming the file and line.
    """
    records = read_metrics(RunDir(run_dir).metrics)
    last = records[-1] if records else {}
    return {"records": records, "step": last.get("step", 0), "total": last.get("total_steps"),
            "tokens_per_second": last.get("tokens_per_second"), "eta_seconds": last.get("eta_seconds")}


def latest_checkpoint(run_dir: str | Path) -> int | None:
    """The newest complete checkpoint step under RUN_DIR/checkpoints (orbax writes into a
    temporary folder and renames it to the bare step number when done)."""
    folder = RunDir(run_dir).checkpoints
    steps = [int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit()] if folder.is_dir() else []
    return max(steps) if steps else None


def read_json(path: str | Path) -> dict | None:
    """A JSON object a command wrote; None when the file is missing. Raises KerasftError naming the
    file when it is not a JSON object."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise KerasftError(f"{path}: not readable as JSON ({err})") from None
    if not isinstance(data, dict):
        raise KerasftError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def folder_bytes(path: str | Path) -> int:
    """Bytes of the files under `path` (0 when missing); files removed while counting are skipped."""
    total = 0
    for root, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                pass
    return total


def storage_usage(run_dir: str | Path) -> dict:
    """Bytes of RUN_DIR/checkpoints and of the whole run dir, and the free bytes of the disk that
    holds it (shutil.disk_usage of its nearest existing folder)."""
    run = RunDir(run_dir)
    existing = run.root
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    return {"checkpoints": folder_bytes(run.checkpoints), "run_dir": folder_bytes(run.root),
            "disk_free": shutil.disk_usage(existing).free}


def machine_usage(pid: int | None = None) -> dict:
    """CPU utilisation (percent of all cores since the previous call) and memory of this machine,
    and of process `pid` with its children (the training subprocess), from psutil."""
    import psutil

    memory = psutil.virtual_memory()
    usage = {"cpu_percent": psutil.cpu_percent(interval=None), "cpus": psutil.cpu_count(),
             "memory_used": memory.total - memory.available, "memory_total": memory.total,
             "process_rss": None, "process_cpu_percent": None}
    if pid:
        try:
            process = psutil.Process(pid)
            tree = [process, *process.children(recursive=True)]
            usage["process_rss"] = sum(p.memory_info().rss for p in tree)
            usage["process_cpu_percent"] = sum(p.cpu_percent(interval=0.05) for p in tree)
        except psutil.Error:  # the job ended between the check and the reading
            pass
    return usage


def gpu_usage() -> list[dict]:
    """Utilisation (percent busy) and memory of each NVIDIA GPU, from `nvidia-smi` (it comes with the
    driver); [] where there is none or it does not answer within 5 s. JAX reports no utilisation, and
    TPUs have no such tool on every host, so TPUs are not listed."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return []
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=index,utilization.gpu,memory.used,memory.total",
                              "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return []
    gpus = []
    for line in out.stdout.splitlines() if out.returncode == 0 else []:
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 4 and all(f.replace(".", "", 1).isdigit() for f in fields):
            index, busy, used, total = fields
            gpus.append({"index": int(index), "utilization_percent": float(busy),
                         "memory_used": int(float(used)) << 20, "memory_total": int(float(total)) << 20})
    return gpus


def sweep_folders(root: str | Path) -> list[Path]:
    """Folders under `root` that hold a sweep.json (written by `kerasft sweep`), sorted."""
    return sorted(p.parent for p in Path(root).rglob("sweep.json") if p.is_file())


def sweep_view(folder: str | Path) -> dict:
    """A sweep folder's sweep.json as a table (one row per trial: name, swept values, status,
    validation score, final training loss), its rule, best trial, test scores and sensitivity PNGs."""
    folder = Path(folder)
    spec = read_json(folder / "sweep.json")
    if spec is None:
        raise KerasftError(f"{folder}: no sweep.json (not a `kerasft sweep` folder)")
    keys = list(spec.get("axes") or {})
    metric = spec.get("metric") or "score"
    rows = []
    for trial in spec.get("trials") or []:
        overrides = trial.get("overrides") or {}
        rows.append({"trial": trial.get("name", "") + (" (best)" if trial.get("name") == spec.get("best") else ""),
                     **{key: overrides.get(key, "") for key in keys}, "status": trial.get("status", ""),
                     f"validation {metric}": trial.get("score"), "final train loss": trial.get("train_loss")})
    plots = sorted((folder / "plots").glob("sensitivity_*.png")) if (folder / "plots").is_dir() else []
    return {"columns": ["trial", *keys, "status", f"validation {metric}", "final train loss"], "rows": rows,
            "rule": spec.get("rule", ""), "best": spec.get("best"), "test": spec.get("test"), "plots": plots}


def _quote(arg: str) -> str:
    return shlex.quote(str(arg))
