"""The studio without a browser: upload sanitising (no path traversal), config writing, and a real
`kerasft train` subprocess on the tiny preset, as the Training tab starts it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kerasft.config import load_config
from kerasft.errors import KerasftError
from kerasft.ui.workspace import (
    Job, Workspace, check_run_name, kerasft_argv, latest_checkpoint, nest_values, peek_columns,
    sanitize_filename, training_progress,
)

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("name, expected", [
    ("faq.csv", "faq.csv"),
    ("../../etc/passwd.csv", "passwd.csv"),
    ("..\\..\\windows\\evil.jsonl", "evil.jsonl"),
    ("/abs/path/data.xlsx", "data.xlsx"),
    (".hidden.csv", "hidden.csv"),
    ("Preguntas frecuentes (año 2024).csv", "Preguntas_frecuentes_ano_2024_.csv"),
    ("a;rm -rf ~;.txt", "a_rm_-rf_.txt"),
])
def test_sanitize_filename(name, expected):
    assert sanitize_filename(name) == expected


@pytest.mark.parametrize("name", ["..", "../", ".csv", "noextension", "dir/", "...."])
def test_unusable_names_are_refused(name):
    with pytest.raises(KerasftError):
        sanitize_filename(name)


def test_uploads_stay_inside_the_workspace(tmp_path):
    ws = Workspace(tmp_path / "ws")
    src = tmp_path / "upload.bin"
    src.write_text("pregunta,respuesta\n¿Hola?,Hola.\n", encoding="utf-8")
    first = ws.save_upload(src, "../../../outside.csv")
    second = ws.save_upload(src, "..%2F..%2Foutside.csv")
    third = ws.save_upload(src, "../../../outside.csv")
    for saved in (first, second, third):
        assert saved.parent == ws.root / "uploads"
    assert first.name == "outside.csv" and third.name == "outside-1.csv"
    assert not (tmp_path / "outside.csv").exists()
    assert third.read_bytes() == src.read_bytes()
    assert ws.uploads() == sorted([first, second, third])


def test_upload_type_size_and_empty_checks_write_nothing(tmp_path):
    ws = Workspace(tmp_path / "ws", max_upload_mb=0.001)  # 1 KiB
    src = tmp_path / "x"
    src.write_bytes(b"a,b\n1,2\n")
    for name in ("model.pkl", "script.py", "data.exe", "notes.json.sh"):
        with pytest.raises(KerasftError, match="not accepted"):
            ws.save_upload(src, name)
    big = tmp_path / "big"
    big.write_bytes(b"x" * 2048)
    with pytest.raises(KerasftError, match="over the 0 MB limit|over the"):
        ws.save_upload(big, "big.csv")
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    with pytest.raises(KerasftError, match="empty"):
        ws.save_upload(empty, "empty.csv")
    assert list((ws.root / "uploads").iterdir()) == []


def test_run_names_cannot_leave_the_workspace():
    assert check_run_name("faq-v2.1") == "faq-v2.1"
    for bad in ("", "../x", "a/b", "..", ".hidden", "x" * 65, "a..b"):
        with pytest.raises(KerasftError, match="run name"):
            check_run_name(bad)


def test_write_config_round_trips_through_load_config(tmp_path):
    ws = Workspace(tmp_path / "ws")
    path = ws.write_config({
        "name": "faq", "data.train": str(ROOT / "data/examples/faq_horno.csv"), "data.columns.prompt": "pregunta",
        "data.columns.response": "respuesta", "data.columns.meta": ["categoria", "dificultad"],
        "data.split.ratios": [0.7, 0.2, 0.1], "data.split.stratify": "dificultad", "lora.targets": ("query", "key"),
        "train.learning_rate": 1e-4, "train.max_steps": None,
    })
    assert path == ws.root / "configs" / "faq.yaml"
    cfg = load_config(path)
    assert cfg.run_dir == ws.root / "runs" / "faq"
    assert cfg.data.columns.meta == ("categoria", "dificultad") and cfg.lora.targets == ("query", "key")
    assert cfg.train.learning_rate == 1e-4 and cfg.train.max_steps == 0  # None keeps the default
    assert path.read_text().startswith("# written by kerasft studio; repeat with: kerasft run ")


@pytest.mark.parametrize("values, message", [
    ({"name": "x", "train.batch_size": 0}, "train.batch_size: must be at least 1"),
    ({"name": "x", "data.split.ratios": [0.5, 0.2]}, "must be 2 or 3 non-negative numbers summing to 1"),
    ({"name": "x", "lora.rnak": 4}, "did you mean lora.rank"),
    ({"name": "x", "model.dtype": "int3"}, "model.dtype"),
    ({"name": "../escape"}, "run name"),
])
def test_bad_form_values_leave_nothing_written(tmp_path, values, message):
    ws = Workspace(tmp_path / "ws")
    (ws.root / "configs" / "x.yaml").write_text("name: x\n")  # an earlier good config stays as it was
    with pytest.raises(KerasftError, match=message.replace(".", r"\.")) as err:
        ws.write_config(values)
    assert "\n" not in str(err.value) and ".part" not in str(err.value)
    assert sorted(p.name for p in (ws.root / "configs").iterdir()) == ["x.yaml"]
    assert (ws.root / "configs" / "x.yaml").read_text() == "name: x\n"


def test_nest_values():
    assert nest_values({"a.b": 1, "a.c.d": (2, 3), "e": None, "f": "x"}) == {"a": {"b": 1, "c": {"d": [2, 3]}}, "f": "x"}


def test_peek_columns_uses_kerasft_readers(tmp_path):
    assert peek_columns(ROOT / "data/examples/faq_horno.csv") == ["pregunta", "respuesta", "categoria", "dificultad"]
    semicolon = tmp_path / "s.csv"
    semicolon.write_text("q;a\nx;y\n", encoding="utf-8")
    assert peek_columns(semicolon, delimiter=";") == ["q", "a"]
    jsonl = tmp_path / "d.jsonl"
    jsonl.write_text('{"question": "q", "answer": "a", "tema": "t"}\n', encoding="utf-8")
    assert peek_columns(jsonl) == ["question", "answer", "tema"]
    assert peek_columns(ROOT / "data/examples/corpus_cierzo.txt") == []
    openpyxl = pytest.importorskip("openpyxl")
    book = openpyxl.Workbook()
    book.active.append(["Pregunta ", "Respuesta"])
    book.active.append(["¿Hola?", "Hola."])
    book.save(tmp_path / "faq.xlsx")
    assert peek_columns(tmp_path / "faq.xlsx") == ["Pregunta", "Respuesta"]
    bad = tmp_path / "bad.csv"
    bad.write_bytes("pregunta\n\xf1\n".encode("latin-1"))
    with pytest.raises(KerasftError, match="not valid utf-8"):
        peek_columns(bad)


def test_training_progress_reads_metrics_and_the_printed_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "loss": 5.0 - s}) + "\n" for s in (1, 2, 3))
                                            + '{"step": 4, "lo')  # a run cut mid-write
    log = ("training LoRA r=8 alpha=16 on ['query']: 20 in 20 rows (0 trimmed, 10% padding), 10 steps of batch 2x1\n"
           "  step    3/10  loss 2.0000  lr 1.00e-04  1,234 tok/s  eta 0:12\n")
    progress = training_progress(tmp_path, log)
    assert [r["step"] for r in progress["records"]] == [1, 2, 3]
    assert progress["step"] == 3 and progress["total"] == 10
    assert progress["tokens_per_second"] == 1234.0 and progress["eta"] == "0:12"
    assert training_progress(tmp_path / "none", log.splitlines()[0])["total"] == 10


def test_kerasft_help_does_not_import_gradio():
    code = ("import sys\nfrom kerasft.cli import main\n"
            "try:\n    main(['studio', '--help'])\nexcept SystemExit:\n    pass\n"
            "import kerasft.ui.workspace\n"
            "print([m for m in ('gradio', 'keras', 'jax', 'numpy') if m in sys.modules])\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_studio_auth_must_be_user_colon_password(tmp_path, capsys):
    from kerasft.cli import main

    assert main(["studio", "--workspace", str(tmp_path), "--auth", "nopassword", "--port", "1"]) == 2
    assert "--auth: expected user:password" in capsys.readouterr().err


def test_train_subprocess_on_the_config_the_studio_wrote(tmp_path, tiny_preset):
    """The Training tab's path: a config written from form values, `kerasft train` as a subprocess,
    progress read back from its log and metrics.jsonl, checkpoints for pause/resume."""
    ws = Workspace(tmp_path / "ws")
    data = ws.save_upload(ROOT / "data/examples/faq_horno.csv", "faq.csv")
    path = ws.write_config({
        "name": "tiny", "model.preset": str(tiny_preset), "data.train": str(data), "data.instruction": "",
        "data.columns.prompt": "pregunta", "data.columns.response": "respuesta", "data.split.ratios": [0.8, 0.2],
        "data.sequence_length": 64, "train.max_steps": 3, "train.batch_size": 2, "train.log_every": 1,
        "train.checkpoint_every": 2, "eval.task": "short_answer",
    })
    job = Job(kerasft_argv("train", path), ws.log_path("tiny", "train")).start(cwd=ws.root)
    assert job.command_line == f"kerasft train {path}"
    assert job.wait(timeout=240) == 0, job.log_text()
    run_dir = ws.run_dir("tiny")
    progress = training_progress(run_dir, job.log_text())
    assert progress["step"] == 3 and progress["total"] == 3 and len(progress["records"]) == 3
    assert progress["tokens_per_second"] > 0
    assert "I0000" not in job.log_text() and "step    3/3" in job.log_text()
    assert (run_dir / "adapter" / "adapter_config.json").is_file()
    assert latest_checkpoint(run_dir) == 3
    (run_dir / "checkpoints" / "6.orbax-checkpoint-tmp-123").mkdir()  # a save in progress does not count
    assert latest_checkpoint(run_dir) == 3
    assert load_config(run_dir / "config.yaml").data.columns.prompt == "pregunta"


def test_served_on_loopback_with_login_and_upload_limit(tmp_path):
    """What the server itself enforces: 127.0.0.1 only, gradio's login, the upload size limit."""
    import socket

    httpx = pytest.importorskip("httpx")
    pytest.importorskip("gradio")
    from kerasft.ui.app import launch

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    app = launch(tmp_path / "ws", port=port, auth="ana:s3creto", max_upload_mb=0.01, block=False)
    try:
        assert app.server_name == "127.0.0.1"
        url = f"http://127.0.0.1:{port}"
        small, big = ("small.csv", b"q,a\nx,y\n"), ("big.csv", b"q,a\n" + b"x,y\n" * 4000)
        assert httpx.post(f"{url}/gradio_api/upload", files={"files": small}).status_code == 401
        with httpx.Client(base_url=url) as client:
            assert client.post("/login", data={"username": "ana", "password": "wrong"}).status_code == 400
            assert client.post("/login", data={"username": "ana", "password": "s3creto"}).status_code == 200
            assert client.post("/gradio_api/upload", files={"files": small}).status_code == 200
            assert client.post("/gradio_api/upload", files={"files": big}).status_code == 413
    finally:
        app.close()
