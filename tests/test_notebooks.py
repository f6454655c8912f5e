"""The end-to-end notebooks (notebooks/*.ipynb), executed top to bottom with nbclient.

Each notebook's first code cell is tagged `parameters`; the test rewrites its values
(papermill-style, with nbformat only) to the tiny Gemma 3 preset and a few steps, then runs every
cell in a kernel of this Python (the .venv's), so a notebook that breaks fails the suite. Kaggle-
and Colab-only cells are guarded by their platform's environment variable and by SKIP_INSTALL.
"""

from __future__ import annotations

import json
import os
import re
import socket
import sys
from pathlib import Path

import nbformat
import pytest

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = ROOT / "notebooks"
NAMES = ("local", "colab", "kaggle_tpu")
CELL_TIMEOUT_S = 900


def _parameters_cell(nb):
    tagged = [cell for cell in nb.cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell must be tagged `parameters`"
    code_cells = [cell for cell in nb.cells if cell.cell_type == "code"]
    assert code_cells[0] is tagged[0], "the parameters cell must be the first code cell"
    return tagged[0]


def set_parameters(nb, values: dict) -> None:
    """Replaces `NAME = ...` lines of the parameters cell; every name must be there exactly once."""
    cell = _parameters_cell(nb)
    source = cell.source
    for name, value in values.items():
        pattern = re.compile(rf"^{name} = .*?(?=  # |$)", re.MULTILINE)
        source, count = pattern.subn(lambda _: f"{name} = {value!r}", source)
        assert count == 1, f"parameter {name} is not (or more than once) in the parameters cell"
    cell.source = source


def _kernel_manager(tmp_path: Path):
    """A kernel manager whose kernel is this interpreter, whatever kernelspecs the machine has."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec_dir = tmp_path / "kernels" / "kerasft-test"
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "kerasft test", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec))
    specs = KernelSpecManager(kernel_dirs=[str(tmp_path / "kernels")], ensure_native_kernel=False)
    return KernelManager(kernel_name="kerasft-test", kernel_spec_manager=specs)


def execute(nb, tmp_path: Path, cwd: Path):
    """Runs every cell; raises nbclient's CellExecutionError at the first failing one."""
    from nbclient import NotebookClient

    kernel_env = dict(os.environ)
    # `kerasft` (the console script) next to this interpreter, as in an activated venv.
    kernel_env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{kernel_env.get('PATH', '')}"
    for name in ("KAGGLE_KERNEL_RUN_TYPE", "COLAB_RELEASE_TAG"):  # never look like a platform here
        kernel_env.pop(name, None)
    client = NotebookClient(nb, km=_kernel_manager(tmp_path), timeout=CELL_TIMEOUT_S,
                            resources={"metadata": {"path": str(cwd)}})
    client.execute(env=kernel_env)
    return nb


def _outputs_text(nb) -> str:
    parts = []
    for cell in nb.cells:
        for output in cell.get("outputs", []):
            parts.append(output.get("text", "") if output.output_type == "stream"
                         else str(output.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.parametrize("name", NAMES)
def test_notebook_is_stored_clean(name):
    """Notebooks are committed without outputs, with a tagged parameters cell first."""
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    nbformat.validate(nb)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not cell.outputs and cell.execution_count is None, f"{name}: stored with outputs"
    source = _parameters_cell(nb).source
    platform = {"local": [], "colab": ["SKIP_INSTALL"], "kaggle_tpu": ["SKIP_INSTALL"]}[name]
    for parameter in ("PRESET", "STEPS", "SEQUENCE_LENGTH", "EVAL_LIMIT", "OUTPUT_DIR", "RUN_NAME", *platform):
        assert re.search(rf"^{parameter} = ", source, re.MULTILINE), f"{name}: no {parameter} parameter"
    # Platform-only cells (pip, secrets, Drive) run only where the platform's variable is set.
    guard = {"local": None, "colab": "COLAB_RELEASE_TAG", "kaggle_tpu": "KAGGLE_KERNEL_RUN_TYPE"}[name]
    installs = [cell.source for cell in nb.cells if cell.cell_type == "code" and "pip" in cell.source]
    assert bool(installs) == bool(guard), f"{name}: pip install cells"
    for install in installs:
        assert guard in install and "SKIP_INSTALL" in install, f"{name}: unguarded install cell"


def test_parameters_are_replaced_and_a_failing_cell_fails(tmp_path):
    """The harness itself: injected values reach the kernel, and an error in any cell raises."""
    from nbclient.exceptions import CellExecutionError

    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_code_cell("STEPS = 0  # a comment\nPRESET = 'embedded'", metadata={"tags": ["parameters"]}),
        nbformat.v4.new_code_cell("import sys\nprint(sys.executable, STEPS, PRESET)"),
    ])
    set_parameters(nb, {"STEPS": 2, "PRESET": "/tmp/tiny"})
    assert nb.cells[0].source == "STEPS = 2  # a comment\nPRESET = '/tmp/tiny'"
    execute(nb, tmp_path / "a", cwd=tmp_path)
    assert nb.cells[1].outputs[0]["text"].split() == [sys.executable, "2", "/tmp/tiny"]
    with pytest.raises(AssertionError, match="MISSING"):
        set_parameters(nb, {"MISSING": 1})
    nb.cells.append(nbformat.v4.new_code_cell("raise RuntimeError('broken cell')"))
    with pytest.raises(CellExecutionError, match="broken cell"):
        execute(nb, tmp_path / "b", cwd=tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("name", NAMES)
def test_notebook_runs_end_to_end(name, tiny_preset, tmp_path):
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    out = tmp_path / "runs"
    values = {"PRESET": str(tiny_preset), "STEPS": 2, "SEQUENCE_LENGTH": 256, "EVAL_LIMIT": 4,
              "OUTPUT_DIR": str(out), "RUN_NAME": "nb"}
    if name != "local":
        values["SKIP_INSTALL"] = True
    if name == "colab":
        values["PORT"] = _free_port()
    set_parameters(nb, values)
    # Jupyter starts a notebook's kernel in the notebook's folder; the notebooks find the repo root.
    execute(nb, tmp_path, cwd=NOTEBOOKS)

    assert all(cell.execution_count for cell in nb.cells if cell.cell_type == "code")
    run_dir = out / "nb"
    for path in ("config.yaml", "adapter/adapter_config.json", "metrics.jsonl", "eval.json", "eval_base.json",
                 "report.md", "export_hf/model.safetensors", "export_hf/README.md"):
        assert (run_dir / path).is_file(), path
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert json.loads((run_dir / "eval.json").read_text())["count"] == 4
    text = _outputs_text(nb)
    assert "answer:" in text and "reference:" in text  # the served model answered
