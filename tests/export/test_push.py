"""`kerasft push`: the file list, the card's metadata and the commit operations of an export,
checked without the Hub; offline it fails with one line. What is not exercised here (a real upload)
is stated in README.md (Export and serving)."""

import json

import pytest

from kerasft.cli import main
from kerasft.errors import KerasftError
from kerasft.export.push import commit_operations, push, push_plan


@pytest.fixture(scope="module")
def export_dir(tiny_preset, tmp_path_factory):
    out = tmp_path_factory.mktemp("push") / "export_hf"
    assert main(["export", str(tiny_preset), str(out), "--no-verify"]) == 0
    return out


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records the calls push makes."""

    def __init__(self):
        self.calls = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", repo_id, [op.path_in_repo for op in operations], kwargs))
        return type("Info", (), {"commit_url": f"https://huggingface.co/{repo_id}/commit/abc"})()


def test_plan_lists_files_and_card_metadata(export_dir, capsys):
    plan = push_plan(export_dir, "me/tiny-gemma")
    paths = [f["path"] for f in plan["files"]]
    assert {"README.md", "config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json"} <= set(paths)
    assert plan["private"] is True and plan["metadata"]["license"] == "gemma"
    assert plan["metadata"]["library_name"] == "transformers" and "kerasft" in plan["metadata"]["tags"]
    sizes = {f["path"]: f["bytes"] for f in plan["files"]}
    assert sizes["model.safetensors"] == (export_dir / "model.safetensors").stat().st_size
    ops = commit_operations(export_dir, plan)
    assert [op.path_in_repo for op in ops] == paths
    assert main(["push", str(export_dir), "me/tiny-gemma", "--dry-run", "--public"]) == 0
    assert json.loads(capsys.readouterr().out)["private"] is False


def test_push_creates_a_private_repo_and_one_commit(export_dir):
    api = RecordingApi()
    result = push(export_dir, "me/tiny-gemma", api=api)
    (name, repo, kwargs), (commit, _, files, commit_kwargs) = api.calls
    assert name == "create_repo" and kwargs == {"private": True, "exist_ok": True, "repo_type": "model"}
    assert commit == "create_commit" and files == [f["path"] for f in result["files"]]
    assert commit_kwargs["commit_message"] == "Upload export_hf exported by kerasft"
    assert result["commit_url"] == "https://huggingface.co/me/tiny-gemma/commit/abc"


def test_bad_inputs_and_offline_get_one_line(export_dir, tmp_path, monkeypatch, capsys):
    with pytest.raises(KerasftError, match="not a Hub repository id"):
        push_plan(export_dir, "no-owner")
    (tmp_path / "bare").mkdir()
    (tmp_path / "bare" / "w.bin").write_bytes(b"x")
    with pytest.raises(KerasftError, match="no model card"):
        push_plan(tmp_path / "bare", "me/x")
    (tmp_path / "bare" / "README.md").write_text("# no metadata\n")
    with pytest.raises(KerasftError, match="README.md: line 1: the model card has no YAML metadata block"):
        push_plan(tmp_path / "bare", "me/x")
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))  # no saved login
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "hf-home" / "token"))
    assert main(["push", str(export_dir), "me/x"]) == 2
    assert "no Hugging Face token: set HF_TOKEN" in capsys.readouterr().err
    # The tests run offline (HF_HUB_OFFLINE=1): the real client refuses, in one line.
    monkeypatch.setenv("HF_TOKEN", "hf_secret_value")
    assert main(["push", str(export_dir), "me/x"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("kerasft: error: cannot push me/x:")
    assert "hf_secret_value" not in err
