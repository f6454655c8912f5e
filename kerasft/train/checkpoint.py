"""Resumable training state with orbax: trainable weights (LoRA + token rows), optimizer state,
step and data position.

A checkpoint is written every `train.checkpoint_every` optimizer steps into RUN_DIR/checkpoints/STEP;
orbax writes into a temporary folder and renames it when complete (a killed process leaves no
half checkpoint that a resume would read), in a background thread, and keeps the newest
`train.keep_checkpoints`. The step itself draws no random numbers and batches are a pure
function of (seed, epoch, batch index), so (step, epoch, batch) and the seed are the whole
position: a resumed run computes the same bits as an uninterrupted one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kerasft.errors import KerasftError


@dataclass(frozen=True)
class Position:
    """Where a run stands: optimizer steps done, and the (epoch, batch) of the next micro-batch."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


class Checkpointer:
    """Saves and restores {"trainable", "opt_state"} plus a Position under one folder."""

    def __init__(self, directory: str | Path, keep: int):
        import orbax.checkpoint as ocp

        self.directory = Path(directory).resolve()
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, state, position: Position, meta: dict) -> None:
        """Starts an asynchronous save of `state` at `position.step`.

        The arrays are copied first: the training step donates its input buffers, and the
        background writer must not read a buffer the next step is overwriting.
        """
        import jax
        import orbax.checkpoint as ocp

        snapshot = jax.tree.map(lambda x: x.copy(), state)
        record = {"step": position.step, "epoch": position.epoch, "batch": position.batch, **meta}
        self._manager.save(
            position.step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(snapshot), position=ocp.args.JsonSave(record)),
        )

    def restore(self, like, meta: dict):
        """Restores the newest checkpoint into the structure, shapes and shardings of `like`.

        Raises KerasftError when the checkpoint was written with another `meta` (seed, step
        count, batch size...), since continuing it would silently train a different run.
        """
        import jax
        import orbax.checkpoint as ocp

        step = self._manager.latest_step()
        abstract = jax.tree.map(
            lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), like
        )
        try:
            restored = self._manager.restore(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract), position=ocp.args.JsonRestore()),
            )
        except Exception as err:  # orbax raises ValueError/KeyError/... on a tree that does not match
            first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
            raise KerasftError(f"{self.directory / str(step)}: cannot restore this checkpoint: {first_line}") from err
        record = dict(restored["position"])
        for key, value in meta.items():
            if record.get(key) != value:
                raise KerasftError(
                    f"{self.directory / str(step)}: checkpoint has {key}={record.get(key)!r} but this run has "
                    f"{value!r}; resume with the run's own config (RUN_DIR/config.yaml)"
                )
        position = Position(step=int(record["step"]), epoch=int(record["epoch"]), batch=int(record["batch"]))
        return restored["state"], position

    def close(self) -> None:
        """Waits for a save in flight and releases orbax's threads."""
        self._manager.wait_until_finished()
        self._manager.close()
