"""The training loop: reproducible with a seed, gradient accumulation, loss actually falls."""

import json
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

from kerasft.cli import main

ROOT = Path(__file__).resolve().parent.parent


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
    from kerasft.config import TrainConfig
    from kerasft.train.loop import planned_steps

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
    from kerasft.config import ModelConfig
    from kerasft.models.lora import load_adapter
    from kerasft.models.presets import load_model

    _train(tmp_path, tiny_preset, "rows", "train.max_steps=2", "train.learning_rate=1e-2")
    base = load_model(ModelConfig(preset=str(tiny_preset))).backbone.token_embedding.embeddings.numpy()
    tuned = load_model(ModelConfig(preset=str(tiny_preset))).backbone
    meta = load_adapter(tuned, tmp_path / "rows" / "adapter")
    table = tuned.token_embedding.embeddings.numpy()
    ids = meta["trainable_tokens"]["ids"]
    changed = np.flatnonzero(np.abs(table - base).max(axis=1) > 0)
    assert sorted(changed.tolist()) == sorted(ids)
