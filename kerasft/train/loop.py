"""LoRA supervised fine-tuning: one pure, jitted step (stateless backbone call, response-only
logits, optax AdamW) and the loop that feeds it.

The step computes the vocabulary projection only at weighted positions and normalises the loss
by the sum of weights (keras' weighted losses divide by all positions instead).
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kerasft.data.pipeline import TokenizedSet, epoch_batches, make_batch


@dataclass
class TrainResult:
    steps: int
    final_loss: float
    seconds: float
    tokens_per_second: float
    best_step: int = 0  # the evaluation with the lowest eval_loss (0: no evaluation)
    best_eval_loss: float = math.inf
    stopped_early: bool = False


def make_loss_fn(backbone, token_rows=None, dropout: float = 0.0):
    """Builds loss(params, non_trainable, batch, rng=None) -> (loss, weight_sum) for a Gemma backbone.

    params is {"lora": the backbone's trainable variables (the adapters), "token_delta": a
    (len(token_rows), hidden) update to those embedding rows, or None}. The rows feed both the
    input embedding and the tied output head, so the model can learn its chat tokens: in a
    pretrained Gemma, <end_of_turn> sits among thousands of untrained rows (<unusedNN> and
    the like) and LoRA alone ends answers with one of them instead. An untied head (Llama 2,
    TinyLlama: keras-hub's `reverse_embeddings`) is used as it is; the rows then train the
    input embedding only.

    With `dropout` > 0 and an `rng` key, the LoRA branches see their input through dropout
    (lora.dropout); without a key (evaluation) there is none.
    """
    import jax.numpy as jnp

    from kerasft.models.families import output_head
    from kerasft.models.lora import lora_dropout

    embedding = backbone.token_embedding
    soft_cap = getattr(embedding, "logit_soft_cap", None)
    non_trainable_ids = [id(v) for v in backbone.non_trainable_variables]
    if id(embedding.embeddings) not in non_trainable_ids:
        raise ValueError("the embedding table must be frozen: only LoRA adapters and token rows are trained")
    table_index = non_trainable_ids.index(id(embedding.embeddings))
    head_index = non_trainable_ids.index(id(output_head(backbone)))  # table_index when tied
    rows = None if token_rows is None else jnp.asarray(token_rows, dtype=jnp.int32)

    def loss_fn(params, non_trainable, batch, rng=None):
        table = non_trainable_table = non_trainable[table_index]
        if rows is not None:
            table = table.at[rows].add(params["token_delta"].astype(table.dtype))
            non_trainable = [*non_trainable[:table_index], table, *non_trainable[table_index + 1 :]]
        with lora_dropout(backbone, dropout if rng is not None else 0.0, rng):
            hidden, _ = backbone.stateless_call(
                params["lora"],
                non_trainable,
                {"token_ids": batch["token_ids"], "padding_mask": batch["padding_mask"]},
            )
        if head_index != table_index:  # untied: (hidden, vocabulary), no trained rows
            table = non_trainable_table = non_trainable[head_index].T
        # Only the K response positions go through the 262k-entry vocabulary projection.
        picked = jnp.take_along_axis(hidden, batch["target_positions"][..., None], axis=1)
        weights = batch["target_weights"]
        weight_sum = jnp.sum(weights)
        if picked.shape[0] * picked.shape[1] > FUSED_ABOVE:  # full-sequence loss: fused, chunked head
            tied_rows = rows if head_index == table_index else None
            delta = params["token_delta"] if tied_rows is not None else None
            total = fused_weighted_nll(picked, non_trainable_table, batch["target_ids"], weights, soft_cap, tied_rows, delta)
        else:
            total = jnp.sum(token_nll(picked, table, batch["target_ids"], soft_cap) * weights)
        return total / jnp.maximum(weight_sum, 1.0), weight_sum

    return loss_fn


LOSS_CHUNK = 128  # target positions per vocabulary-projection chunk (128 x 262k f32 logits: 134 MB)
FUSED_ABOVE = 256  # more target positions per batch than this (full-sequence losses) take the fused path


def token_nll(hidden, table, target_ids, soft_cap=None):
    """-log p(target) at each (B, K) position of `hidden` under the tied head `table`, in one
    matmul: for the few response positions of SFT."""
    import jax
    import jax.numpy as jnp

    logits = jnp.einsum("...d,vd->...v", hidden, table.astype(hidden.dtype)).astype(jnp.float32)
    if soft_cap:
        logits = jnp.tanh(logits / soft_cap) * soft_cap
    target = jnp.take_along_axis(logits, target_ids[..., None], axis=-1)[..., 0]
    return jax.nn.logsumexp(logits, axis=-1) - target


def fused_weighted_nll(hidden, table, target_ids, weights, soft_cap=None, rows=None, delta=None, chunk=LOSS_CHUNK):
    """sum(weights * -log p(target)) over (B, K) positions, for full-sequence losses.

    The vocabulary projection runs in chunks of `chunk` positions, and each chunk's gradient
    with respect to the hidden states (and the trained embedding rows) is computed right there
    in the forward pass, from the softmax it already has: no pass ever holds more than
    chunk x vocabulary logits, and none is recomputed. `table` gets no gradient (it is the frozen
    embedding); `delta` is the trained update of the embedding rows `rows`, whose logits columns
    it shifts.
    """
    import jax
    import jax.numpy as jnp

    batch, positions, width = hidden.shape
    total = batch * positions
    pad = -total % chunk

    def chunks(x, fill=0):
        x = x.reshape(total, *x.shape[2:])
        return jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1), constant_values=fill).reshape(-1, chunk, *x.shape[1:])

    xs, ids, ws = chunks(hidden), chunks(target_ids), chunks(weights.astype(jnp.float32))
    has_rows = rows is not None
    d0 = delta.astype(jnp.float32) if has_rows else jnp.zeros((0, width), jnp.float32)

    def forward(x_chunks, d):
        head = table.astype(jnp.float32)

        def body(carry, inputs):
            loss, d_grad = carry
            x, i, w = inputs
            x = x.astype(jnp.float32)
            z = x @ head.T
            if has_rows:
                z = z.at[:, rows].add(x @ d.T)
            capped = jnp.tanh(z / soft_cap) if soft_cap else None
            logits = capped * soft_cap if soft_cap else z
            lse = jax.nn.logsumexp(logits, axis=-1)
            nll = lse - jnp.take_along_axis(logits, i[:, None], axis=-1)[:, 0]
            g = jnp.exp(logits - lse[:, None]).at[jnp.arange(chunk), i].add(-1.0) * w[:, None]
            if soft_cap:
                g = g * (1.0 - capped * capped)
            x_grad = g @ head
            if has_rows:
                x_grad = x_grad + g[:, rows] @ d
                d_grad = d_grad + g[:, rows].T @ x
            return (loss + jnp.sum(nll * w), d_grad), x_grad

        (loss, d_grad), x_grad = jax.lax.scan(body, (jnp.zeros((), jnp.float32), jnp.zeros_like(d)), (x_chunks, ids, ws))
        return loss, (x_grad, d_grad)

    @jax.custom_vjp
    def weighted_sum(x_chunks, d):
        return forward(x_chunks, d)[0]

    def backward(residuals, cotangent):
        x_grad, d_grad = residuals
        return (x_grad * cotangent).astype(hidden.dtype), d_grad * cotangent

    weighted_sum.defvjp(forward, backward)
    return weighted_sum(xs.astype(hidden.dtype), d0)


def make_optimizer(cfg, total_steps: int):
    """AdamW with linear warmup, cosine decay to zero, global-norm clipping, accumulation."""
    import optax

    warmup = int(round(cfg.warmup_ratio * total_steps))
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=cfg.learning_rate,
        warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=0.0,
    )
    chain = optax.chain(
        optax.clip_by_global_norm(cfg.max_grad_norm),
        optax.adamw(schedule, b1=0.9, b2=0.999, eps=1e-8, weight_decay=cfg.weight_decay),
    )
    if cfg.grad_accum > 1:
        chain = optax.MultiSteps(chain, every_k_schedule=cfg.grad_accum)
    return chain, schedule


def make_train_step(backbone, optimizer, token_rows=None, dropout: float = 0.0):
    """The jitted update: (params, opt_state, non_trainable, batch[, rng]) -> new state and stats.
    With lora `dropout` > 0 it takes a fifth argument, the step's PRNG key (dropout_key)."""
    import jax
    import optax

    loss_fn = make_loss_fn(backbone, token_rows, dropout)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(trainable, opt_state, non_trainable, batch, *rng):
        (loss, weight_sum), grads = grad_fn(trainable, non_trainable, batch, *rng)
        updates, opt_state = optimizer.update(grads, opt_state, trainable)
        trainable = optax.apply_updates(trainable, updates)
        return trainable, opt_state, {"loss": loss, "grad_norm": optax.global_norm(grads), "targets": weight_sum}

    return jax.jit(step, donate_argnums=(0, 1))


def make_eval_step(backbone, token_rows=None):
    """The jitted evaluation: (params, non_trainable, batch) -> (sum of weighted NLL, sum of
    weights); the training loss without gradient or dropout."""
    import jax

    loss_fn = make_loss_fn(backbone, token_rows)

    def evaluate(trainable, non_trainable, batch):
        loss, weight_sum = loss_fn(trainable, non_trainable, batch)
        return loss * weight_sum, weight_sum

    return jax.jit(evaluate)


def dropout_key(seed: int, micro_step: int):
    """The LoRA-dropout PRNG key of a micro-step: a pure function of (train.seed, step), so a
    resumed run draws the same masks."""
    import jax

    return jax.random.fold_in(jax.random.PRNGKey(seed), micro_step)


def apply_remat(backbone, mode: str) -> None:
    """train.remat: `full` recomputes each decoder block's activations in the backward pass
    (keras' RematScope mode "full", i.e. jax.checkpoint, on every transformer layer)."""
    import keras

    scope = keras.RematScope(mode="full") if mode == "full" else None
    for block in backbone.transformer_layers:
        block._remat_mode = scope


def planned_steps(num_examples: int, cfg) -> int:
    """Optimizer steps for a run: max_steps when set, otherwise epochs over the data."""
    if cfg.max_steps > 0:
        return cfg.max_steps
    micro = math.ceil(num_examples / cfg.batch_size)
    return math.ceil(micro * cfg.epochs / cfg.grad_accum)


def train(backbone, data: TokenizedSet, cfg, sequence_length: int, run_dir: str | Path, pad_id: int = 0,
          token_rows=None, resume: bool = False, *, dropout: float = 0.0, validation: TokenizedSet | None = None,
          sampler=None, config: dict | None = None, name: str = "run") -> TrainResult:
    """Trains the LoRA adapters (and the embedding rows of `token_rows`, if given) in place.

    Args:
        backbone: a keras-hub backbone with LoRA enabled.
        data: tokenised training examples.
        cfg: kerasft.config.TrainConfig.
        sequence_length: the longest padded batch width.
        run_dir: metrics.jsonl is appended here, one line per optimizer step; checkpoints go to
            run_dir/checkpoints every cfg.checkpoint_every steps.
        token_rows: token ids whose embedding rows are trained too (see make_loss_fn).
        resume: continue from the newest checkpoint in run_dir (from the start if there is none).
        dropout: lora.dropout, on the LoRA branches' inputs in training steps only.
        validation: tokenised validation examples, for cfg.eval_every (eval_loss, early stopping).
        sampler: called every cfg.sample_every steps with the current weights in the backbone;
            returns [{"prompt", "output"}], appended to run_dir/samples.jsonl with the step.
        config / name: the run's config and name, for the wandb and mlflow loggers.
    """
    import jax
    import jax.numpy as jnp

    from kerasft.errors import KerasftError
    from kerasft.runtime import batch_shards, is_primary, place_batch
    from kerasft.train.checkpoint import CHECKPOINT_DIR, Checkpointer, Position
    from kerasft.train.logs import RunLog, read_metrics, write_plots

    shards = batch_shards()
    if cfg.batch_size % shards:
        raise KerasftError(f"train.batch_size: {cfg.batch_size} does not split over the mesh's {shards}-way batch axis")
    if cfg.eval_every and not validation:
        raise KerasftError("train.eval_every needs a validation split: set data.validation or data.split.ratios")
    steps = planned_steps(len(data), cfg)
    micro_steps = steps * cfg.grad_accum
    optimizer, schedule = make_optimizer(cfg, steps)
    apply_remat(backbone, cfg.remat)
    step_fn = make_train_step(backbone, optimizer, token_rows, dropout)
    table = backbone.token_embedding.embeddings
    trainable = {"lora": [v.value for v in backbone.trainable_variables]}
    if token_rows is not None:
        trainable["token_delta"] = jnp.zeros((len(token_rows), table.shape[1]), jnp.float32)
    non_trainable = [v.value for v in backbone.non_trainable_variables]
    opt_state = optimizer.init(trainable)
    num_targets = data.num_targets

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    # What must match for a checkpoint to continue this run bit for bit.
    identity = {"seed": cfg.seed, "steps": steps, "batch_size": cfg.batch_size, "grad_accum": cfg.grad_accum,
                "examples": len(data)}
    position = Position()
    checkpoints = Checkpointer(run_dir / CHECKPOINT_DIR, cfg.keep_checkpoints) if cfg.checkpoint_every or resume else None
    if resume and checkpoints.latest_step() is not None:
        state, position = checkpoints.restore({"trainable": trainable, "opt_state": opt_state}, identity)
        trainable, opt_state = state["trainable"], state["opt_state"]
        print(f"  resuming at step {position.step}/{steps} (epoch {position.epoch}, batch {position.batch})", flush=True)
    elif resume:
        print("  no checkpoint to resume from: starting at step 0", flush=True)
    log_path = run_dir / "metrics.jsonl"
    primary = is_primary()  # in a multi-process job only process 0 writes logs and samples
    if primary:
        _truncate_log(log_path, position.step)
        _truncate_log(run_dir / SAMPLES_FILE, position.step)
    # Early stopping continues from the evaluations already logged (a resumed run re-reads them).
    stopper = _EarlyStopping(cfg, [r for r in read_metrics(log_path) if "eval_loss" in r], run_dir / BEST_FILE, trainable)
    evaluate = _validation_loss(backbone, token_rows, validation, cfg, sequence_length, pad_id) if cfg.eval_every else None
    log = RunLog(run_dir, cfg.loggers, config=config, name=name, primary=primary)
    batches = _batch_stream(data, cfg.batch_size, cfg.seed, position.epoch, position.batch)
    started = time.perf_counter()
    timed_tokens, timed_seconds, timed_micro, window = 0, 0.0, 0, []
    loss = float("nan")
    first_micro = position.step * cfg.grad_accum
    step = position.step
    try:
        for micro in range(first_micro, micro_steps):
            epoch, index, indices = next(batches)
            host_batch = make_batch(data, indices, sequence_length, num_targets, pad_id)
            batch = place_batch(host_batch)  # the global batch; each process places its own rows
            rng = (dropout_key(cfg.seed, micro),) if dropout > 0 else ()
            tick = time.perf_counter()
            trainable, opt_state, stats = step_fn(trainable, opt_state, non_trainable, batch, *rng)
            loss = float(stats["loss"])  # device sync: the step is done after this
            took = time.perf_counter() - tick
            real_tokens = int(np.sum(host_batch["padding_mask"]))
            if micro > first_micro:  # the first step includes compilation
                timed_tokens += real_tokens
                timed_seconds += took
                timed_micro += 1
            window.append(loss)
            step = (micro + 1) // cfg.grad_accum
            if (micro + 1) % cfg.grad_accum:
                continue
            record = {
                "step": step,
                "epoch": epoch,
                "loss": float(np.mean(window)),
                "grad_norm": float(stats["grad_norm"]),
                "learning_rate": float(schedule(step - 1)),
                "tokens": real_tokens,
                "step_seconds": round(took, 4),
            }
            window = []
            finite = math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])
            if finite and evaluate and (step % cfg.eval_every == 0 or step == steps):
                record["eval_loss"] = evaluate(trainable, non_trainable)
            log.log(record)
            if step % cfg.log_every == 0 or step == steps or "eval_loss" in record:
                rate = timed_tokens / timed_seconds if timed_seconds else 0.0
                eta = timed_seconds / max(timed_micro, 1) * (micro_steps - micro - 1)
                print(
                    f"  step {step:>4}/{steps}  loss {record['loss']:.4f}  lr {record['learning_rate']:.2e}  "
                    + (f"eval_loss {record['eval_loss']:.4f}  " if "eval_loss" in record else "")
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
                    with (run_dir / SAMPLES_FILE).open("a", encoding="utf-8") as out:
                        for sample in samples:
                            out.write(json.dumps({"step": step, **sample}, ensure_ascii=False) + "\n")
            stop = "eval_loss" in record and stopper.update(step, record["eval_loss"], trainable, primary)
            if checkpoints and cfg.checkpoint_every and (step % cfg.checkpoint_every == 0 or step == steps or stop):
                checkpoints.save({"trainable": trainable, "opt_state": opt_state},
                                 Position(step, *_next_position(data, cfg, epoch, index)), identity)
            if stop:
                print(f"  early stopping at step {step}: eval_loss has not improved for {cfg.early_stopping_patience} "
                      f"evaluations (best {stopper.best_loss:.4f} at step {stopper.best_step})", flush=True)
                break
    finally:
        log.close()
        if checkpoints:
            checkpoints.close()
    if cfg.keep_best and stopper.best is not None and stopper.best_step != step:
        print(f"  keeping the best adapter: step {stopper.best_step} (eval_loss {stopper.best_loss:.4f})", flush=True)
        trainable = stopper.best
    for variable, value in zip(backbone.trainable_variables, trainable["lora"]):
        variable.assign(value)
    if token_rows is not None:
        rows = jnp.asarray(token_rows, dtype=jnp.int32)
        table.assign(table.value.at[rows].add(trainable["token_delta"].astype(table.dtype)))
    jax.block_until_ready(trainable)
    seconds = time.perf_counter() - started
    if primary and cfg.plots:
        import importlib.util

        if importlib.util.find_spec("matplotlib") is None:  # plots are on by default; the eval extra brings it
            print("  no plots: matplotlib is not installed (pip install 'kerasft[eval]')", flush=True)
        else:
            write_plots(run_dir, schedule, steps)
    return TrainResult(
        steps=step,
        final_loss=loss,
        seconds=seconds,
        tokens_per_second=timed_tokens / timed_seconds if timed_seconds else 0.0,
        best_step=stopper.best_step,
        best_eval_loss=stopper.best_loss,
        stopped_early=step < steps,
    )


SAMPLES_FILE = "samples.jsonl"
BEST_FILE = "best_adapter.npz"


class _EarlyStopping:
    """Tracks the lowest eval_loss (and, with train.keep_best, a copy of its weights, also written
    to RUN_DIR/best_adapter.npz so a resumed run keeps it) and counts evaluations since."""

    def __init__(self, cfg, logged: list, best_path: Path, like):
        import jax

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
        import jax

        if self._record(step, eval_loss) and self.cfg.keep_best:
            self.best = jax.tree.map(lambda x: np.asarray(x).copy(), trainable)
            if primary:
                leaves = jax.tree.leaves(self.best)
                np.savez(self.best_path, step=step, **{f"leaf_{i}": leaf for i, leaf in enumerate(leaves)})
        return bool(self.cfg.early_stopping_patience) and self.waited >= self.cfg.early_stopping_patience


def _validation_loss(backbone, token_rows, validation: TokenizedSet, cfg, sequence_length: int, pad_id: int):
    """evaluate(trainable, non_trainable) -> the mean loss per target over the validation split
    (or its first cfg.eval_batches batches), in batches of train.batch_size padded to one shape,
    so the jitted evaluation compiles once."""
    from kerasft.runtime import place_batch

    eval_step = make_eval_step(backbone, token_rows)
    order = np.arange(len(validation))
    chunks = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
    if cfg.eval_batches:
        chunks = chunks[: cfg.eval_batches]
    batches = []
    for chunk in chunks:
        rows = np.resize(chunk, cfg.batch_size)  # a short last batch repeats rows, with weight 0
        batch = make_batch(validation, rows, sequence_length, validation.num_targets, pad_id)
        batch["target_weights"][len(chunk) :] = 0
        width = sequence_length - batch["token_ids"].shape[1]
        batch["token_ids"] = np.pad(batch["token_ids"], ((0, 0), (0, width)), constant_values=pad_id)
        batch["padding_mask"] = np.pad(batch["padding_mask"], ((0, 0), (0, width)))
        batches.append(place_batch(batch))

    def evaluate(trainable, non_trainable) -> float:
        total = weights = 0.0
        for batch in batches:
            loss_sum, weight_sum = eval_step(trainable, non_trainable, batch)
            total, weights = total + float(loss_sum), weights + float(weight_sum)
        return total / max(weights, 1.0)

    return evaluate


@contextlib.contextmanager
def _trained_weights(backbone, trainable, token_rows):
    """The backbone's variables hold the current trained weights inside the block (for
    generation), and their previous values again after it. Copies: the step donates its buffers."""
    import jax.numpy as jnp

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


def _next_position(data: TokenizedSet, cfg, epoch: int, index: int) -> tuple[int, int]:
    """The (epoch, batch) after batch `index` of `epoch`."""
    if index + 1 < len(epoch_batches(data, cfg.batch_size, cfg.seed, epoch)):
        return epoch, index + 1
    return epoch + 1, 0


def _truncate_log(path: Path, last_step: int) -> None:
    """Drops log lines past `last_step`: a resumed run logs those steps again."""
    if not path.is_file():
        return
    lines = path.read_text(encoding="utf-8").splitlines()
    kept = [line for line in lines if line.strip() and json.loads(line).get("step", 0) <= last_step]
    if len(kept) != len(lines):
        path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


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

