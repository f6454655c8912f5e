"""LoRA supervised fine-tuning: one pure, jitted step (stateless backbone call, response-only
logits, the optax optimizer of kerasft.train.optim) and the loop that feeds it.

build_step makes the step that train() runs; the memory plan (kerasft.train.plan) and the
benchmarks (scripts/bench.py, scripts/experiments/profile_step.py) build theirs with it too, so
what is planned and measured is what runs. The loss is kerasft.train.loss.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kerasft.config import RunConfig, TrainConfig
from kerasft.data.pipeline import TokenizedSet, batch_width, epoch_batches, make_batch
from kerasft.errors import KerasftError
from kerasft.paths import RunDir
from kerasft.runtime import batch_shards, is_primary, place_batch, process_count
from kerasft.train.checkpoint import Checkpointer, Position
from kerasft.train.control import recorded_lr_changes, take_requests
from kerasft.train.logs import RunLog, drop_records_after, read_metrics, write_plots
from kerasft.train.loss import PREFERENCE_STATS, make_loss_fn, make_preference_loss_fn, make_sequence_logps
from kerasft.train.optim import build_optimizer


@dataclass(frozen=True)
class TrainSpec:
    """train()'s slice of a run: the train section (with train.objective: sft, or dpo / orpo on
    preference pairs, whose step takes batches of 2 x batch_size rows and, for dpo, runs the
    model twice: see kerasft.train.loss), and the three things the step needs from
    elsewhere: lora.dropout, the token ids whose embedding rows train with the adapters (the
    turn tokens; see kerasft.train.loss.make_loss_fn), and the tokenizer's padding id."""

    train: TrainConfig
    dropout: float = 0.0
    token_rows: tuple[int, ...] = ()
    pad_id: int = 0

    @classmethod
    def of(cls, cfg: RunConfig, token_rows=(), pad_id: int = 0) -> "TrainSpec":
        """The spec of a run config, with the token rows and padding id its tokenizer gives."""
        return cls(cfg.train, cfg.lora.dropout, tuple(int(t) for t in token_rows), int(pad_id))


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    seconds: float
    tokens_per_second: float
    best_step: int = 0  # the evaluation with the lowest eval_loss (0: no evaluation)
    best_eval_loss: float = math.inf
    stopped_early: bool = False


def make_train_step(backbone, optimizer, token_rows=None, dropout: float = 0.0, train_cfg: TrainConfig | None = None):
    """The jitted update: (params, opt_state, non_trainable, batch[, rng]) -> new state and stats.
    With lora `dropout` > 0 it takes a fifth argument, the step's PRNG key (dropout_key).

    train_cfg.objective picks the loss: sft (make_loss_fn) or dpo / orpo on preference pairs
    (make_preference_loss_fn, whose statistics join stats). stats["grad_norm"] is the global
    norm of the gradient the optimizer steps with: under gradient accumulation, the mean over the
    micro-batches so far (optax.MultiSteps' running mean), which at the last micro-batch is the
    whole step's gradient."""
    preference = train_cfg is not None and train_cfg.objective != "sft"
    if preference:
        loss_fn = make_preference_loss_fn(backbone, train_cfg, token_rows, dropout)
    else:
        sft_loss = make_loss_fn(backbone, token_rows, dropout)

        def loss_fn(*args):
            loss, weight_sum = sft_loss(*args)
            return loss, {"targets": weight_sum}
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(trainable, opt_state, non_trainable, batch, *rng):
        (loss, aux), grads = grad_fn(trainable, non_trainable, batch, *rng)
        seen = grads
        if isinstance(opt_state, optax.MultiStepsState):
            done = opt_state.mini_step
            seen = jax.tree.map(lambda g, acc: acc + (g - acc) / (done + 1), grads, opt_state.acc_grads)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, {"loss": loss, "grad_norm": optax.global_norm(seen), **aux}

    return jax.jit(step, donate_argnums=(0, 1))


def make_eval_step(backbone, token_rows=None):
    """The jitted evaluation: (params, non_trainable, batch) -> (sum of weighted NLL, sum of
    weights); the training loss without gradient or dropout."""
    loss_fn = make_loss_fn(backbone, token_rows)

    def evaluate(trainable, non_trainable, batch):
        loss, weight_sum = loss_fn(trainable, non_trainable, batch)
        return loss * weight_sum, weight_sum

    return jax.jit(evaluate)


def dropout_key(seed: int, micro_step: int):
    """The LoRA-dropout PRNG key of a micro-step: a pure function of (train.seed, step), so a
    resumed run draws the same masks."""
    return jax.random.fold_in(jax.random.PRNGKey(seed), micro_step)


def apply_remat(backbone, mode: str) -> None:
    """train.remat: `full` recomputes each decoder block's activations in the backward pass
    (keras' RematScope mode "full", i.e. jax.checkpoint, on every transformer layer)."""
    import keras  # not at the top: keras must be imported after runtime.init_backend picks JAX

    scope = keras.RematScope(mode="full") if mode == "full" else None
    for block in backbone.transformer_layers:
        block._remat_mode = scope


@dataclass(frozen=True)
class TrainStep:
    """The training step of a backbone and spec, with what it is called with. `fn` takes
    (trainable, opt_state, non_trainable, batch, *rng(micro_step)) and returns the new trainable
    weights, optimizer state and stats; `batch` is make_batch's dict (accumulation_batches adds
    the step's loss normaliser under gradient accumulation)."""

    fn: Callable
    optimizer: optax.GradientTransformation
    schedule: Callable
    spec: TrainSpec

    def state(self, backbone, leaf: Callable | None = None) -> tuple:
        """The step's first (trainable, opt_state, non_trainable): the adapters and the frozen
        weights, a zero update of the trained token rows, the optimizer's initial state.

        Args:
            leaf: maps each keras variable to the step's argument; default its value. Given
                jax.ShapeDtypeStructs (the memory plan), the whole state comes back abstract.
        """
        leaf = leaf or (lambda variable: variable.value)
        lora = [leaf(v) for v in backbone.trainable_variables]
        non_trainable = [leaf(v) for v in backbone.non_trainable_variables]
        hidden = backbone.token_embedding.embeddings.shape[1]
        rows = len(self.spec.token_rows)

        def initial(lora):
            trainable = {"lora": lora}
            if rows:
                trainable["token_delta"] = jnp.zeros((rows, hidden), jnp.float32)
            return trainable, self.optimizer.init(trainable)

        if lora and all(isinstance(x, jax.ShapeDtypeStruct) for x in lora):
            trainable, opt_state = jax.eval_shape(initial, lora)
            trainable["lora"] = lora  # with their shardings
        else:
            trainable, opt_state = initial(lora)
        return trainable, opt_state, non_trainable

    def rng(self, micro_step: int) -> tuple:
        """The step's trailing arguments at a micro-step: its dropout key when lora.dropout > 0."""
        return (dropout_key(self.spec.train.seed, micro_step),) if self.spec.dropout > 0 else ()


def build_step(backbone, spec: TrainSpec, total_steps: int, lr_changes: tuple = ()) -> TrainStep:
    """The step train() runs for `spec` over a run of `total_steps` optimizer steps (the
    schedule's length): train.remat applied to the backbone, the optimizer, the jitted update.
    lr_changes: (first update, learning rate) pairs from `kerasft control RUN_DIR lr`."""
    apply_remat(backbone, spec.train.remat)
    optimizer, schedule = build_optimizer(spec.train, total_steps, tuple(lr_changes))
    fn = make_train_step(backbone, optimizer, spec.token_rows or None, spec.dropout, spec.train)
    return TrainStep(fn, optimizer, schedule, spec)


def accumulation_batches(micro_batches: list[dict]) -> list[dict]:
    """The micro-batches of one optimizer step, each carrying the step's loss normaliser when
    there are several: max(sum of the target weights of all of them, 1) / their number, one
    equal value a row ("loss_normaliser"). optax.MultiSteps averages the micro-batches'
    gradients, so the step then follows the sum of every weighted NLL over the whole step's
    weights: the gradient of one batch of all the rows (a per-micro-batch normaliser would
    weigh a target by how many others share its micro-batch)."""
    if len(micro_batches) == 1:
        return micro_batches
    weight = sum(float(np.sum(b["target_weights"], dtype=np.float64)) for b in micro_batches)
    value = np.float32(max(weight, 1.0) / len(micro_batches))
    return [{**b, "loss_normaliser": np.full(len(b["token_ids"]), value, np.float32)} for b in micro_batches]


def planned_steps(num_examples: int, cfg: TrainConfig) -> int:
    """Optimizer steps for a run: max_steps when set, otherwise epochs over the data."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    micro = math.ceil(num_examples / cfg.batch_size)
    return math.ceil(micro * cfg.epochs / cfg.grad_accum)


def train(backbone, data: TokenizedSet, spec: TrainSpec, run_dir: str | Path, *, resume: bool = False,
          validation: TokenizedSet | None = None, sampler=None, config: dict | None = None,
          name: str = "run") -> TrainResult:
    """Trains the LoRA adapters (and the embedding rows of spec.token_rows) in place.

    Args:
        backbone: a keras-hub backbone with LoRA enabled.
        data: tokenised training examples (batches are padded within data.sequence_length).
        spec: the train section and what the step needs besides (TrainSpec.of(cfg, ...)).
        run_dir: metrics.jsonl is appended here, one line per optimizer step; checkpoints go to
            run_dir/checkpoints every train.checkpoint_every steps.
        resume: continue from the newest checkpoint in run_dir (from the start if there is none).
        validation: tokenised validation examples, for train.eval_every (eval_loss, early stopping).
        sampler: called every train.sample_every steps with the current weights in the backbone;
            returns [{"prompt", "output"}], appended to run_dir/samples.jsonl with the step.
        config / name: the run's config and name, for the wandb and mlflow loggers.
    """
    cfg = spec.train
    shards = batch_shards()
    if cfg.batch_size % shards:
        raise KerasftError(f"train.batch_size: {cfg.batch_size} does not split over the mesh's {shards}-way batch axis")
    if cfg.eval_every and not validation:
        raise KerasftError("train.eval_every needs a validation split: set data.validation or data.split.ratios")
    preference = cfg.objective != "sft"
    if preference != data.pairs:
        raise KerasftError(f"train.objective {cfg.objective}: the data are "
                           f"{'preference pairs' if data.pairs else 'single responses'}; "
                           f"{'dpo and orpo train on pairs' if preference else 'sft trains on single responses'}")
    steps = planned_steps(data.num_examples, cfg)
    micro_steps = steps * cfg.grad_accum
    train_step = build_step(backbone, spec, steps)
    token_rows = spec.token_rows or None
    trainable, opt_state, non_trainable = train_step.state(backbone)
    num_targets = data.num_targets

    paths = RunDir(Path(run_dir))
    paths.root.mkdir(parents=True, exist_ok=True)
    # What must match for a checkpoint to continue this run bit for bit.
    identity = {"seed": cfg.seed, "steps": steps, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                "examples": data.num_examples}
    position = Position()
    checkpoints = Checkpointer(paths.checkpoints, cfg.keep_checkpoints) if cfg.checkpoint_every or resume else None
    if resume and checkpoints.latest_step() is not None:
        state, position = checkpoints.restore({"trainable": trainable, "opt_state": opt_state}, identity)
        trainable, opt_state = state["trainable"], state["opt_state"]
        print(f"  resuming at step {position.step}/{steps} (epoch {position.epoch}, batch {position.batch})", flush=True)
    elif resume:
        print("  no checkpoint to resume from: starting at step 0", flush=True)
    primary = is_primary()  # in a multi-process job only process 0 writes logs and samples
    if primary:
        drop_records_after(paths.metrics, position.step)
        drop_records_after(paths.samples, position.step)
    # Learning-rate changes made with `kerasft control` before the resumed step apply again.
    lr_changes = recorded_lr_changes(read_metrics(paths.metrics)) if position.step else []
    if lr_changes:
        train_step = build_step(backbone, spec, steps, lr_changes)
    controlled = process_count() == 1  # every process would have to act on a request at the same step
    if controlled:
        take_requests(paths.root)  # requests left from an earlier job are stale
    asked: dict = {}
    # Early stopping continues from the evaluations already logged (a resumed run re-reads them).
    stopper = _EarlyStopping(cfg, [r for r in read_metrics(paths.metrics) if "eval_loss" in r], paths.best_adapter,
                             trainable)
    evaluate = None
    if cfg.eval_every:
        evaluate = (pair_evaluation(backbone, validation, spec) if preference
                    else _validation_loss(backbone, token_rows, validation, cfg, spec.pad_id))
    log = RunLog(paths.root, cfg.loggers, config=config, name=name, primary=primary)
    batches = _batch_stream(data, cfg.batch_size, cfg.seed, position.epoch, position.batch)
    started = time.perf_counter()
    timed_tokens, timed_seconds, timed_micro = 0, 0.0, 0
    loss = float("nan")
    first_micro = position.step * cfg.grad_accum
    step = position.step
    try:
        while step < steps:
            # One optimizer step: grad_accum micro-batches, normalised together.
            group = [next(batches) for _ in range(cfg.grad_accum)]
            host_batches = accumulation_batches([make_batch(data, indices, num_targets, spec.pad_id)
                                                 for _, _, indices in group])
            epoch, index, _ = group[-1]
            losses, step_tokens, step_seconds = [], 0, 0.0
            step_stats = {name: [] for name in PREFERENCE_STATS} if preference else {}
            for host_batch in host_batches:
                micro = step * cfg.grad_accum + len(losses)
                batch = place_batch(host_batch)  # the global batch; each process places its own rows
                tick = time.perf_counter()
                trainable, opt_state, stats = train_step.fn(trainable, opt_state, non_trainable, batch,
                                                            *train_step.rng(micro))
                losses.append(float(stats["loss"]))  # device sync: the step is done after this
                for name in step_stats:
                    step_stats[name].append(float(stats[name]))
                took = time.perf_counter() - tick
                real_tokens = int(np.sum(host_batch["padding_mask"]))
                step_tokens, step_seconds = step_tokens + real_tokens, step_seconds + took
                if micro > first_micro:  # the first step includes compilation
                    timed_tokens += real_tokens
                    timed_seconds += took
                    timed_micro += 1
            step += 1
            loss = float(np.mean(losses))
            rate = timed_tokens / timed_seconds if timed_seconds else 0.0
            eta = timed_seconds / max(timed_micro, 1) * (micro_steps - step * cfg.grad_accum)
            record = {
                "step": step,
                "epoch": epoch,
                "loss": loss,
                "grad_norm": float(stats["grad_norm"]),
                "learning_rate": float(train_step.schedule(step - 1)),
                "tokens": step_tokens,
                "step_seconds": round(step_seconds, 4),
                "total_steps": steps,
                "tokens_per_second": float(rate),
                "eta_seconds": float(eta),
                **{name: float(np.mean(values)) for name, values in step_stats.items()},
                **device_memory(),
            }
            finite = math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])
            if finite and evaluate and (step % cfg.eval_every == 0 or step == steps):
                record.update(evaluate(trainable, non_trainable))
            requests = take_requests(paths.root) if controlled and finite else []
            if requests:
                record["control"] = requests
            log.log(record)
            if step % cfg.log_every == 0 or step == steps or "eval_loss" in record:
                print(
                    f"  step {step:>4}/{steps}  loss {record['loss']:.4f}  lr {record['learning_rate']:.2e}  "
                    + (f"acc {record['reward_accuracy']:.2f}  margin {record['reward_margin']:.3f}  "
                       f"logp {record['chosen_logps']:.2f}/{record['rejected_logps']:.2f}  " if preference else "")
                    + (f"eval_loss {record['eval_loss']:.4f}  " if "eval_loss" in record else "")
                    + (f"eval_acc {record['eval_reward_accuracy']:.2f}  " if "eval_reward_accuracy" in record else "")
                    + f"{rate:,.0f} tok/s  eta {_clock(eta)}",
                    flush=True,
                )
            if not finite:
                kept = checkpoints.latest_step() if checkpoints else None
                where = (f"; the last good checkpoint, step {kept}, is kept in {checkpoints.directory / str(kept)}"
                         if kept else "; no checkpoint was saved before it (train.checkpoint_every)")
                raise KerasftError(f"loss became {record['loss']} (gradient norm {record['grad_norm']}) at step {step}; "
                                   f"lower train.learning_rate or check the data{where}")
            if sampler and cfg.sample_every and (step % cfg.sample_every == 0 or step == steps):
                with _trained_weights(backbone, trainable, token_rows):
                    samples = sampler()
                if primary:
                    with paths.samples.open("a", encoding="utf-8") as out:
                        for sample in samples:
                            out.write(json.dumps({"step": step, **sample}, ensure_ascii=False) + "\n")
            stop = "eval_loss" in record and stopper.update(step, record["eval_loss"], trainable, primary)
            asked = {entry["action"]: entry for entry in requests}  # the last request of each kind counts
            if "save" in asked and checkpoints is None:
                checkpoints = Checkpointer(paths.checkpoints, cfg.keep_checkpoints)
            if checkpoints and ((cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == steps or stop))
                                or "save" in asked):
                checkpoints.save({"trainable": trainable, "opt_state": opt_state},
                                 Position(step, *_next_position(data, cfg, epoch, index)), identity)
                if "save" in asked:
                    print(f"  checkpoint saved at step {step} (kerasft control save)", flush=True)
            if "lr" in asked and step < steps:
                lr_changes.append((step, asked["lr"]["value"]))
                train_step = build_step(backbone, spec, steps, lr_changes)
                print(f"  learning rate {asked['lr']['value']:.3g} from step {step + 1} (kerasft control lr)", flush=True)
            if stop:
                print(f"  early stopping at step {step}: eval_loss has not improved for {cfg.early_stopping_patience} "
                      f"evaluations (best {stopper.best_loss:.4f} at step {stopper.best_step})", flush=True)
                break
            if "stop" in asked:
                keep_best_now = asked["stop"]["keep"] == "best"
                print(f"  stopping at step {step} (kerasft control stop, keeping the "
                      f"{'best' if keep_best_now else 'last'} adapter)", flush=True)
                if keep_best_now and stopper.best is None:
                    print("  no evaluation has run (train.eval_every): keeping the last adapter", flush=True)
                break
    finally:
        log.close()
        if checkpoints:
            checkpoints.close()
    keep_best = cfg.keep_best or (step < steps and asked.get("stop", {}).get("keep") == "best")
    if keep_best and stopper.best is not None and stopper.best_step != step:
        print(f"  keeping the best adapter: step {stopper.best_step} (eval_loss {stopper.best_loss:.4f})", flush=True)
        trainable = stopper.best
    for variable, value in zip(backbone.trainable_variables, trainable["lora"]):
        variable.assign(value)
    if token_rows is not None:
        table = backbone.token_embedding.embeddings
        rows = jnp.asarray(token_rows, dtype=jnp.int32)
        table.assign(table.value.at[rows].add(trainable["token_delta"].astype(table.dtype)))
    jax.block_until_ready(trainable)
    seconds = time.perf_counter() - started
    if primary and cfg.plots:
        if importlib.util.find_spec("matplotlib") is None:  # plots are on by default; the eval extra brings it
            print("  no plots: matplotlib is not installed (pip install 'kerasft[eval]')", flush=True)
        else:
            write_plots(paths.root, train_step.schedule, steps)
    return TrainResult(
        steps=step,
        final_loss=loss,
        seconds=seconds,
        tokens_per_second=timed_tokens / timed_seconds if timed_seconds else 0.0,
        best_step=stopper.best_step,
        best_eval_loss=stopper.best_loss,
        stopped_early=step < steps,
    )


def device_memory() -> dict:
    """Bytes in use, peak and limit of the first local accelerator (GPU or TPU), for metrics.jsonl and
    the studio's Training tab; {} on the CPU, whose devices report no memory statistics."""
    stats = jax.local_devices()[0].memory_stats()
    if not stats:
        return {}
    return {"device_memory_bytes": int(stats.get("bytes_in_use", 0)),
            "device_peak_memory_bytes": int(stats.get("peak_bytes_in_use", 0)),
            "device_memory_limit_bytes": int(stats.get("bytes_limit", 0))}


class _EarlyStopping:
    """Tracks the lowest eval_loss (and, with train.keep_best, a copy of its weights, also written
    to RUN_DIR/best_adapter.npz so a resumed run keeps it) and counts evaluations since."""

    def __init__(self, cfg: TrainConfig, logged: list, best_path: Path, like):
        self.cfg, self.best_path = cfg, best_path
        self.best_step, self.best_loss, self.best, self.waited = 0, math.inf, None, 0
        for record in logged:
            self._record(record["step"], record["eval_loss"])
        if cfg.keep_best and self.best_step and best_path.is_file():
            saved = np.load(best_path)
            if int(saved["step"]) == self.best_step:
                leaves, treedef = jax.tree.flatten(like)
                self.best = jax.tree.unflatten(treedef, [saved[f"leaf_{i}"] for i in range(len(leaves))])

    def _record(self, step: int, eval_loss: float) -> bool:
        if eval_loss < self.best_loss:
            self.best_step, self.best_loss, self.waited = step, eval_loss, 0
            return True
        self.waited += 1
        return False

    def update(self, step: int, eval_loss: float, trainable, primary: bool) -> bool:
        """Records an evaluation; True when patience has run out."""
        if self._record(step, eval_loss) and self.cfg.keep_best:
            self.best = jax.tree.map(lambda x: np.asarray(x).copy(), trainable)
            if primary:
                leaves = jax.tree.leaves(self.best)
                np.savez(self.best_path, step=step, **{f"leaf_{i}": leaf for i, leaf in enumerate(leaves)})
        return bool(self.cfg.early_stopping_patience) and self.waited >= self.cfg.early_stopping_patience


def _validation_loss(backbone, token_rows, validation: TokenizedSet, cfg: TrainConfig, pad_id: int):
    """evaluate(trainable, non_trainable) -> the mean loss per target over the validation split
    (or its first cfg.eval_batches batches), in batches of train.batch_size padded to one width
    (the split's sequence_length), so the jitted evaluation compiles once."""
    eval_step = make_eval_step(backbone, token_rows)
    order = np.arange(len(validation))
    width = validation.sequence_length or batch_width(validation, order)
    chunks = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    if cfg.eval_batches:
        chunks = chunks[: cfg.eval_batches]
    batches = []
    for chunk in chunks:
        rows = np.resize(chunk, cfg.batch_size)  # a short last batch repeats rows, with weight 0
        batch = make_batch(validation, rows, validation.num_targets, pad_id, width=width)
        batch["target_weights"][len(chunk) :] = 0
        batches.append(place_batch(batch))

    def evaluate(trainable, non_trainable) -> dict:
        total = weights = 0.0
        for batch in batches:
            loss_sum, weight_sum = eval_step(trainable, non_trainable, batch)
            total, weights = total + float(loss_sum), weights + float(weight_sum)
        return {"eval_loss": total / max(weights, 1.0)}

    return evaluate


def pair_evaluation(backbone, pairs: TokenizedSet, spec: TrainSpec, limit: int = 0):
    """evaluate(trainable, non_trainable) -> {"eval_loss", "eval_" + each of PREFERENCE_STATS}:
    the preference loss and statistics of the step, without gradient or dropout, averaged over
    held-out pairs (the first `limit` batches of train.batch_size pairs; 0: all), each pair
    counted once (a short last batch has its own shape)."""
    loss_fn = jax.jit(make_preference_loss_fn(backbone, spec.train, spec.token_rows or None))
    size = spec.train.batch_size
    chunks = [np.arange(i, min(i + size, pairs.num_examples)) for i in range(0, pairs.num_examples, size)]
    chunks = chunks[:limit] if limit else chunks
    width = pairs.sequence_length or None
    batches = [(len(chunk), place_batch(make_batch(pairs, chunk, pairs.num_targets, spec.pad_id, width=width)))
               for chunk in chunks]

    def evaluate(trainable, non_trainable) -> dict:
        sums, count = {}, 0
        for n, batch in batches:
            loss, stats = loss_fn(trainable, non_trainable, batch)
            for name, value in {"loss": loss, **{k: stats[k] for k in PREFERENCE_STATS}}.items():
                sums[name] = sums.get(name, 0.0) + float(value) * n
            count += n
        return {f"eval_{name}": value / max(count, 1) for name, value in sums.items()}

    return evaluate


def score_pairs(backbone, pairs: TokenizedSet, spec: TrainSpec) -> dict:
    """The preference statistics of the backbone as it is (its LoRA weights and token rows
    included) on held-out pairs, against the reference (LoRA off; for ORPO none): what the
    base-vs-tuned report shows. Keys are PREFERENCE_STATS plus "loss" and "pairs"."""
    trainable = {"lora": [v.value for v in backbone.trainable_variables]}
    if spec.token_rows:
        hidden = backbone.token_embedding.embeddings.shape[1]
        trainable["token_delta"] = jnp.zeros((len(spec.token_rows), hidden), jnp.float32)  # rows are in the table
    non_trainable = [v.value for v in backbone.non_trainable_variables]
    result = pair_evaluation(backbone, pairs, spec)(trainable, non_trainable)
    return {**{name[len("eval_"):]: value for name, value in result.items()}, "pairs": pairs.num_examples}


def precompute_reference(backbone, data: TokenizedSet, spec: TrainSpec, cache: Path | None = None) -> bool:
    """train.precompute_reference: the summed response log-probs of every row under the
    reference (the backbone with LoRA off), computed once and kept on `data` (make_batch then
    puts them in each batch and the step skips its reference pass). With `cache`, an .npy file
    read when present and written otherwise (key it like the tokens). Returns whether it was read."""
    if cache is not None and cache.is_file():
        values = np.load(cache)
        if len(values) == len(data):
            data.reference_logps = values
            return True
    logps = jax.jit(make_sequence_logps(backbone, None), static_argnames="reference")
    params = {"lora": [v.value for v in backbone.trainable_variables]}
    non_trainable = [v.value for v in backbone.non_trainable_variables]
    size, width = spec.train.batch_size, data.sequence_length or None
    values = np.zeros(len(data), np.float32)
    for start in range(0, data.num_examples, size):
        chunk = np.arange(start, min(start + size, data.num_examples))
        batch = make_batch(data, chunk, data.num_targets, spec.pad_id, width=width)
        values[data.rows_of(chunk)] = np.asarray(logps(params, non_trainable, place_batch(batch), reference=True)[0])
    data.reference_logps = values
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f"{cache.stem}.{os.getpid()}.tmp.npy")
        np.save(tmp, values)
        tmp.replace(cache)
    return False


@contextlib.contextmanager
def _trained_weights(backbone, trainable, token_rows):
    """The backbone's variables hold the current trained weights inside the block (for
    generation), and their previous values again after it. Copies: the step donates its buffers."""
    variables = backbone.trainable_variables
    saved = [v.value for v in variables]
    table = backbone.token_embedding.embeddings
    saved_table = table.value
    for variable, value in zip(variables, trainable["lora"]):
        variable.assign(jnp.array(value, copy=True))
    if token_rows is not None:
        rows = jnp.asarray(token_rows, dtype=jnp.int32)
        table.assign(saved_table.at[rows].add(trainable["token_delta"].astype(table.dtype)))
    try:
        yield
    finally:
        for variable, value in zip(variables, saved):
            variable.assign(value)
        table.assign(saved_table)


def _next_position(data: TokenizedSet, cfg: TrainConfig, epoch: int, index: int) -> tuple[int, int]:
    """The (epoch, batch) after batch `index` of `epoch`."""
    if index + 1 < len(epoch_batches(data, cfg.batch_size, cfg.seed, epoch)):
        return epoch, index + 1
    return epoch + 1, 0


def _batch_stream(data: TokenizedSet, batch_size: int, seed: int, start_epoch: int = 0, start_batch: int = 0):
    """Endless (epoch, batch index, indices) stream from a data position (epoch, batch)."""
    epoch = start_epoch
    while True:
        for position, indices in enumerate(epoch_batches(data, batch_size, seed, epoch)):
            if epoch == start_epoch and position < start_batch:
                continue
            yield epoch, position, indices
        epoch += 1


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"
