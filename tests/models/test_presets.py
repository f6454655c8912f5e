"""The one preset resolver: local sources, and remote hubs that cannot be reached."""

import os
import socket
import subprocess
import sys

import pytest

from kerasft import cli
from kerasft.config import ModelConfig
from kerasft.errors import KerasftError
from kerasft.models import presets


@pytest.fixture
def unreachable_hubs(monkeypatch):
    """Points every hub at a loopback port nothing listens on (refused at once), as an offline
    machine's failed name lookup is."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    monkeypatch.setattr(presets, "REMOTE_HOSTS", {scheme: ("127.0.0.1", port) for scheme in presets.REMOTE_HOSTS})


@pytest.mark.parametrize("preset", ["hf://google/gemma-3-270m", "kaggle://keras/gemma3/keras/gemma3_270m"])
def test_unreachable_hub_is_one_line_naming_the_url(unreachable_hubs, tmp_path, preset):
    with pytest.raises(KerasftError) as err:
        presets.resolve_preset(preset, tmp_path)
    message = str(err.value)
    assert message.startswith(f"{preset}: cannot reach 127.0.0.1")
    assert "pass the local folder" in message and "\n" not in message


def test_tokenizer_of_unreachable_hub_keeps_the_url(unreachable_hubs):
    with pytest.raises(KerasftError, match=r"^hf://google/gemma-3-270m: cannot reach"):
        presets.load_tokenizer(ModelConfig(preset="hf://google/gemma-3-270m"))


@pytest.mark.parametrize("command", [["data", "inspect"], ["train"], ["eval"]])
def test_cli_commands_share_the_resolver(unreachable_hubs, tmp_path, capsys, command):
    # `data inspect` reads only the tokenizer, `train` and `eval` load the model: the same one line.
    argv = [*command, "configs/quickstart.yaml", "model.preset=hf://google/gemma-3-270m", f"output_dir={tmp_path}"]
    if command == ["eval"]:
        argv.append("eval.source=hf://google/gemma-3-270m")
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kerasft: error: hf://google/gemma-3-270m: cannot reach"), err
    assert not (tmp_path / "quickstart").exists()  # nothing written for a run that could not start


def test_local_sources(tiny_preset, tmp_path):
    assert presets.resolve_preset(str(tiny_preset), tmp_path) == str(tiny_preset.resolve())
    with pytest.raises(KerasftError, match="no such model folder"):
        presets.resolve_preset(str(tmp_path / "missing"), tmp_path)
    with pytest.raises(KerasftError, match="GGUF file not found"):
        presets.resolve_preset(str(tmp_path / "missing.gguf"), tmp_path)
    (tmp_path / "empty").mkdir()
    with pytest.raises(KerasftError, match="not a model folder"):
        presets.resolve_preset(str(tmp_path / "empty"), tmp_path)


def test_tokenizer_without_the_model(tiny_preset):
    tokenizer = presets.load_tokenizer(ModelConfig(preset=str(tiny_preset)))
    assert isinstance(tokenizer, presets.SentencePieceFile)
    assert tokenizer.proto == (tiny_preset / "assets" / "tokenizer" / "vocabulary.spm").read_bytes()


def test_model_load_is_quiet(tiny_preset):
    # SentencePiece logs "normalizer.cc(51) LOG(INFO) precompiled_charsmap is empty" for every
    # Gemma tokenizer it builds; a user sees it on every command unless the loader silences it.
    code = ("from kerasft.config import ModelConfig; from kerasft.models.presets import load_model; "
            "from kerasft.data.template import chat_tokens; "
            f"chat_tokens(load_model(ModelConfig(preset={str(tiny_preset)!r})).tokenizer)")
    env = {k: v for k, v in os.environ.items() if k != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "precompiled_charsmap" not in result.stderr
