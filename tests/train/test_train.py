"""The training loop: reproducible with a seed, gradient accumulation, loss actually falls."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest
from safetensors.numpy import load_file

from kerasft.cli import main
from kerasft.config import LoraConfig, ModelConfig, TrainConfig
from kerasft.data.pipeline import TokenizedSet, epoch_batches, make_batch
from kerasft.models.lora import apply_lora, load_adapter
from kerasft.models.presets import load_model
from kerasft.runtime import init_backend
from kerasft.train.logs import read_metrics
from kerasft.train.loop import TrainSpec, planned_steps, train
from kerasft.train.loss import make_loss_fn

ROOT = Path(__file__).resolve().parents[2]


def _train(tmp_path, tiny_preset, name, *extra):
    argv = ["train", str(ROOT / "configs/quickstart.yaml"), f"model.preset={tiny_preset}", f"output_dir={tmp_path}",
            f"name={name}", f"data.train={ROOT}/data/qa_es/heldout.json", "data.sequence_length=384", *extra]
    # later overrides win, so a test can point data.train elsewhere
    assert main(argv) == 0
    run = tmp_path / name
    return load_file(str(run / "adapter/adapter.safetensors")), [json.loads(l) for l in (run / "metrics.jsonl").read_text().splitlines()]


def test_same_seed_same_adapter_and_accumulation(tiny_preset, tmp_path):
    first, log_a = _train(tmp_path, tiny_preset, "a", "train.max_steps=3", "train.batch_size=2", "train.grad_accum=2")
    second, log_b = _train(tmp_path, tiny_preset, "b", "train.max_steps=3", "train.batch_size=2", "train.grad_accum=2")
    assert first.keys() == second.keys()
    for key in first:
        np.testing.assert_array_equal(first[key], second[key])
    assert [r["loss"] for r in log_a] == [r["loss"] for r in log_b]
    assert [r["step"] for r in log_a] == [1, 2, 3]  # optimizer steps, each of 2 micro-batches
    # the chat tokens' embedding rows train with the adapters and travel in the adapter file
    rows = first["token_embedding/embeddings/rows"]
    assert rows.shape == (2, 32)

    other, _ = _train(tmp_path, tiny_preset, "c", "train.max_steps=3", "train.batch_size=2", "train.grad_accum=2", "train.seed=1")
    assert any(not np.array_equal(first[k], other[k]) for k in first)


def test_max_steps_sets_the_run_length_over_epochs():
    assert planned_steps(10, TrainConfig(batch_size=4, epochs=2.5)) == 8  # 3 batches an epoch
    assert planned_steps(10, TrainConfig(batch_size=4, epochs=2, grad_accum=2)) == 3
    assert planned_steps(10, TrainConfig(batch_size=4, epochs=1, max_steps=7)) == 7  # beyond one epoch: rows repeat
    assert planned_steps(10, TrainConfig(batch_size=4, epochs=5, max_steps=2)) == 2


def test_loss_falls_when_memorising_a_few_answers(tiny_preset, tmp_path):
    lines = [json.dumps({"prompt": f"Pregunta {i}", "response": "La respuesta es Zaragoza."}) for i in range(8)]
    (tmp_path / "few.jsonl").write_text("\n".join(lines) + "\n")
    _, log = _train(tmp_path, tiny_preset, "fit", f"data.train={tmp_path}/few.jsonl", "train.epochs=15",
                    "train.batch_size=4", "train.learning_rate=1e-2", "train.warmup_ratio=0",
                    "lora.targets=[query,value,ffw_linear]")
    losses = [r["loss"] for r in log]
    assert len(losses) == 30
    assert np.mean(losses[-3:]) < 0.5 * np.mean(losses[:3]), losses


def test_adapter_restores_trained_token_rows(tiny_preset, tmp_path):
    _train(tmp_path, tiny_preset, "rows", "train.max_steps=2", "train.learning_rate=1e-2")
    base = load_model(ModelConfig(preset=str(tiny_preset))).backbone.token_embedding.embeddings.numpy()
    tuned = load_model(ModelConfig(preset=str(tiny_preset))).backbone
    meta = load_adapter(tuned, tmp_path / "rows" / "adapter")
    table = tuned.token_embedding.embeddings.numpy()
    ids = meta["trainable_tokens"]["ids"]
    changed = np.flatnonzero(np.abs(table - base).max(axis=1) > 0)
    assert sorted(changed.tolist()) == sorted(ids)


def _tiny_lora_backbone(tiny_preset):
    """The tiny preset with rank-4 adapters on query and value, drawn from one seed every time."""
    init_backend(seed=0)  # LoRA's A matrices start random
    loaded = load_model(ModelConfig(preset=str(tiny_preset)))
    apply_lora(loaded.backbone, LoraConfig(rank=4, alpha=8.0, targets=("query", "value")))
    return loaded.backbone


def _uneven_rows(vocabulary: int) -> TokenizedSet:
    """8 rows of 20 to 55 tokens whose last 1 to 15 tokens carry the loss: micro-batches of
    very different loss weights, all within one 64-wide bucket."""
    numbers = np.random.default_rng(7)
    rows = []
    for length, targets in zip((20, 30, 40, 50, 25, 35, 45, 55), (2, 10, 3, 15, 5, 1, 8, 12)):
        ids = numbers.integers(4, vocabulary, length).tolist()
        rows.append((ids, [0] * (length - targets) + [1] * targets))
    return TokenizedSet.from_rows(rows, sequence_length=64)


def _trained(backbone, token_rows) -> list[np.ndarray]:
    table = backbone.token_embedding.embeddings.numpy()
    return [np.asarray(v.numpy()) for v in backbone.trainable_variables] + [table[list(token_rows)]]


def test_accumulated_micro_batches_take_the_step_of_one_large_batch(tiny_preset, tmp_path):
    """batch_size=2, grad_accum=2 trains the same weights as batch_size=4 on the same rows: the
    step is normalised by the weights of all its micro-batches, not each micro-batch by its own.
    Every record also carries the progress figures the progress line prints."""
    token_rows = (5, 6)
    runs = {}
    for name, batch_size, accum in (("large", 4, 1), ("accumulated", 2, 2)):
        backbone = _tiny_lora_backbone(tiny_preset)
        data = _uneven_rows(backbone.vocabulary_size)
        cfg = TrainConfig(batch_size=batch_size, grad_accum=accum, max_steps=3, learning_rate=1e-3, warmup_ratio=0,
                          checkpoint_every=0, plots=False)
        train(backbone, data, TrainSpec(cfg, token_rows=token_rows), tmp_path / name)
        runs[name] = (_trained(backbone, token_rows), read_metrics(tmp_path / name / "metrics.jsonl"))
    (large, large_log), (accumulated, accumulated_log) = runs["large"], runs["accumulated"]
    for key in ("loss", "grad_norm", "tokens"):
        np.testing.assert_allclose([r[key] for r in accumulated_log], [r[key] for r in large_log], rtol=1e-5, err_msg=key)
    for got, want in zip(accumulated, large):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.abs(large[-1]).max() > 0  # the token rows trained

    for log in (large_log, accumulated_log):
        assert [(r["step"], r["total_steps"]) for r in log] == [(1, 3), (2, 3), (3, 3)]
        for record in log:
            assert isinstance(record["tokens_per_second"], float) and isinstance(record["eta_seconds"], float)
        assert log[1]["tokens_per_second"] > 0 and log[1]["eta_seconds"] > 0
        assert log[-1]["eta_seconds"] == 0.0
    # The first micro-batch includes compilation and is not timed: one alone gives no rate yet.
    assert large_log[0]["tokens_per_second"] == 0.0 and accumulated_log[0]["tokens_per_second"] > 0


def test_clipped_update_is_adamw_on_the_clipped_gradient(tiny_preset, tmp_path):
    """train.max_grad_norm far below the gradient's norm: the first update is AdamW's on the
    gradient scaled to that norm (with a norm this small Adam's eps makes the update nearly
    proportional to the gradient, so an unclipped step would be far away)."""
    import optax

    token_rows = (5, 6)
    clip = 1e-7
    backbone = _tiny_lora_backbone(tiny_preset)
    data = _uneven_rows(backbone.vocabulary_size)
    cfg = TrainConfig(batch_size=4, max_steps=1, learning_rate=1e-2, warmup_ratio=0, weight_decay=0.01,
                      max_grad_norm=clip, checkpoint_every=0, plots=False)
    params = {"lora": [v.value for v in backbone.trainable_variables],
              "token_delta": np.zeros((len(token_rows), backbone.hidden_dim), np.float32)}
    frozen = [v.value for v in backbone.non_trainable_variables]
    batch = make_batch(data, epoch_batches(data, 4, cfg.seed, 0)[0], data.num_targets)
    grads = jax.grad(lambda p: make_loss_fn(backbone, token_rows)(p, frozen, batch)[0])(params)
    norm = float(optax.global_norm(grads))
    assert norm > 1e4 * clip

    def adamw_step(max_norm):
        chain = optax.chain(optax.clip_by_global_norm(max_norm),
                            optax.adamw(1e-2, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.01))
        updates, _ = chain.update(grads, chain.init(params), params)
        new = optax.apply_updates(params, updates)
        table = backbone.token_embedding.embeddings.numpy()[list(token_rows)]
        return [np.asarray(x) for x in new["lora"]] + [table + np.asarray(new["token_delta"])]

    expected, unclipped = adamw_step(clip), adamw_step(1e9)
    train(backbone, data, TrainSpec(cfg, token_rows=token_rows), tmp_path / "clip")
    (record,) = read_metrics(tmp_path / "clip" / "metrics.jsonl")
    assert record["grad_norm"] == pytest.approx(norm, rel=1e-5)  # logged before clipping
    got = _trained(backbone, token_rows)
    for value, want in zip(got, expected):
        np.testing.assert_allclose(value, want, rtol=1e-4, atol=1e-7)
    assert max(np.abs(a - b).max() for a, b in zip(got, unclipped)) > 1e-3
