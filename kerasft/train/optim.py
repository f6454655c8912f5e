"""The optimizer and learning-rate schedule of a run (train.optimizer, train.moments,
train.schedule): build_optimizer(train_cfg, total_steps) -> (optax transformation, schedule).

Every optimizer decays weights the way optax.adamw does (decoupled: the update gains
learning_rate(step) x weight_decay x weight), after global-norm clipping (train.max_grad_norm),
and accumulates gradients with optax.MultiSteps under train.grad_accum.

AdamW's two moments can be stored in less memory (train.moments):
- bfloat16: both moments in bfloat16, rounded stochastically. Round-to-nearest would freeze the
  second moment: with b2 = 0.999 a step without gradient shrinks it by 0.1 % of itself, less than
  half the gap to the next bfloat16 value (at least 2^-9, 0.2 %), so it could never decay.
  Stochastic rounding is exact in expectation; its random bits are a pure function of
  (train.seed, step), so a resumed run rounds the same way.
- int8: bitsandbytes' blockwise 8-bit Adam (Dettmers et al. 2022, "8-bit optimizers via blockwise
  quantization"): each moment is flattened into blocks of BLOCK_SIZE values, each block keeps its
  absolute maximum as a float32 scale and each value one byte, an index into a 256-entry
  *dynamic* (non-linear) map: signed for the first moment, unsigned for the second. A linear map
  has a resolution of absmax/127, which rounds most of a block's second-moment values (squares
  of gradients, spanning many decades) to zero and turns m / sqrt(v) into m / eps; the dynamic map
  spaces its codes by powers of ten down to 1e-7 of the block's maximum. As in bitsandbytes, the
  update is computed in float32 from the dequantised moments and the current gradient, and only
  the stored moments are rounded (to the nearest code). Bytes per trained weight: 2 + 8 /
  BLOCK_SIZE, against AdamW's 8 (bitsandbytes keeps tensors under 4096 values in 32 bits; here every
  tensor is quantised, since LoRA's are all small).
"""

from __future__ import annotations

from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kerasft.config import TrainConfig

BLOCK_SIZE = 256  # values per absmax scale in int8 moments (bitsandbytes' blockwise optimizers use 256)
B1, B2, EPS = 0.9, 0.999, 1e-8  # AdamW's, as torch and HF use them
LION_B1, LION_B2 = 0.9, 0.99  # Lion's paper defaults (Chen et al. 2023), optax's too
ADAFACTOR_DECAY = 0.8  # optax / T5 default: second-moment decay 1 - step^-0.8


def build_optimizer(cfg: TrainConfig, total_steps: int,
                    lr_changes: tuple = ()) -> tuple[optax.GradientTransformation, Callable]:
    """The optimizer and schedule of a run of `total_steps` optimizer steps.

    Args:
        cfg: the train section: optimizer, moments, schedule, learning_rate, warmup_ratio,
            weight_decay, momentum (sgd), max_grad_norm, grad_accum, seed.
        total_steps: the schedule's length; its last update (step total_steps - 1) still has a
            learning rate above 0 for cosine and linear.
        lr_changes: (first update, learning rate) pairs that replace the schedule from that update
            on (`kerasft control RUN_DIR lr VALUE`); later pairs win.

    Returns:
        (transformation, schedule): schedule(step) is the learning rate of update `step` (0-based).
    """
    schedule = with_lr_changes(build_schedule(cfg, total_steps), lr_changes)
    if cfg.optimizer == "adamw":
        direction = {"float32": optax.scale_by_adam(B1, B2, EPS),
                     "bfloat16": scale_by_adam_bf16(B1, B2, EPS, seed=cfg.seed),
                     "int8": scale_by_adam_int8(B1, B2, EPS)}[cfg.moments]
    elif cfg.optimizer == "lion":
        direction = optax.scale_by_lion(LION_B1, LION_B2)
    elif cfg.optimizer == "adafactor":
        # optax.adafactor without its parameter-scale factor (learning_rate is then the step size,
        # as HF's Adafactor(scale_parameter=False, relative_step=False)), and with AdamW's decay
        # (optax.adafactor's weight_decay_rate is not scaled by the learning rate).
        direction = optax.chain(optax.scale_by_factored_rms(decay_rate=ADAFACTOR_DECAY), optax.clip_by_block_rms(1.0))
    elif cfg.optimizer == "sgd":
        direction = optax.trace(decay=cfg.momentum) if cfg.momentum else optax.identity()
    else:  # TrainConfig validates it; a new name must be added here too
        raise ValueError(f"train.optimizer: {cfg.optimizer!r}")
    # optax.adamw's own chain, nested as before train.optimizer existed: checkpoints of earlier
    # runs keep their optimizer state's tree.
    optimizer = optax.chain(direction, optax.add_decayed_weights(cfg.weight_decay),
                            optax.scale_by_learning_rate(schedule))
    if cfg.max_grad_norm:
        optimizer = optax.chain(optax.clip_by_global_norm(cfg.max_grad_norm), optimizer)
    if cfg.grad_accum > 1:
        optimizer = optax.MultiSteps(optimizer, every_k_schedule=cfg.grad_accum)
    return optimizer, schedule


def with_lr_changes(schedule: Callable, changes) -> Callable:
    """`schedule`, except that from update `start` on the rate is `value`, for each (start, value)
    of `changes` in order (a later change wins). The optimizer state's tree does not change."""
    if not changes:
        return schedule

    def changed(step):
        rate = schedule(step)
        for start, value in changes:
            rate = jnp.where(step >= start, jnp.asarray(value, jnp.float32), rate)
        return rate

    return changed


def build_schedule(cfg: TrainConfig, total_steps: int) -> Callable:
    """train.schedule with a linear warmup from 0 over round(warmup_ratio x total_steps) steps,
    then: cosine (half a cosine down to 0 at total_steps), linear (a straight line down to 0 at
    total_steps) or constant (train.learning_rate to the end)."""
    peak = cfg.learning_rate
    warmup = int(round(cfg.warmup_ratio * total_steps))
    decay = max(total_steps - warmup, 1)
    if cfg.schedule == "cosine":
        after = optax.cosine_decay_schedule(peak, decay)
    elif cfg.schedule == "linear":
        after = optax.linear_schedule(peak, 0.0, decay)
    elif cfg.schedule == "constant":
        after = optax.constant_schedule(peak)
    else:  # TrainConfig validates it
        raise ValueError(f"train.schedule: {cfg.schedule!r}")
    if not warmup:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, peak, warmup), after], [warmup])


# -- bfloat16 moments ---------------------------------------------------------------------------

class AdamBF16State(NamedTuple):
    count: jax.Array  # updates done (int32)
    mu: optax.Updates  # bfloat16, like the parameters
    nu: optax.Updates


def stochastic_round_bf16(x: jax.Array, key: jax.Array) -> jax.Array:
    """float32 -> bfloat16, rounded up or down at random with the probability that makes the
    result exact in expectation (bfloat16 keeps the top 16 bits of a float32)."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.uint32)
    noise = jax.random.bits(key, x.shape, jnp.uint32) & jnp.uint32(0xFFFF)
    rounded = (bits + noise) & jnp.uint32(0xFFFF0000)
    return jax.lax.bitcast_convert_type(rounded, jnp.float32).astype(jnp.bfloat16)  # exact: low bits are 0


def scale_by_adam_bf16(b1: float = B1, b2: float = B2, eps: float = EPS, seed: int = 0) -> optax.GradientTransformation:
    """optax.scale_by_adam with both moments stored in bfloat16 (stochastically rounded)."""

    def init(params):
        zeros = lambda p: jnp.zeros(p.shape, jnp.bfloat16)  # noqa: E731
        return AdamBF16State(jnp.zeros([], jnp.int32), jax.tree.map(zeros, params), jax.tree.map(zeros, params))

    def update(updates, state, params=None):
        count = optax.safe_increment(state.count)
        leaves, treedef = jax.tree.flatten(updates)
        moments, outs = [], []
        for g, mu, nu in zip(leaves, jax.tree.leaves(state.mu), jax.tree.leaves(state.nu)):
            g32 = g.astype(jnp.float32)
            mu32 = _moment_average(mu, g32, b1)
            nu32 = _moment_average(nu, g32 * g32, b2)
            outs.append(_adam_direction(mu32, nu32, count, b1, b2, eps).astype(g.dtype))
            moments += [mu32, nu32]
        # One draw of random bits for every moment value (one generator in the compiled step, not
        # one per tensor): a pure function of (seed, step).
        flat = jnp.concatenate([m.reshape(-1) for m in moments])
        rounded = stochastic_round_bf16(flat, jax.random.fold_in(jax.random.PRNGKey(seed), count))
        stored, start = [], 0
        for m in moments:
            stored.append(rounded[start : start + m.size].reshape(m.shape))
            start += m.size
        state = AdamBF16State(count, treedef.unflatten(stored[0::2]), treedef.unflatten(stored[1::2]))
        return treedef.unflatten(outs), state

    return optax.GradientTransformation(init, update)


def _moment_average(stored: jax.Array, target: jax.Array, decay: float) -> jax.Array:
    """decay x stored + (1 - decay) x target, in float32: one moment's exponential average."""
    return decay * stored.astype(jnp.float32) + (1.0 - decay) * target


def _adam_direction(mu, nu, count, b1, b2, eps):
    mu_hat = mu / (1.0 - b1 ** count.astype(jnp.float32))
    nu_hat = nu / (1.0 - b2 ** count.astype(jnp.float32))
    return mu_hat / (jnp.sqrt(nu_hat) + eps)


# -- int8 moments (blockwise, dynamic map) -----------------------------------------------------

def dynamic_map(signed: bool, max_exponent_bits: int = 7, total_bits: int = 8) -> np.ndarray:
    """bitsandbytes' dynamic quantisation map (create_dynamic_map): 2^total_bits sorted values in
    [-1, 1] (signed) or [0, 1]. Exponent i (0..6) covers [0.1, 1] x 10^(i - 6) with 2^i (signed) or
    2^(i+1) (unsigned) evenly spaced values (interval midpoints), plus 0 and 1: dense near 0, so
    small values survive next to the block's maximum."""
    non_sign_bits = total_bits - 1
    values = []
    for i in range(max_exponent_bits):
        items = 2 ** (i + non_sign_bits - max_exponent_bits + (0 if signed else 1)) + 1
        bounds = np.linspace(0.1, 1, items, dtype=np.float32)
        means = (bounds[:-1] + bounds[1:]) / 2.0
        scale = 10.0 ** (-(max_exponent_bits - 1) + i)
        values += (scale * means).tolist()
        if signed:
            values += (-scale * means).tolist()
    values += [0.0, 1.0]
    values += [0.0] * (2**total_bits - len(values))
    return np.sort(np.asarray(values, np.float32))


SIGNED_MAP = dynamic_map(signed=True)
UNSIGNED_MAP = dynamic_map(signed=False)


class QuantizedMoment(NamedTuple):
    """One tensor's moment: `codes` (uint8, the tensor's values flattened, each an index into
    the map) and `scales` (float32, each block's absolute maximum)."""

    codes: jax.Array
    scales: jax.Array


class AdamInt8State(NamedTuple):
    count: jax.Array
    mu: optax.Updates  # a QuantizedMoment per parameter, signed map
    nu: optax.Updates  # unsigned map


def quantize_blockwise(x: jax.Array, code: np.ndarray, block_size: int = BLOCK_SIZE) -> QuantizedMoment:
    """x (any shape) -> its QuantizedMoment: blocks of `block_size` flattened values, each
    divided by the block's absolute maximum and rounded to the nearest value of `code`."""
    flat = x.reshape(-1).astype(jnp.float32)
    n = flat.size
    blocks = -(-n // block_size)
    padded = jnp.pad(flat, (0, blocks * block_size - n)).reshape(blocks, block_size)
    scales = jnp.max(jnp.abs(padded), axis=1)
    normalised = padded / jnp.where(scales > 0, scales, 1.0)[:, None]
    midpoints = jnp.asarray((code[1:] + code[:-1]) / 2)
    codes = jnp.searchsorted(midpoints, normalised.reshape(-1)).astype(jnp.uint8)
    return QuantizedMoment(codes[:n], scales)


def dequantize_blockwise(moment: QuantizedMoment, code: np.ndarray, shape, block_size: int = BLOCK_SIZE) -> jax.Array:
    """The float32 tensor of `shape` that a QuantizedMoment stands for."""
    n = moment.codes.size
    blocks = moment.scales.size
    values = jnp.asarray(code)[jnp.pad(moment.codes, (0, blocks * block_size - n)).astype(jnp.int32)]
    return (values.reshape(blocks, block_size) * moment.scales[:, None]).reshape(-1)[:n].reshape(shape)


def scale_by_adam_int8(b1: float = B1, b2: float = B2, eps: float = EPS,
                       block_size: int = BLOCK_SIZE) -> optax.GradientTransformation:
    """optax.scale_by_adam with both moments stored in 8 bits, blockwise (bitsandbytes' 8-bit Adam)."""

    def empty(p):
        blocks = -(-int(np.prod(p.shape, dtype=np.int64)) // block_size)
        return QuantizedMoment(jnp.zeros(int(np.prod(p.shape, dtype=np.int64)), jnp.uint8),
                               jnp.zeros(blocks, jnp.float32))  # scale 0: the moment is 0, whatever the codes

    def init(params):
        return AdamInt8State(jnp.zeros([], jnp.int32), jax.tree.map(empty, params), jax.tree.map(empty, params))

    def update(updates, state, params=None):
        count = optax.safe_increment(state.count)
        leaves, treedef = jax.tree.flatten(updates)
        is_moment = lambda x: isinstance(x, QuantizedMoment)  # noqa: E731
        mus, nus, outs = [], [], []
        for g, mu, nu in zip(leaves, jax.tree.leaves(state.mu, is_leaf=is_moment),
                             jax.tree.leaves(state.nu, is_leaf=is_moment)):
            g32 = g.astype(jnp.float32)
            mu32 = _moment_average(dequantize_blockwise(mu, SIGNED_MAP, g.shape, block_size), g32, b1)
            nu32 = _moment_average(dequantize_blockwise(nu, UNSIGNED_MAP, g.shape, block_size), g32 * g32, b2)
            outs.append(_adam_direction(mu32, nu32, count, b1, b2, eps).astype(g.dtype))
            mus.append(quantize_blockwise(mu32, SIGNED_MAP, block_size))
            nus.append(quantize_blockwise(nu32, UNSIGNED_MAP, block_size))
        state = AdamInt8State(count, treedef.unflatten(mus), treedef.unflatten(nus))
        return treedef.unflatten(outs), state

    return optax.GradientTransformation(init, update)
