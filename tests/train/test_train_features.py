"""Training features around the step: validation loss, early stopping and keep_best, samples,
TensorBoard and plots, NaN handling, rematerialisation and LoRA dropout."""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from kerasft.cli import main
from kerasft.config import LoraConfig, ModelConfig, load_config
from kerasft.errors import KerasftError
from kerasft.export.hf import hf_state_dict
from kerasft.models.lora import apply_lora, lora_layers
from kerasft.models.presets import load_model
from kerasft.train.logs import RunLog
from kerasft.train.loop import apply_remat, dropout_key
from kerasft.train.loss import make_loss_fn
from kerasft.train.plan import plan_step
from kerasft.workflow import run

ROOT = Path(__file__).resolve().parents[2]


def _data(tmp_path):
    train = [json.dumps({"prompt": f"Pregunta {i}", "response": "La respuesta es Zaragoza."}) for i in range(8)]
    validation = [json.dumps({"prompt": f"Otra pregunta {i}", "response": "La respuesta es Zaragoza."}) for i in range(3)]
    (tmp_path / "train.jsonl").write_text("\n".join(train) + "\n")
    (tmp_path / "validation.jsonl").write_text("\n".join(validation) + "\n")


def _train(tmp_path, tiny_preset, name, *extra):
    argv = ["train", str(ROOT / "configs/quickstart.yaml"), f"model.preset={tiny_preset}", f"output_dir={tmp_path}",
            f"name={name}", f"data.train={tmp_path}/train.jsonl", f"data.validation={tmp_path}/validation.jsonl",
            "data.sequence_length=64", "train.batch_size=4", "train.warmup_ratio=0", *extra]
    assert main(argv) == 0
    run = tmp_path / name
    return run, [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_eval_loss_samples_tensorboard_and_plots(tiny_preset, tmp_path):
    import tensorflow as tf

    _data(tmp_path)
    run, log = _train(tmp_path, tiny_preset, "feat", "train.epochs=2", "train.learning_rate=1e-2",
                      "train.eval_every=2", "train.sample_every=2", "train.sample_prompts=2", "train.sample_tokens=4",
                      "train.loggers=[tensorboard]")
    evals = [(r["step"], r["eval_loss"]) for r in log if "eval_loss" in r]
    assert [s for s, _ in evals] == [2, 4]
    assert evals[1][1] < evals[0][1]  # memorising one answer: the held-out answer gets likelier too
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert [(s["step"], s["prompt"]) for s in samples] == [(2, "Otra pregunta 0"), (2, "Otra pregunta 1"),
                                                          (4, "Otra pregunta 0"), (4, "Otra pregunta 1")]
    assert all(isinstance(s["output"], str) for s in samples)

    events = {}
    for path in (run / "tensorboard").glob("events.out.tfevents.*"):
        for event in tf.compat.v1.train.summary_iterator(str(path)):
            for value in event.summary.value:
                events.setdefault(value.tag, {})[event.step] = float(tf.make_ndarray(value.tensor))
    assert sorted(events["loss"]) == [1, 2, 3, 4]
    assert events["loss"][3] == pytest.approx(log[2]["loss"], rel=1e-6)
    assert events["eval_loss"][4] == pytest.approx(evals[1][1], rel=1e-6)
    for png in ("lr_schedule.png", "loss_curves.png"):
        assert (run / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train"]["best_step"] == 4 and not summary["train"]["stopped_early"]


def test_early_stopping_keeps_the_best_adapter(tiny_preset, tmp_path):
    _data(tmp_path)
    # Validation answers that contradict the training answers: once the model has learnt the shared
    # words, memorising "Zaragoza" makes the held-out "Bilbao" less likely and eval_loss rises.
    wrong = [json.dumps({"prompt": f"Pregunta {i}", "response": "Bilbao."}) for i in range(3)]
    (tmp_path / "validation.jsonl").write_text("\n".join(wrong) + "\n")
    run, log = _train(tmp_path, tiny_preset, "stop", "train.epochs=20", "train.learning_rate=1e-2",
                      "train.eval_every=1", "train.early_stopping_patience=2", "train.keep_best=true",
                      "train.checkpoint_every=0", "train.plots=false")
    evals = [r["eval_loss"] for r in log if "eval_loss" in r]
    best = int(np.argmin(evals))
    assert len(log) == best + 3 < 40, evals  # stopped after two evaluations without improvement
    summary = json.loads((run / "summary.json").read_text())
    assert summary["train"]["stopped_early"] and summary["train"]["best_step"] == best + 1
    saved = np.load(run / "best_adapter.npz")
    assert int(saved["step"]) == best + 1
    adapter = load_file(str(run / "adapter/adapter.safetensors"))
    lora = sorted(k for k in adapter if "lora" in k)
    # the saved adapter is the best evaluation's, not the last step's
    assert any(np.array_equal(adapter[lora[0]], saved[f"leaf_{i}"]) for i in range(len(saved.files) - 1))


def test_eval_every_without_validation_is_an_error(tiny_preset, tmp_path):
    _data(tmp_path)
    argv = ["train", str(ROOT / "configs/quickstart.yaml"), f"model.preset={tiny_preset}", f"output_dir={tmp_path}",
            "name=noval", f"data.train={tmp_path}/train.jsonl", "train.eval_every=2"]
    assert main(argv) != 0
    with pytest.raises(KerasftError, match="train.keep_best"):
        load_config(None, ["train.keep_best=true"])
    with pytest.raises(KerasftError, match="train.loggers"):
        load_config(None, ["train.loggers=[tensorbored]"])


def test_missing_logger_package_names_it(tmp_path, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_wandb(name, *args, **kwargs):
        if name == "wandb":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_wandb)
    with pytest.raises(KerasftError, match="pip install wandb"):
        RunLog(tmp_path, ["wandb"])


def test_nan_stops_and_names_the_last_good_checkpoint(tiny_preset, tmp_path):
    _data(tmp_path)
    argv = ["train", str(ROOT / "configs/quickstart.yaml"), f"model.preset={tiny_preset}", f"output_dir={tmp_path}",
            "name=nan", f"data.train={tmp_path}/train.jsonl", "data.sequence_length=64", "train.batch_size=4",
            "train.epochs=20", "train.learning_rate=1e30", "train.max_grad_norm=1e30", "train.warmup_ratio=0",
            "train.checkpoint_every=1", "train.keep_checkpoints=1"]

    cfg = load_config(argv[1], argv[2:])
    with pytest.raises(KerasftError, match=r"the last good checkpoint, step (\d+), is kept in .*checkpoints/\1") as err:
        run(cfg, evaluate=False, export=False)
    step = int(str(err.value).split("checkpoint, step ")[1].split(",")[0])
    assert (tmp_path / "nan" / "checkpoints" / str(step)).is_dir()


def _tiny_step_inputs(tiny_preset, lora_cfg, remat="none"):
    import jax.numpy as jnp

    backbone = load_model(ModelConfig(preset=str(tiny_preset))).backbone
    apply_lora(backbone, lora_cfg)
    rng = np.random.default_rng(0)
    for layer in lora_layers(backbone):
        for variable in (layer.lora_kernel_a, layer.lora_kernel_b):
            variable.assign(rng.normal(0, 0.2, size=variable.shape).astype("float32"))
    apply_remat(backbone, remat)
    ids = rng.integers(4, 500, (2, 32))
    batch = {"token_ids": jnp.asarray(ids, jnp.int32), "padding_mask": jnp.ones((2, 32), bool),
             "target_positions": jnp.asarray(np.tile(np.arange(31), (2, 1)), jnp.int32),
             "target_ids": jnp.asarray(ids[:, 1:], jnp.int32), "target_weights": jnp.ones((2, 31), jnp.float32)}
    params = {"lora": [v.value for v in backbone.trainable_variables]}
    return backbone, params, [v.value for v in backbone.non_trainable_variables], batch


def test_remat_same_loss_and_grads_smaller_plan(tiny_preset):
    import jax

    results = {}
    for mode in ("none", "full"):
        backbone, params, frozen, batch = _tiny_step_inputs(tiny_preset, LoraConfig(targets=("query", "value", "ffw_linear")), mode)
        (loss, _), grads = jax.jit(jax.value_and_grad(make_loss_fn(backbone), has_aux=True))(params, frozen, batch)
        results[mode] = (float(loss), jax.tree.leaves(grads))
    assert results["full"][0] == pytest.approx(results["none"][0], rel=1e-6)
    for a, b in zip(results["none"][1], results["full"][1]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)  # recomputation reorders sums

    temporaries = {}
    for mode in ("none", "full"):
        cfg = load_config(ROOT / "configs/quickstart.yaml", [f"model.preset={tiny_preset}", "data.sequence_length=512",
                                                              "train.batch_size=8", f"train.remat={mode}"])
        temporaries[mode] = plan_step(cfg, "cpu", search=False).step.temporaries
    assert temporaries["full"] < temporaries["none"], temporaries


def test_lora_dropout_in_training_only(tiny_preset):
    import jax

    lora_cfg = LoraConfig(targets=("query", "value", "ffw_linear"), dropout=0.5)
    backbone, params, frozen, batch = _tiny_step_inputs(tiny_preset, lora_cfg)
    exported = hf_state_dict(backbone)
    loss_fn = jax.jit(make_loss_fn(backbone, dropout=0.5))
    plain = float(loss_fn(params, frozen, batch)[0])
    first = float(loss_fn(params, frozen, batch, dropout_key(0, 0))[0])
    again = float(loss_fn(params, frozen, batch, dropout_key(0, 0))[0])
    other = float(loss_fn(params, frozen, batch, dropout_key(0, 1))[0])
    assert first == again  # a pure function of (seed, step): resume stays bit-exact
    assert first != plain and other != first
    # the separately computed branch is the merged layer's function when nothing is dropped
    nearly_none = jax.jit(make_loss_fn(backbone, dropout=1e-9))
    assert float(nearly_none(params, frozen, batch, dropout_key(0, 0))[0]) == pytest.approx(plain, rel=1e-6)
    # no key: the same loss as a model built without dropout, and the merged export is unchanged
    assert plain == pytest.approx(float(jax.jit(make_loss_fn(backbone))(params, frozen, batch)[0]), rel=1e-6)
    after = hf_state_dict(backbone)
    assert all(np.array_equal(exported[k], after[k]) for k in exported)
    with pytest.raises(KerasftError, match="lora.dropout"):
        LoraConfig(dropout=1.0)


def test_lora_dropout_run_is_reproducible(tiny_preset, tmp_path):
    _data(tmp_path)
    adapters = []
    for name in ("d1", "d2", "d0"):
        dropout = "0.0" if name == "d0" else "0.3"
        run, _ = _train(tmp_path, tiny_preset, name, "train.epochs=2", "train.max_steps=3", "train.learning_rate=1e-2",
                        f"lora.dropout={dropout}", "train.plots=false")
        adapters.append(load_file(str(run / "adapter/adapter.safetensors")))
    assert all(np.array_equal(adapters[0][k], adapters[1][k]) for k in adapters[0])
    assert any(not np.array_equal(adapters[0][k], adapters[2][k]) for k in adapters[0])
