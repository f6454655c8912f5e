"""Live controls of a running training job: `kerasft control RUN_DIR save | stop [--keep best|last]
| lr VALUE` drops a request file into RUN_DIR/control/; the training loop picks requests up at
the end of each optimizer step, acts on them and records them in that step's metrics.jsonl line
(under "control"). Stdlib only: the CLI and the studio write requests without keras.

- save: a checkpoint of this step now (also when train.checkpoint_every is 0), for --resume.
- stop: end training after this step; keep "last" (these weights) or "best" (the lowest
  eval_loss so far; needs train.eval_every) as the adapter. Evaluation and export go on as after
  a finished run.
- lr: the learning rate of every later update is VALUE (the schedule is replaced from the next
  step on; the step is recompiled once). A resumed run re-applies the changes its metrics.jsonl
  recorded.
In a multi-process job the requests are not read (every process would have to act on them at the
same step).
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path

from kerasft.errors import KerasftError
from kerasft.paths import RunDir, write_json

ACTIONS = ("save", "stop", "lr")


def request(run_dir: str | Path, action: str, *, keep: str = "last", value: float | None = None) -> Path:
    """Writes one request for the job training in `run_dir`; returns the request file."""
    run = RunDir(run_dir)
    if not run.config.is_file():
        raise KerasftError(f"{run}: not a run dir (no config.yaml)")
    if run.summary.is_file() or run.has_adapter:
        raise KerasftError(f"{run}: training has finished; there is no running job to control")
    if action not in ACTIONS:
        raise KerasftError(f"control action {action!r}: one of {', '.join(ACTIONS)}")
    body: dict = {"action": action}
    if action == "stop":
        if keep not in ("last", "best"):
            raise KerasftError(f"--keep {keep!r}: one of last, best")
        body["keep"] = keep
    if action == "lr":
        if value is None or not math.isfinite(value) or value <= 0:
            raise KerasftError(f"lr {value!r}: the new learning rate must be a number above 0")
        body["value"] = float(value)
    run.control.mkdir(parents=True, exist_ok=True)
    path = run.control / f"{time.time_ns():020d}-{os.getpid()}-{action}.json"
    write_json(path, body)  # the loop never sees a half-written request (its temp name is not *.json)
    return path


def take_requests(run_dir: str | Path) -> list[dict]:
    """The pending requests in the order they were made, removed from the folder. A file that is
    not a valid request is removed with a one-line warning."""
    folder = RunDir(run_dir).control
    if not folder.is_dir():
        return []
    taken = []
    for path in sorted(folder.glob("*.json")):
        try:
            body = json.loads(path.read_text())
            if not isinstance(body, dict) or body.get("action") not in ACTIONS:
                raise ValueError(f"action must be one of {', '.join(ACTIONS)}")
            taken.append(body)
        except (ValueError, OSError) as err:
            print(f"kerasft: warning: {path}: not a control request ({err}); ignored", flush=True)
        path.unlink(missing_ok=True)
    return taken


def recorded_lr_changes(records: list[dict]) -> list[tuple[int, float]]:
    """(first update index, learning rate) of every lr change logged in metrics.jsonl records: a
    change logged with step N applies from update N (the step after it)."""
    changes = []
    for record in records:
        for entry in record.get("control", []):
            if entry.get("action") == "lr":
                changes.append((int(record["step"]), float(entry["value"])))
    return changes
