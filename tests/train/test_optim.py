"""train.optimizer, train.moments and train.schedule (kerasft.train.optim): learning rates at chosen
steps, the 8-bit and bfloat16 moment stores, every optimizer training the tiny preset and
resuming bit for bit from a checkpoint, and the memory plan's optimizer-state bytes."""

import dataclasses
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kerasft.config import LoraConfig, ModelConfig, TrainConfig, load_config
from kerasft.data.pipeline import TokenizedSet, make_batch
from kerasft.errors import KerasftError
from kerasft.models.lora import apply_lora
from kerasft.models.presets import load_model
from kerasft.runtime import init_backend, place_batch
from kerasft.train.checkpoint import Checkpointer, Position
from kerasft.train.loop import TrainSpec, build_step
from kerasft.train.optim import (
    BLOCK_SIZE, SIGNED_MAP, UNSIGNED_MAP, build_schedule, dequantize_blockwise, quantize_blockwise,
    stochastic_round_bf16,
)

ROOT = Path(__file__).resolve().parents[2]


# -- schedules: 10 steps, peak 1e-3, warmup_ratio 0.2 -> 2 warmup steps, 8 decay steps ------------
# cosine at step s >= 2: 1e-3 * (1 + cos(pi * (s - 2) / 8)) / 2; linear: 1e-3 * (1 - (s - 2) / 8).
@pytest.mark.parametrize("schedule, expected", [
    ("cosine", {0: 0.0, 1: 5e-4, 2: 1e-3, 4: 1e-3 * (1 + 0.5 ** 0.5) / 2, 6: 5e-4, 8: 1e-3 * (1 - 0.5 ** 0.5) / 2,
                9: 1e-3 * (1 + math.cos(7 * math.pi / 8)) / 2, 10: 0.0}),
    ("linear", {0: 0.0, 1: 5e-4, 2: 1e-3, 4: 7.5e-4, 6: 5e-4, 9: 1.25e-4, 10: 0.0}),
    ("constant", {0: 0.0, 1: 5e-4, 2: 1e-3, 5: 1e-3, 9: 1e-3}),
])
def test_learning_rate_at_chosen_steps(schedule, expected):
    lr = build_schedule(TrainConfig(learning_rate=1e-3, warmup_ratio=0.2, schedule=schedule), total_steps=10)
    got = {step: float(lr(step)) for step in expected}
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-12)  # float32 arithmetic


def test_no_warmup_starts_at_the_peak():
    for schedule in ("cosine", "linear", "constant"):
        lr = build_schedule(TrainConfig(learning_rate=2e-4, warmup_ratio=0, schedule=schedule), total_steps=4)
        assert float(lr(0)) == pytest.approx(2e-4)
    lr = build_schedule(TrainConfig(learning_rate=2e-4, warmup_ratio=0, schedule="linear"), total_steps=4)
    assert float(lr(3)) == pytest.approx(5e-5)  # 2e-4 * (1 - 3/4): the last update still moves


@pytest.mark.parametrize("override, message", [
    ("train.optimizer=adam", "train.optimizer: 'adam' is not one of adamw, adafactor, lion, sgd"),
    ("train.schedule=step", "train.schedule: 'step' is not one of cosine, linear, constant"),
    ("train.moments=int4", "train.moments: 'int4' is not one of float32, bfloat16, int8"),
    ("train.moments=int8 train.optimizer=lion", "train.moments: int8 moments are adamw's; train.optimizer is lion"),
    ("train.momentum=1", "train.momentum: must be < 1"),
])
def test_bad_optimizer_settings_are_one_line_errors(override, message):
    with pytest.raises(KerasftError) as err:
        load_config(None, override.split())
    assert message in str(err.value) and "\n" not in str(err.value)


# -- the moment stores --------------------------------------------------------------------------

def test_dynamic_maps_are_bitsandbytes():
    """create_dynamic_map(signed) of bitsandbytes: 256 sorted codes, 0 and 1 included, the
    smallest non-zero magnitudes 0.55e-6 (signed) and 0.325e-6 (unsigned)."""
    for code, low in ((SIGNED_MAP, -0.99296875), (UNSIGNED_MAP, 0.0)):
        assert code.shape == (256,) and np.all(np.diff(code) >= 0)
        assert code[0] == pytest.approx(low) and code[-1] == 1.0 and 0.0 in code
    assert np.min(np.abs(SIGNED_MAP[SIGNED_MAP != 0])) == pytest.approx(0.55e-6)
    assert np.min(UNSIGNED_MAP[UNSIGNED_MAP > 0]) == pytest.approx(0.325e-6)
    assert len(np.unique(UNSIGNED_MAP)) == 256


def test_blockwise_int8_keeps_small_values_next_to_large_ones():
    """The dynamic map's point: in a block whose maximum is 1, a second moment of 1e-4 comes back
    within 10 % (a linear 8-bit map would round it to 0: its step is 1/255)."""
    values = np.full(BLOCK_SIZE + 44, 1e-4, np.float32)  # two blocks, the second one short
    values[0] = 1.0
    values[BLOCK_SIZE + 3] = 3e-3
    moment = quantize_blockwise(jnp.asarray(values).reshape(20, 15), UNSIGNED_MAP)
    assert moment.codes.dtype == jnp.uint8 and moment.codes.shape == (300,) and moment.scales.shape == (2,)
    back = np.asarray(dequantize_blockwise(moment, UNSIGNED_MAP, (20, 15))).reshape(-1)
    np.testing.assert_allclose(back, values, rtol=0.1)
    assert back[0] == 1.0 and back[BLOCK_SIZE + 3] == pytest.approx(3e-3)  # each block's maximum is exact
    signed = np.linspace(-2, 1, 300).astype(np.float32)
    got = np.asarray(dequantize_blockwise(quantize_blockwise(jnp.asarray(signed), SIGNED_MAP), SIGNED_MAP, (300,)))
    assert np.max(np.abs(got - signed)) < 2 * 0.0075  # half the widest gap of the top decade, times the scale 2


def test_bfloat16_stochastic_rounding_is_exact_in_expectation():
    """1 + 2^-10 lies between the bfloat16 neighbours 1 and 1 + 2^-7: rounded up an eighth of
    the time, so the mean is the float32 value (round-to-nearest would always give 1)."""
    x = jnp.full((20000,), 1 + 2.0**-10, jnp.float32)
    rounded = np.asarray(stochastic_round_bf16(x, jax.random.PRNGKey(0)).astype(jnp.float32))
    assert set(np.unique(rounded)) == {1.0, 1 + 2.0**-7}
    assert rounded.mean() == pytest.approx(1 + 2.0**-10, rel=2e-4)
    # Why: rounded to nearest, a second moment decayed by b2 = 0.999 stays where it was.
    stored = jnp.asarray([1.0, 1.5, 1.99], jnp.bfloat16)
    assert np.all(np.asarray((0.999 * stored.astype(jnp.float32)).astype(jnp.bfloat16) == stored))


# -- every optimizer on the tiny preset ---------------------------------------------------------

KINDS = {  # name -> (train overrides, learning rate that moves the tiny model in 3 steps)
    "adamw": ({}, 1e-2),
    "adamw-bfloat16": ({"moments": "bfloat16"}, 1e-2),
    "adamw-int8": ({"moments": "int8"}, 1e-2),
    "adafactor": ({"optimizer": "adafactor"}, 1e-2),
    "lion": ({"optimizer": "lion"}, 1e-3),
    "sgd": ({"optimizer": "sgd"}, 1.0),
}


@pytest.fixture(scope="module")
def tiny_lora(tiny_preset):
    """The tiny preset with rank-4 adapters on query and value, and one batch of 8 rows."""
    init_backend(seed=0)
    backbone = load_model(ModelConfig(preset=str(tiny_preset))).backbone
    apply_lora(backbone, LoraConfig(rank=4, alpha=8.0, targets=("query", "value")))
    numbers = np.random.default_rng(7)
    rows = [(numbers.integers(4, backbone.vocabulary_size, 40).tolist(), [0] * 30 + [1] * 10) for _ in range(8)]
    data = TokenizedSet.from_rows(rows, sequence_length=64)
    return backbone, place_batch(make_batch(data, np.arange(8), data.num_targets))


# A compile of the tiny step each: the default suite runs int8 moments (the most code of its own;
# bfloat16's rounding has its own test above), the slow tier every other kind (adamw's resume
# through train() is also test_resume.py's).
@pytest.mark.parametrize("kind", [kind if kind == "adamw-int8" else pytest.param(kind, marks=pytest.mark.slow)
                                  for kind in KINDS])
def test_optimizer_trains_and_resumes_bit_for_bit(kind, tiny_lora, tmp_path):
    """Three steps on one batch lower the loss; the state after step 2, saved and restored by the
    trainer's Checkpointer (orbax), continues into exactly the third step of the uninterrupted run
    (train()'s resume around it is tests/train/test_resume.py's)."""
    backbone, batch = tiny_lora
    overrides, lr = KINDS[kind]
    cfg = TrainConfig(learning_rate=lr, warmup_ratio=0, seed=3, **overrides)
    step = build_step(backbone, TrainSpec(cfg, token_rows=(5, 6)), total_steps=3)
    trainable, opt_state, frozen = jax.tree.map(jnp.copy, step.state(backbone))  # the step donates its inputs
    losses = []
    checkpoints = Checkpointer(tmp_path, keep=1)
    for number in range(3):
        if number == 2:
            checkpoints.save({"trainable": trainable, "opt_state": opt_state}, Position(2), {"kind": kind})
        trainable, opt_state, stats = step.fn(trainable, opt_state, frozen, batch)
        losses.append(float(stats["loss"]))
    checkpoints.close()
    assert losses[2] < losses[1] < losses[0], losses

    like = {"trainable": trainable, "opt_state": opt_state}
    restored, position = Checkpointer(tmp_path, keep=1).restore(jax.tree.map(jnp.copy, like), {"kind": kind})
    assert position.step == 2
    for saved, kept in zip(jax.tree.leaves(restored), jax.tree.leaves(like)):
        assert saved.dtype == kept.dtype and saved.shape == kept.shape
    again, again_state, _ = step.fn(restored["trainable"], restored["opt_state"], frozen, batch)
    for got, want in zip(jax.tree.leaves([again, again_state]), jax.tree.leaves([trainable, opt_state])):
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


# -- the memory plan ----------------------------------------------------------------------------

def _plans(tiny_preset, kinds):
    from kerasft.train.plan import plan_step

    base = load_config(ROOT / "configs/quickstart.yaml", [f"model.preset={tiny_preset}", "data.sequence_length=32",
                                                          "train.batch_size=2"])
    plans = {}
    for kind in kinds:
        cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, **KINDS[kind][0]))
        plans[kind] = plan_step(cfg, "cpu", search=False)
    return plans, _trained_sizes(base)


def _trained_sizes(cfg) -> list[int]:
    """Values in each trained tensor of the plan's step: the LoRA matrices and the token rows."""
    from kerasft.train.plan import abstract_backbone

    backbone = abstract_backbone(cfg.model, cfg.lora)
    sizes = [int(np.prod(v.shape)) for v in backbone.trainable_variables]
    if cfg.lora.trainable_tokens:
        sizes.append(len(cfg.lora.trainable_tokens) * backbone.token_embedding.embeddings.shape[1])
    return sizes


COUNTERS = 8  # int32 step counts: the moments' (bias correction) and the schedule's


def _expected_state_bytes(sizes) -> dict:
    """Optimizer-state bytes by hand from the trained tensors' sizes: AdamW keeps 2 float32
    moments (8 bytes a value), bfloat16 moments 4, int8 moments 2 plus a float32 scale per block
    of 256 values in each moment; one-moment optimizers (lion, sgd with momentum) 4."""
    return {"adamw": COUNTERS + 8 * sum(sizes), "adamw-bfloat16": COUNTERS + 4 * sum(sizes),
            "adamw-int8": COUNTERS + sum(2 * (n + 4 * -(-n // BLOCK_SIZE)) for n in sizes),
            "one moment": 4 * sum(sizes)}


def test_plan_shows_the_int8_moments_saving(tiny_preset):
    """The plan's optimizer state under train.moments=int8 is the blockwise bytes, about a quarter
    of AdamW's float32 moments (the slow tier plans float32 itself too)."""
    plans, sizes = _plans(tiny_preset, ["adamw-int8"])
    plan = plans["adamw-int8"]
    expected = _expected_state_bytes(sizes)
    assert plan.step.optimizer_state == expected["adamw-int8"]
    assert 0.25 < plan.step.optimizer_state / expected["adamw"] < 0.27
    assert plan.step.trainable_and_optimizer == plan.step.optimizer_state + 4 * sum(sizes)  # float32 weights
    assert plan.optimizer == "adamw, int8 moments"


@pytest.mark.slow
def test_plan_shows_every_optimizers_state(tiny_preset):
    """Half the bytes for bfloat16 moments and for the one-moment optimizers (lion, sgd with
    momentum); adafactor's factored second moment (LoRA's tensors are under 128 wide: one value a
    weight) at most half."""
    plans, sizes = _plans(tiny_preset, list(KINDS))
    expected = _expected_state_bytes(sizes)
    state = {kind: plan.step.optimizer_state for kind, plan in plans.items()}
    for kind in ("adamw", "adamw-bfloat16", "adamw-int8"):
        assert state[kind] == expected[kind], kind
    assert 0 < state["lion"] - expected["one moment"] <= 16 and 0 <= state["sgd"] - expected["one moment"] <= 16
    assert state["adafactor"] <= expected["one moment"] + 16 * len(sizes)
