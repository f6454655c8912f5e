"""Where a run came from: the kerasft version and git commit, the versions of the packages that
decide its numbers, the machine, the sha256 of every data file, the resolved config and its seeds.

`kerasft run` writes this as RUN_DIR/lineage.json before training starts; the model card and
`kerasft reproduce` read it. Stdlib only: the CLI, the studio and the card read it without keras.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

from kerasft import __version__
from kerasft.errors import KerasftError

# The packages whose versions can change a run's numbers (kernels, compilers, tokenisers,
# optimisers, checkpoint formats) or its exports' readers.
KEY_PACKAGES = ("keras", "keras-hub", "jax", "jaxlib", "numpy", "optax", "orbax-checkpoint", "tensorflow",
                "sentencepiece", "safetensors", "gguf", "transformers", "torch", "peft")

# Words in the names of values that measure the machine, not the run (tokens/s, wall time,
# memory): a rerun on the same commit and machine kind must repeat every other value exactly.
MEASURED = ("second", "per_s", "latency", "time", "memory", "rss", "bytes", "eta", "ttft", "throughput")


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def source_commit(package_dir: Path | None = None) -> dict:
    """The git commit of the kerasft source tree and whether it had uncommitted changes to
    tracked files; {"commit": None} when kerasft is not running from a git checkout."""
    package_dir = package_dir or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "-C", str(package_dir), "rev-parse", "HEAD"], capture_output=True,
                                text=True, timeout=10)
        if commit.returncode != 0:
            return {"commit": None}
        status = subprocess.run(["git", "-C", str(package_dir), "status", "--porcelain", "--untracked-files=no",
                                 "--", "."], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return {"commit": None}
    return {"commit": commit.stdout.strip(), "dirty": bool(status.stdout.strip())}


def package_versions(names=KEY_PACKAGES) -> dict:
    """Installed version of each named distribution (None where it is not installed)."""
    versions = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def machine() -> dict:
    """The machine kind: OS, CPU architecture and count, and the JAX devices if JAX is loaded."""
    info = {"python": platform.python_version(), "system": platform.system(), "machine": platform.machine(),
            "processor": _cpu_model(), "cpu_count": os.cpu_count()}
    jax = sys.modules.get("jax")  # never imported here: only reported when the run loaded it
    if jax is not None:
        try:
            devices = jax.devices()
            info["devices"] = {"platform": devices[0].platform, "kind": devices[0].device_kind, "count": len(devices)}
        except RuntimeError:
            pass
    return info


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def data_files(data_config: dict) -> dict:
    """sha256 of each local file the data config reads (train, validation, eval, the synonym
    table); sources that are not local files (hf:, tfds:) are listed by name with no hash."""
    files = {}
    sources = {key: data_config.get(key) for key in ("train", "validation", "eval")}
    sources["augment.synonyms"] = (data_config.get("augment") or {}).get("synonyms")
    for key, source in sources.items():
        if not source:
            continue
        path = Path(str(source))
        if path.is_file():
            files[f"data.{key}"] = {"path": str(path.resolve()), "sha256": sha256_file(path)}
        else:
            files[f"data.{key}"] = {"source": str(source), "sha256": None}
    return files


def seeds(config: dict, prefix: str = "") -> dict:
    """Every `seed` key of the resolved config, by dotted name."""
    found = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            found.update(seeds(value, name + "."))
        elif key == "seed":
            found[name] = value
    return found


def collect(config: dict, run_dir: str | Path) -> dict:
    """The lineage record of a run: `config` is the resolved config as a dict (config_to_dict),
    `run_dir` the run folder whose config.yaml and data/*.jsonl are already written."""
    run_dir = Path(run_dir)
    written = {str(path.relative_to(run_dir)): sha256_file(path)
               for path in sorted([run_dir / "config.yaml", *(run_dir / "data").glob("*")]) if path.is_file()}
    return {
        "kerasft": {"version": __version__, **source_commit()},
        "packages": package_versions(),
        "machine": machine(),
        "data_files": data_files(config.get("data") or {}),
        "run_files": written,
        "seeds": seeds(config),
        "config": config,
        "command": sys.argv[1:] if Path(sys.argv[0]).name in ("kerasft", "__main__.py") else None,
    }


def read(path: str | Path) -> dict:
    """A run's lineage.json; a one-line error when it is missing or not JSON."""
    path = Path(path)
    if not path.is_file():
        raise KerasftError(f"{path}: no lineage record (runs made before kerasft recorded lineage cannot be checked)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise KerasftError(f"{path}: line {err.lineno}: invalid JSON ({err.msg})") from None


def differences(recorded: dict, current: dict) -> list[str]:
    """What differs between a recorded lineage and the present one, one line each: the commit,
    uncommitted changes, package versions, the machine kind and data-file hashes. Empty when a
    rerun here should repeat the run's numbers exactly."""
    lines = []
    old, new = recorded.get("kerasft", {}), current.get("kerasft", {})
    if old.get("commit") != new.get("commit"):
        lines.append(f"kerasft commit: recorded {old.get('commit')}, now {new.get('commit')}")
    if new.get("dirty"):
        lines.append("kerasft source: has uncommitted changes now")
    for name in sorted(set(recorded.get("packages", {})) | set(current.get("packages", {}))):
        was, now = recorded.get("packages", {}).get(name), current.get("packages", {}).get(name)
        if was != now:
            lines.append(f"package {name}: recorded {was}, now {now}")
    for key in ("machine", "processor", "cpu_count", "devices"):
        was, now = recorded.get("machine", {}).get(key), current.get("machine", {}).get(key)
        if was != now:
            lines.append(f"machine {key}: recorded {was}, now {now}")
    for key, entry in recorded.get("data_files", {}).items():
        now = current.get("data_files", {}).get(key, {})
        if entry.get("sha256") != now.get("sha256"):
            where = entry.get("path") or entry.get("source")
            lines.append(f"{key} ({where}): sha256 recorded {entry.get('sha256')}, now {now.get('sha256')}")
    return lines


def _comparable(value, path: str = ""):
    """(dotted key, value) pairs of a JSON value, without the machine-measured ones."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not any(word in key.lower() for word in MEASURED):
                yield from _comparable(item, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _comparable(item, f"{path}[{index}]")
    else:
        yield path, value


def compare_runs(recorded: str | Path, rerun: str | Path) -> list[str]:
    """Where a rerun's results differ from the recorded run's: every logged training value
    (metrics.jsonl), each evaluation (eval_base.json, eval.json: metrics and every prediction)
    and the trained adapter's bytes, except values that measure the machine (MEASURED). One line
    per difference, at most 20; empty when the rerun repeated the run."""
    recorded, rerun = Path(recorded), Path(rerun)
    lines = []
    for name in ("metrics.jsonl", "eval_base.json", "eval.json"):
        old, new = recorded / name, rerun / name
        if not old.is_file():
            continue
        if not new.is_file():
            lines.append(f"{name}: recorded, but the rerun wrote none")
            continue
        if name.endswith(".jsonl"):
            old_values = [json.loads(line) for line in old.read_text(encoding="utf-8").splitlines() if line.strip()]
            new_values = [json.loads(line) for line in new.read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            old_values = json.loads(old.read_text(encoding="utf-8"))
            new_values = json.loads(new.read_text(encoding="utf-8"))
        # Paths inside the run dir name each run's own folder.
        old_items = {k: v.replace(str(recorded), "RUN_DIR") if isinstance(v, str) else v
                     for k, v in _comparable(old_values)}
        new_items = {k: v.replace(str(rerun), "RUN_DIR") if isinstance(v, str) else v
                     for k, v in _comparable(new_values)}
        for key in sorted(set(old_items) | set(new_items)):
            if old_items.get(key, "<missing>") != new_items.get(key, "<missing>"):
                lines.append(f"{name}: {key}: recorded {old_items.get(key, '<missing>')!r}, "
                             f"rerun {new_items.get(key, '<missing>')!r}")
    old_files = read(recorded / "lineage.json").get("run_files", {}) if (recorded / "lineage.json").is_file() else {}
    for name, digest in old_files.items():
        if name.startswith("data/") and (not (rerun / name).is_file() or sha256_file(rerun / name) != digest):
            lines.append(f"{name}: the rerun's examples differ")
    old_adapter, new_adapter = sorted((recorded / "adapter").glob("*")), sorted((rerun / "adapter").glob("*"))
    for old in old_adapter:
        new = rerun / "adapter" / old.name
        if old.is_file() and (not new.is_file() or sha256_file(old) != sha256_file(new)):
            lines.append(f"adapter/{old.name}: the rerun's bytes differ")
    if old_adapter and not new_adapter:
        lines.append("adapter: recorded, but the rerun saved none")
    return lines[:20] + ([f"... and {len(lines) - 20} more"] if len(lines) > 20 else [])
