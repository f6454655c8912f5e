"""Config loading: YAML, base: inheritance, dotted overrides, unknown keys with suggestions."""

import pytest

from kerasft.config import RunConfig, load_config, save_config
from kerasft.errors import KerasftError


def test_defaults_without_file():
    cfg = load_config(None)
    assert cfg == RunConfig()
    assert cfg.lora.targets == ("query", "value")


def test_base_inheritance_and_overrides(tmp_path):
    (tmp_path / "base.yaml").write_text("train:\n  batch_size: 8\n  learning_rate: 1.0e-3\nlora:\n  rank: 4\n")
    (tmp_path / "child.yaml").write_text("base: base.yaml\ntrain:\n  batch_size: 2\nname: child\n")
    cfg = load_config(tmp_path / "child.yaml", ["train.max_steps=5", "lora.targets=[query,key]", "lora.alpha=8"])
    assert cfg.name == "child"
    assert cfg.train.batch_size == 2  # child wins
    assert cfg.train.learning_rate == 1e-3  # inherited
    assert cfg.lora.rank == 4
    assert cfg.train.max_steps == 5
    assert cfg.lora.targets == ("query", "key")
    assert cfg.lora.alpha == 8.0


def test_unknown_key_suggests_closest(tmp_path):
    (tmp_path / "c.yaml").write_text("train:\n  learning_rat: 0.1\n")
    with pytest.raises(KerasftError, match=r"unknown key train\.learning_rat; did you mean train\.learning_rate\?"):
        load_config(tmp_path / "c.yaml")


def test_unknown_override_and_bad_types(tmp_path):
    with pytest.raises(KerasftError, match="did you mean lora.rank"):
        load_config(None, ["lora.rnak=4"])
    with pytest.raises(KerasftError, match="train.batch_size must be a whole number"):
        load_config(None, ["train.batch_size=2.5"])
    with pytest.raises(KerasftError, match="expected key=value"):
        load_config(None, ["train.batch_size"])
    with pytest.raises(KerasftError, match=r"train\.epochs: must be above 0 \(or set train\.max_steps\), got 0"):
        load_config(None, ["train.epochs=0"])
    assert load_config(None, ["train.epochs=0", "train.max_steps=4"]).train.max_steps == 4
    with pytest.raises(KerasftError, match="train.max_steps: must be 0 .off. or more, got -1"):
        load_config(None, ["train.max_steps=-1"])
    with pytest.raises(KerasftError, match="train.warmup_ratio: must be < 1, got 1.5"):
        load_config(None, ["train.warmup_ratio=1.5"])


def test_invalid_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  batch_size: [1, 2\n")
    with pytest.raises(KerasftError, match=r"bad\.yaml: line \d+"):
        load_config(path)


def test_missing_file_and_base_loop(tmp_path):
    with pytest.raises(KerasftError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(KerasftError, match="loops back"):
        load_config(tmp_path / "a.yaml")


def test_saved_config_round_trips(tmp_path):
    cfg = load_config(None, ["name=x", "lora.targets=[query,value,key]", "train.epochs=2"])
    save_config(cfg, tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == cfg


@pytest.mark.parametrize("override, message", [
    ("lora.rank=0", "lora.rank: must be a whole number > 0, got 0"),
    ("lora.rank=-2", "lora.rank: must be a whole number > 0, got -2"),
    ("lora.alpha=0", "lora.alpha: must be > 0, got 0.0"),
    ("lora.alpha=-8", "lora.alpha: must be > 0, got -8.0"),
    ("lora.targets=[]", "lora.targets: must name at least one of query, key, value"),
    ("lora.targets=[query,qkv]", "lora.targets: unknown target qkv; choose from query, key, value"),
    ("lora.dropout=1", "lora.dropout: must be < 1, got 1.0"),
    ("lora.dropout=-0.1", "lora.dropout: must be >= 0, got -0.1"),
    ("train.learning_rate=-1", "train.learning_rate: must be > 0, got -1.0"),
    ("train.learning_rate=0", "train.learning_rate: must be > 0, got 0.0"),
    ("train.learning_rate=.nan", "train.learning_rate: must be a finite number, got nan"),
    ("train.weight_decay=-0.01", "train.weight_decay: must be >= 0, got -0.01"),
    ("train.warmup_ratio=1", "train.warmup_ratio: must be < 1, got 1.0"),
    ("train.warmup_ratio=-0.1", "train.warmup_ratio: must be >= 0, got -0.1"),
    ("train.max_grad_norm=-1", "train.max_grad_norm: must be >= 0, got -1.0"),
    ("train.batch_size=0", "train.batch_size: must be at least 1, got 0"),
    ("train.grad_accum=0", "train.grad_accum: must be at least 1, got 0"),
])
def test_bad_lora_and_optimizer_numbers_fail_in_one_line_naming_the_key(override, message):
    with pytest.raises(KerasftError) as err:
        load_config(None, [override])
    text = str(err.value)
    assert "\n" not in text
    assert text.startswith(f"defaults: {message}"), text


def test_lora_and_optimizer_bounds_that_are_allowed():
    cfg = load_config(None, ["lora.rank=1", "lora.alpha=0.5", "lora.dropout=0", "lora.targets=[ffw_linear]",
                             "train.learning_rate=1e-6", "train.weight_decay=0", "train.warmup_ratio=0",
                             "train.max_grad_norm=0"])
    assert (cfg.lora.rank, cfg.lora.targets, cfg.train.max_grad_norm) == (1, ("ffw_linear",), 0.0)


def test_config_checks_lora_targets_without_keras_or_jax():
    import subprocess
    import sys

    code = ("import sys, kerasft.config as c; c.LoraConfig(targets=('query',)); "
            "assert not {'keras', 'jax', 'tensorflow'} & set(sys.modules), sorted(sys.modules)")
    subprocess.run([sys.executable, "-c", code], check=True)
