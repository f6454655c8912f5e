"""Where things are written: the run-folder layout, named once, and folders that appear whole or not
at all. Stdlib only: the CLI, the studio and the model card read run dirs without keras.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from kerasft.errors import KerasftError


@dataclass(frozen=True)
class RunDir:
    """The files of one run folder (config `output_dir/name`).

    Every module that reads or writes a run dir takes the names from here, so the layout is
    spelled in one place.
    """

    root: Path

    def __post_init__(self):
        object.__setattr__(self, "root", Path(self.root))

    def __fspath__(self) -> str:
        return str(self.root)

    def __str__(self) -> str:
        return str(self.root)

    @property
    def config(self) -> Path:
        """The resolved config the run used (`kerasft run RUN_DIR/config.yaml` repeats it)."""
        return self.root / "config.yaml"

    @property
    def data(self) -> Path:
        """The exact examples of each split, as JSONL."""
        return self.root / "data"

    @property
    def adapter(self) -> Path:
        """The trained LoRA adapter folder."""
        return self.root / "adapter"

    @property
    def adapter_config(self) -> Path:
        return self.adapter / "adapter_config.json"

    @property
    def has_adapter(self) -> bool:
        """Whether training finished and saved its adapter."""
        return self.adapter_config.is_file()

    @property
    def checkpoints(self) -> Path:
        """Orbax checkpoints for `kerasft train --resume`."""
        return self.root / "checkpoints"

    @property
    def metrics(self) -> Path:
        """One JSON line per optimizer step (and per validation)."""
        return self.root / "metrics.jsonl"

    @property
    def samples(self) -> Path:
        """Generations logged during training (train.sample_every)."""
        return self.root / "samples.jsonl"

    @property
    def best_adapter(self) -> Path:
        """The trainable weights at the best validation loss (early stopping)."""
        return self.root / "best_adapter.npz"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def control(self) -> Path:
        """Requests to a running training job (`kerasft control`: save, stop, lr)."""
        return self.root / "control"

    @property
    def lineage(self) -> Path:
        """Where the run came from: versions, commit, machine, data hashes, config and seeds
        (kerasft.lineage)."""
        return self.root / "lineage.json"

    @property
    def failed(self) -> Path:
        """Present while a run that started did not finish."""
        return self.root / "FAILED"

    def eval_result(self, which: str) -> Path:
        """eval.json for the fine-tuned model, eval_base.json for the base model."""
        if which not in ("tuned", "base"):
            raise ValueError(f"which must be 'tuned' or 'base', got {which!r}")
        return self.root / ("eval.json" if which == "tuned" else "eval_base.json")

    @property
    def eval_table(self) -> Path:
        return self.root / "eval_table.txt"

    @property
    def report_md(self) -> Path:
        return self.root / "report.md"

    @property
    def report_json(self) -> Path:
        return self.root / "report.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def data_inspect(self) -> Path:
        """`kerasft data inspect` writes here unless --out says otherwise."""
        return self.root / "data_inspect"

    def export(self, fmt: str) -> Path:
        """Where `kerasft run` writes its export in format `fmt` (export_hf, export_peft, export_gguf)."""
        return self.root / f"export_{fmt}"

    @classmethod
    def is_run_dir(cls, path: str | Path) -> bool:
        """Whether `path` looks like a run folder (it has a config, a summary or an adapter)."""
        run = cls(Path(path))
        return run.has_adapter or run.config.is_file() or run.summary.is_file()


def write_json(path: str | Path, data) -> None:
    """Writes `data` as indented UTF-8 JSON through a temporary sibling renamed into place, so a
    reader (the studio, a resumed sweep, a training loop polling for requests) never sees half a file."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


@contextlib.contextmanager
def staged_dir(out: str | Path, overwrite: bool):
    """Yields an empty folder beside `out` that replaces `out` when the block succeeds and is
    removed when it fails, so readers never see a half-written folder.

    Raises KerasftError before anything is written when `out` exists and not `overwrite`, and
    when another writer created `out` meanwhile (and not `overwrite`).
    """
    out = Path(out)
    if out.exists() and not overwrite:
        raise KerasftError(f"{out}: already exists; pass --overwrite to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        yield staging
        if out.exists():
            if not overwrite:  # appeared while we were writing
                raise KerasftError(f"{out}: already exists; pass --overwrite to replace it")
            # Move the old folder aside first: `out` is never missing for longer than two renames.
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            out.rename(old / out.name)
            try:
                staging.rename(out)
            except OSError:
                (old / out.name).rename(out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            staging.rename(out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
