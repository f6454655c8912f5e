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
    with pytest.raises(KerasftError, match="train.warmup_ratio: must be between 0 and 1, got 1.5"):
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
