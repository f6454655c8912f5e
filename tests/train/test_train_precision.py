"""model.dtype: float32, bfloat16 and mixed_bfloat16 train with float32 adapters, and presets
saved under any policy load back under any other."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from kerasft.cli import main
from kerasft.config import LoraConfig, ModelConfig
from kerasft.models.lora import apply_lora
from kerasft.models.presets import load_model

ROOT = Path(__file__).resolve().parents[2]
POLICIES = ("float32", "bfloat16", "mixed_bfloat16")


@pytest.fixture(scope="module")
def policy_presets(tiny_preset, tmp_path_factory):
    """The tiny Gemma 3 preset re-saved under each dtype policy."""
    root = tmp_path_factory.mktemp("policies")
    presets = {}
    for policy in POLICIES:
        out = root / policy
        shutil.copytree(tiny_preset, out)
        load_model(ModelConfig(preset=str(tiny_preset), dtype=policy)).backbone.save_to_preset(str(out))
        assert json.loads((out / "config.json").read_text())["config"]["dtype"]["config"]["name"] == policy
        presets[policy] = out
    return presets


@pytest.mark.parametrize("saved", POLICIES)
def test_preset_saved_under_any_policy_loads_under_any_policy(policy_presets, tiny_preset, saved):
    reference = load_model(ModelConfig(preset=str(tiny_preset))).backbone.token_embedding.embeddings.numpy()
    variable_dtype = {"float32": "float32", "bfloat16": "bfloat16", "mixed_bfloat16": "float32"}
    for policy in POLICIES:
        backbone = load_model(ModelConfig(preset=str(policy_presets[saved]), dtype=policy)).backbone
        assert backbone.dtype_policy.name == policy
        table = backbone.token_embedding.embeddings
        assert table.dtype == variable_dtype[policy]
        # A bfloat16 round trip keeps 8 bits of mantissa.
        exact = saved != "bfloat16" and policy != "bfloat16"
        np.testing.assert_allclose(np.asarray(table.numpy(), np.float32), reference, rtol=0 if exact else 1e-2,
                                   atol=0 if exact else 1e-3)
        apply_lora(backbone, LoraConfig(rank=2))
        assert backbone.trainable_variables and all(v.dtype == "float32" for v in backbone.trainable_variables)


def test_each_policy_trains_float32_adapters(tiny_preset, tmp_path):
    losses = {}
    for policy in POLICIES:
        argv = ["train", str(ROOT / "configs/quickstart.yaml"), f"model.preset={tiny_preset}", f"output_dir={tmp_path}",
                f"name={policy}", f"data.train={ROOT}/data/qa_es/heldout.json", "data.sequence_length=384",
                "train.max_steps=2", "train.batch_size=2", f"model.dtype={policy}"]
        assert main(argv) == 0
        adapter = load_file(str(tmp_path / policy / "adapter/adapter.safetensors"))
        assert all(value.dtype == np.float32 and np.isfinite(value).all() for value in adapter.values())
        log = [json.loads(line) for line in (tmp_path / policy / "metrics.jsonl").read_text().splitlines()]
        losses[policy] = [record["loss"] for record in log]
    # Same data and seed: the bfloat16 policies compute the float32 loss to bfloat16 precision.
    for policy in ("bfloat16", "mixed_bfloat16"):
        np.testing.assert_allclose(losses[policy], losses["float32"], rtol=3e-2)
        assert losses[policy] != losses["float32"]  # the policy really changed the computation


def test_unknown_dtype_is_a_one_line_error(tiny_preset, tmp_path, capsys):
    argv = ["train", str(ROOT / "configs/quickstart.yaml"), f"model.preset={tiny_preset}", f"output_dir={tmp_path}",
            "model.dtype=fp8"]
    assert main(argv) == 2
    assert "model.dtype: 'fp8' is not one of" in capsys.readouterr().err
    assert not (tmp_path / "quickstart").exists()
