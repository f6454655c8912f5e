"""Memory plan: the offline architecture table matches keras-hub's presets, the plan compiles
the real step, and its peak agrees with a measured step on this CPU."""

import importlib.util
import os
from pathlib import Path

import pytest

# With libtpu installed, JAX loads it when it starts its backends (here, before the plan does);
# let it share libtpu with another process (a plan or a TPU job) instead of failing on its lockfile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

from kerasft.cli import main
from kerasft.config import ModelConfig, load_config
from kerasft.models.presets import load_model
from kerasft.train.plan import backbone_spec, measure_step, plan_step

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", ["gemma_2b_en", "gemma_7b_en", "gemma2_2b_en", "gemma2_9b_en", "gemma3_1b", "gemma3_270m"])
def test_architecture_table_matches_keras_hub_parameter_counts(name):
    import jax
    import keras_hub

    class_name, kwargs = backbone_spec(ModelConfig(preset=name))
    built = {}

    def build():
        built["backbone"] = getattr(keras_hub.models, class_name)(**kwargs)
        return [v.value for v in built["backbone"].weights]

    jax.eval_shape(build)
    assert built["backbone"].count_params() == keras_hub.models.Backbone.presets[name]["metadata"]["params"]


def test_plan_fits_and_predicts_the_measured_peak(tiny_preset, capsys):
    # Large enough activations (attention scores 8x4x512x512 floats a layer) to rise above RSS noise.
    cfg = load_config(ROOT / "configs/quickstart.yaml", [f"model.preset={tiny_preset}", "data.sequence_length=512",
                                                         "train.batch_size=8"])
    plan = plan_step(cfg, "cpu", search=False)
    assert plan.fits and plan.step.batch_size == 8
    assert plan.parameters > plan.trainable_parameters > 0
    assert plan.step.temporaries > 100 * 2**20
    measured = measure_step(cfg)
    ratio = plan.step.peak / measured["measured_peak"]
    print(f"planned {plan.step.peak} measured {measured['measured_peak']} ratio {ratio:.2f}")
    assert 0.7 < ratio < 1.5, (plan.step, measured)


def test_plan_command_reports_and_searches(tiny_preset, capsys, monkeypatch):
    # The CPU compiler's fallback for a GPU target, even where the gpu-plan extra is installed
    # (-m gpu_plan tests the CUDA compiler).
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("jax_cuda") else real_find_spec(name, *a))
    argv = ["plan", str(ROOT / "configs/quickstart.yaml"), f"model.preset={tiny_preset}", "--target", "t4",
            "data.sequence_length=128", "train.batch_size=2"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "trainable + optimizer state" in out and "-> FITS" in out
    # The tiny model fits any batch the search reaches: it doubles six times from 2.
    assert "largest batch that fits: 128" in out
    assert "compiled with the cpu compiler, not gpu's" in out


def test_plan_refuses_what_it_cannot_know(tmp_path, capsys):
    argv = ["plan", str(ROOT / "configs/quickstart.yaml"), "model.preset=gemma_99b", "--target", "h100"]
    assert main(argv) == 2
    assert "model.preset: cannot plan 'gemma_99b' offline" in capsys.readouterr().err


@pytest.mark.tpu
@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu: pip install -e '.[tpu-plan]'")
def test_tpu_target_compiles_with_the_tpu_compiler(tiny_preset, capsys):
    # With libtpu installed the TPU targets compile for abstract TPU devices: no TPU, no simulation.
    argv = ["plan", str(ROOT / "configs/quickstart.yaml"), f"model.preset={tiny_preset}", "--target", "tpu-v3-8",
            "runtime.mesh=model", "data.sequence_length=128", "train.batch_size=8", "--no-search"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "compiled for tpu on 8 device(s), mesh model auto" in out
    assert "compiled with the TPU compiler (libtpu) for 8 abstract TPU v3 devices (topology v3:2x2)" in out
    # The plan put keras' distribution back: a model loaded afterwards lands on this machine's devices.
    import keras

    assert keras.distribution.distribution() is None
    assert load_model(ModelConfig(preset=str(tiny_preset))).backbone.count_params() > 0
