"""`kerasft push SRC REPO_ID`: uploads an export folder (HF, PEFT, GGUF, SavedModel, ONNX or torch,
with the model card kerasft wrote) to the Hugging Face Hub in one commit, private unless asked.

The token comes from --token, HF_TOKEN or huggingface_hub's own login (`hf auth login`), and is
never printed or written. Everything before the upload (the folder, the card's metadata, the
repository id, the token, the commit's operations) is checked first; `--dry-run` stops there and
prints the plan.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import yaml

from kerasft.errors import KerasftError

HUB = "https://huggingface.co"
# A repository id as the Hub accepts it: owner/name, each of letters, digits, -, _ and . (no
# leading or trailing - or ., no "--" or ".."), at most 96 characters.
REPO_ID = re.compile(r"^(?!.*(--|\.\.))[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?/[A-Za-z0-9](?:[\w.-]{0,94}[A-Za-z0-9])?$")


def card_metadata(folder: Path) -> dict:
    """The YAML front matter of FOLDER/README.md (the model card); a one-line error without one."""
    card = folder / "README.md"
    if not card.is_file():
        raise KerasftError(f"{card}: no model card; push a folder written by `kerasft export` (it writes one)")
    text = card.read_text(encoding="utf-8")
    match = re.match(r"^---\n(.*?)\n---\n", text, flags=re.S)
    if not match:
        raise KerasftError(f"{card}: line 1: the model card has no YAML metadata block (--- ... ---)")
    try:
        metadata = yaml.safe_load(match.group(1))
    except yaml.YAMLError as err:
        line = getattr(getattr(err, "problem_mark", None), "line", 0) + 2
        raise KerasftError(f"{card}: line {line}: invalid YAML metadata") from None
    if not isinstance(metadata, dict) or not metadata.get("license"):
        raise KerasftError(f"{card}: the metadata block needs at least a license")
    return metadata


def push_plan(src: str | Path, repo_id: str, *, private: bool = True) -> dict:
    """What `push` would upload: {"repo_id", "private", "metadata", "files": [{"path", "bytes"}]}."""
    folder = Path(src)
    if not folder.is_dir():
        raise KerasftError(f"{folder}: not an export folder")
    if not REPO_ID.match(repo_id):
        raise KerasftError(f"{repo_id!r}: not a Hub repository id (owner/name of letters, digits, -, _ and .)")
    metadata = card_metadata(folder)
    files = []
    for path in sorted(folder.rglob("*")):
        relative = path.relative_to(folder)
        if path.is_dir() or any(part.startswith(".") for part in relative.parts) or path.name.endswith(".tmp"):
            continue
        files.append({"path": relative.as_posix(), "bytes": path.stat().st_size})
    if not any(f["path"] != "README.md" for f in files):
        raise KerasftError(f"{folder}: holds only a model card; nothing to push")
    return {"repo_id": repo_id, "private": private, "metadata": metadata, "files": files}


def commit_operations(src: str | Path, plan: dict) -> list:
    """huggingface_hub CommitOperationAdd for each planned file."""
    from huggingface_hub import CommitOperationAdd

    return [CommitOperationAdd(path_in_repo=f["path"], path_or_fileobj=str(Path(src) / f["path"])) for f in plan["files"]]


def resolve_token(token: str | None = None) -> str:
    """--token, else HF_TOKEN, else the token of `hf auth login`; a one-line error without any."""
    if token:
        return token
    if os.environ.get("HF_TOKEN"):
        return os.environ["HF_TOKEN"]
    from huggingface_hub import get_token

    found = get_token()
    if not found:
        raise KerasftError("no Hugging Face token: set HF_TOKEN or run `hf auth login` (a token with write access)")
    return found


def push(src: str | Path, repo_id: str, *, private: bool = True, token: str | None = None,
         message: str = "", api=None) -> dict:
    """Creates REPO_ID if needed (private unless `private` is False) and uploads the folder in one
    commit. Returns the plan plus "commit_url". `api` is a huggingface_hub.HfApi (default: one
    for the resolved token)."""
    plan = push_plan(src, repo_id, private=private)
    operations = commit_operations(src, plan)
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=resolve_token(token))
    message = message or f"Upload {Path(src).name} exported by kerasft"
    try:
        api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        info = api.create_commit(repo_id, operations, commit_message=message, repo_type="model")
    except Exception as err:  # huggingface_hub and httpx raise many kinds; each becomes one line
        raise KerasftError(_hub_error(err, repo_id)) from None
    return {**plan, "commit_url": str(getattr(info, "commit_url", info))}


def _hub_error(err: Exception, repo_id: str) -> str:
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(err, OfflineModeIsEnabled):
        return f"cannot push {repo_id}: huggingface_hub is in offline mode (HF_HUB_OFFLINE=1)"
    if isinstance(err, HfHubHTTPError):
        status = getattr(getattr(err, "response", None), "status_code", "")
        first = str(err).splitlines()[0] if str(err) else type(err).__name__
        return f"cannot push {repo_id}: the Hub answered {status}: {first}"
    first = str(err).splitlines()[0] if str(err) else type(err).__name__
    return f"cannot push {repo_id}: {HUB} is unreachable ({type(err).__name__}: {first})"
