"""Shared test setup: JAX backend, a throwaway cache, tiny offline presets, and CI's rule that a
test may not skip."""

import atexit
import os
import shutil
import tempfile

# Must run before anything imports keras: the backend is fixed at import.
os.environ.setdefault("KERAS_BACKEND", "jax")

# Set at import time, before any test module imports kerasft or keras, so
# nothing writes to the home folder (keras creates ~/.keras/keras.json on
# import) and a developer's real cache is never touched. Under pytest-xdist the
# controller makes the folder and removes it at exit; its workers (started
# after this ran, with its environment) share the cache, whose writes are safe
# between processes, so the real 270M is converted once a run. Each process
# has its own KERAS_HOME (keras writes keras.json there on import).
if "PYTEST_XDIST_WORKER" not in os.environ or "KERASFT_TEST_SESSION" not in os.environ:
    os.environ["KERASFT_TEST_SESSION"] = tempfile.mkdtemp(prefix="kerasft-tests-")
    atexit.register(shutil.rmtree, os.environ["KERASFT_TEST_SESSION"], ignore_errors=True)
_SESSION_DIR = os.environ["KERASFT_TEST_SESSION"]
os.environ["KERASFT_CACHE"] = os.path.join(_SESSION_DIR, "cache")
os.environ["KERAS_HOME"] = os.path.join(_SESSION_DIR, "keras-" + os.environ.get("PYTEST_XDIST_WORKER", "main"))
# Tests never use the network; make transformers fail fast instead of trying.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

from kerasft.testing import FAMILIES, LLAMA_FAMILIES, build_tiny_preset, write_tiny_spm  # noqa: E402


@pytest.fixture(scope="session")
def tiny_spm(tmp_path_factory):
    """Path of the tiny SentencePiece model, named `tokenizer.model`.

    It sits alone in its folder, so the folder also loads as a Hugging Face
    tokenizer directory (`GemmaTokenizer.from_pretrained(tiny_spm.parent)`).
    """
    return write_tiny_spm(tmp_path_factory.mktemp("tiny_spm") / "tokenizer.model")


@pytest.fixture(scope="session")
def tiny_presets(tmp_path_factory):
    """Dict family -> Path of a tiny random keras-hub preset directory.

    Families are "gemma", "gemma2" and "gemma3"; pass `str(path)` to
    keras-hub's `from_preset`.
    """
    root = tmp_path_factory.mktemp("tiny_presets")
    return {family: build_tiny_preset(family, root / family) for family in FAMILIES}


@pytest.fixture(scope="session")
def tiny_preset(tiny_presets):
    """Path of the tiny Gemma 3 preset, the default family."""
    return tiny_presets["gemma3"]


@pytest.fixture(scope="session")
def tiny_llama_presets(tmp_path_factory):
    """Dict family -> Path of a tiny random Llama preset: "llama" (TinyLlama-like: SentencePiece,
    untied head) and "llama3" (Llama 3.2-like: byte-level BPE, tied head, rope scaling)."""
    root = tmp_path_factory.mktemp("tiny_llama_presets")
    return {family: build_tiny_preset(family, root / family) for family in LLAMA_FAMILIES}


def pytest_configure(config):
    """JAX on the CPU for every tier but `gpu` (a real GPU): with the gpu-plan extra's CUDA plugin
    installed and no GPU, JAX would otherwise try CUDA in each process and print a plugin error,
    and XLA's CUDA compiler for abstract GPUs registers only this way. JAX_PLATFORMS set by the
    caller wins. Subprocesses (the CLI, scripts) inherit it."""
    import re
    import sys

    if "JAX_PLATFORMS" in os.environ or re.search(r"(?<!not )\bgpu\b", config.option.markexpr or ""):
        return
    os.environ["JAX_PLATFORMS"] = "cpu"
    if "jax" in sys.modules:  # imported above (kerasft.testing); its backends start later
        sys.modules["jax"].config.update("jax_platforms", "cpu")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Under CI=true a skip is a failure: CI installs every extra and Chromium, so a test that
    skips there means a missing install step, not an inapplicable test."""
    outcome = yield
    report = outcome.get_result()
    if os.environ.get("CI") == "true" and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped under CI=true (a missing install step in .ci/run?): {reason}"
