"""The studio without a browser: upload sanitising (no path traversal), config writing, and a real
`kerasft train` subprocess on the tiny preset, as the Training tab starts it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kerasft.config import load_config
from kerasft.errors import KerasftError
from kerasft.paths import RunDir
from kerasft.ui.workspace import (
    Job, Workspace, check_run_name, kerasft_argv, latest_checkpoint, nest_values, peek_columns, read_json,
    sanitize_filename, training_progress,
)

ROOT = Path(__file__).resolve().parents[2]


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


def _write_metrics(run_dir: Path, records: list[dict], tail: str = "") -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    RunDir(run_dir).metrics.write_text("".join(json.dumps(r) + "\n" for r in records) + tail)


def test_training_progress_reads_the_last_metrics_record(tmp_path):
    """Step, total, tokens/s and ETA come from the trainer's per-step records in metrics.jsonl
    (total_steps, tokens_per_second, eta_seconds), never from its printed lines."""
    records = [{"step": s, "loss": 5.0 - s, "total_steps": 10, "tokens_per_second": 1234.5 * (s > 1),
                "eta_seconds": 12.0 * (10 - s)} for s in (1, 2, 3)]
    _write_metrics(tmp_path, records, '{"step": 4, "lo')  # a run cut mid-write
    progress = training_progress(tmp_path)
    assert [r["step"] for r in progress["records"]] == [1, 2, 3]
    assert progress["step"] == 3 and progress["total"] == 10
    assert progress["tokens_per_second"] == 1234.5 and progress["eta_seconds"] == 84.0
    assert training_progress(RunDir(tmp_path))["step"] == 3  # a RunDir works as well as a path
    # No run yet; a log written before these fields existed: nothing is made up.
    assert training_progress(tmp_path / "none") == {"records": [], "step": 0, "total": None,
                                                    "tokens_per_second": None, "eta_seconds": None}
    _write_metrics(tmp_path / "old", [{"step": 1, "loss": 4.0}])
    old = training_progress(tmp_path / "old")
    assert old["step"] == 1 and old["total"] is None and old["tokens_per_second"] is None


def test_training_progress_names_a_corrupt_metrics_line(tmp_path):
    _write_metrics(tmp_path, [{"step": 1, "loss": 4.0}], "not json\n" + json.dumps({"step": 2, "loss": 3.0}) + "\n")
    with pytest.raises(KerasftError, match=r"metrics\.jsonl:2"):
        training_progress(tmp_path)


def test_eta_is_shown_as_a_clock():
    from kerasft.ui.app import _clock

    assert [_clock(s) for s in (0, 59.9, 61, 3599, 3600, 7384)] == ["0:00", "0:59", "1:01", "59:59", "1:00:00",
                                                                    "2:03:04"]


def test_read_json_names_the_bad_file(tmp_path):
    assert read_json(tmp_path / "missing.json") is None
    (tmp_path / "eval.json").write_text('{"f1": 50.0}')
    assert read_json(tmp_path / "eval.json") == {"f1": 50.0}
    (tmp_path / "cut.json").write_text('{"f1": 5')
    with pytest.raises(KerasftError, match=r"cut\.json: not readable as JSON"):
        read_json(tmp_path / "cut.json")
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(KerasftError, match=r"list\.json: expected a JSON object, got list"):
        read_json(tmp_path / "list.json")


def test_eval_views_read_the_run_dirs_json(tmp_path):
    """The Evaluation tab's table, report and worst examples come from eval_base.json, eval.json,
    report.md and report.json, named by RunDir."""
    pytest.importorskip("pandas")
    from kerasft.ui.app import _eval_views

    run = RunDir(tmp_path)
    run.eval_result("base").write_text(json.dumps({"task": "short_answer", "exact_match": 10.0, "count": 5}))
    run.eval_result("tuned").write_text(json.dumps({"task": "short_answer", "exact_match": 62.5, "count": 5}))
    run.report_md.write_text("# Report\n")
    run.report_json.write_text(json.dumps({"worst": [{"prompt": "¿Hola?", "gold": "Hola.", "prediction": "x",
                                                      "score": 0.0}]}))
    table, report_md, worst = _eval_views(run)
    assert table.to_dict("records") == [{"metric": "exact_match", "base": 10.0, "fine-tuned": 62.5}]
    assert report_md == "# Report\n" and worst.to_dict("records")[0]["prompt"] == "¿Hola?"
    run.report_json.write_text("{")
    with pytest.raises(KerasftError, match="report.json"):
        _eval_views(run)


def test_heldout_prompts_come_from_the_run_dirs_data(tmp_path):
    from kerasft.ui.app import _heldout_prompts

    run = RunDir(tmp_path)
    run.data.mkdir()
    (run.data / "validation.jsonl").write_text("".join(json.dumps({"prompt": f"p{i}", "response": "r"}) + "\n"
                                                       for i in range(5)))
    assert _heldout_prompts(run, 3) == []  # no adapter: training has not finished
    run.adapter.mkdir()
    run.adapter_config.write_text("{}")
    assert _heldout_prompts(run, 3) == ["p0", "p1", "p2"]
    (run.data / "test.jsonl").write_text('{"response": "no prompt"}\n')
    with pytest.raises(KerasftError, match=r"test\.jsonl: line 1"):
        _heldout_prompts(run, 3)


def test_plan_badge_from_the_plan_json():
    from kerasft.ui.app import _last_json_object, _plan_badge

    plan = {"fits": False, "usable": 15 * 2**30, "step": {"peak": 20 * 2**30}, "largest_batch": None,
            "tried": [[8, 20 * 2**30], [4, 17 * 2**30], [2, 16 * 2**30]]}
    badge = _plan_badge(plan)
    assert "does not fit" in badge and "kft-nofit" in badge and "peak 20.00 GiB of 15.00 GiB" in badge
    assert "suggested batch size: <b>none</b>" in badge
    assert "suggested batch size: <b>4</b>" in _plan_badge({**plan, "fits": True, "largest_batch": 4})
    with pytest.raises(KerasftError, match="kerasft plan --json: missing or bad key 'usable'"):
        _plan_badge({"fits": True, "step": {"peak": 1}})
    text = 'W0000 some warning\n{"not": "the last"}\n' + json.dumps(plan) + "\n{cut"
    assert _last_json_object(text) == plan and _last_json_object("no json here") is None


def test_form_values_become_the_config(tmp_path):
    """What every whole-form handler writes: split shares and the model choice folded into config
    keys, integer fields as integers (from the config's type hints), lists for multi-selects."""
    from kerasft.ui.app import _Form

    form = _Form(Workspace(tmp_path / "ws"))
    for key in ("name", "train.batch_size", "train.learning_rate", "eval.top_k", "lora.targets", "data.columns.meta"):
        form.fields[key] = object()  # the components; only their order matters here
    values = ["x", 4.0, 2.0, 0.0, ("query",), None, 0.8, 0.2, 0, "embedded", "  gemma3_1b "]
    named = form.config_values(values)
    assert named == {"name": "x", "train.batch_size": 4, "train.learning_rate": 2.0, "eval.top_k": 0,
                     "lora.targets": ["query"], "data.columns.meta": [], "model.preset": "gemma3_1b",
                     "data.split.ratios": [0.8, 0.2]}
    assert type(named["train.batch_size"]) is int and type(named["train.learning_rate"]) is float
    assert form.config_values([*values[:-1], ""])["model.preset"] == "embedded"
    assert form.config_values([*values[:6], 0.7, 0.2, 0.1, "embedded", ""])["data.split.ratios"] == [0.7, 0.2, 0.1]
    name, path = form.save(values)
    assert name == "x" and load_config(path).train.batch_size == 4
    assert "batch_size: 4\n" in path.read_text()


def test_studio_choices_come_from_the_core():
    """The Model tab offers only presets the plan knows offline; the form's lists are the
    config's own (so a value the studio offers always validates)."""
    from kerasft.config import config_to_dict
    from kerasft.models.families import KNOWN_ARCHITECTURES
    from kerasft.ui.app import HARDWARE_PRESETS, PLAN_TARGETS, PRESETS, TASK_PRESETS

    assert set(PRESETS) <= set(KNOWN_ARCHITECTURES)
    assert {p["plan_target"] for p in HARDWARE_PRESETS.values()} <= set(PLAN_TARGETS)
    for preset in (*TASK_PRESETS.values(), *HARDWARE_PRESETS.values()):  # each one-click preset validates
        values = {key: value for key, value in preset.items() if key != "plan_target"}
        cfg = config_to_dict(load_config(None, [f"{key}={json.dumps(value)}" for key, value in values.items()]))
        for key, value in values.items():
            section, field = key.split(".")
            assert cfg[section][field] == value, key


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
    progress read back from metrics.jsonl, checkpoints for pause/resume."""
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
    assert isinstance(run_dir, RunDir)
    progress = training_progress(run_dir)
    assert progress["step"] == 3 and progress["total"] == 3 and len(progress["records"]) == 3
    assert progress["tokens_per_second"] > 0 and progress["eta_seconds"] == 0.0  # the last step: nothing left
    assert progress["records"][0]["total_steps"] == 3
    assert "I0000" not in job.log_text() and "step    3/3" in job.log_text()
    assert run_dir.has_adapter
    assert latest_checkpoint(run_dir) == 3
    (run_dir.checkpoints / "6.orbax-checkpoint-tmp-123").mkdir()  # a save in progress does not count
    assert latest_checkpoint(run_dir) == 3
    assert load_config(run_dir.config).data.columns.prompt == "pregunta"


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


def test_training_tab_offers_the_optimizers_and_schedules(tmp_path):
    """The Training tab's optimizer, AdamW-moments and schedule lists are the config's own, and
    the form writes the choices into the config that `kerasft train` starts with (a combination
    the config refuses leaves nothing written)."""
    from kerasft.config import MOMENT_DTYPES, OPTIMIZERS, SCHEDULES
    from kerasft.ui.app import _Form, build_app

    app = build_app(tmp_path / "ws")
    by_id = {block.elem_id: block for block in app.blocks.values() if getattr(block, "elem_id", None)}
    for elem_id, allowed, default in (("optimizer", OPTIMIZERS, "adamw"), ("moments", MOMENT_DTYPES, "float32"),
                                      ("schedule", SCHEDULES, "cosine")):
        assert [value for _, value in by_id[elem_id].choices] == list(allowed) and by_id[elem_id].value == default

    form = _Form(Workspace(tmp_path / "ws"))
    for key in ("name", "train.optimizer", "train.moments", "train.schedule", "lora.targets", "data.columns.meta"):
        form.fields[key] = object()  # the components; only their order matters here
    _, path = form.save(["opt", "adamw", "int8", "linear", ["query"], [], 1.0, 0.0, 0.0, "embedded", ""])
    train = load_config(path).train
    assert (train.optimizer, train.moments, train.schedule) == ("adamw", "int8", "linear")
    assert "moments: int8\n" in path.read_text()
    with pytest.raises(KerasftError, match="train.moments: int8 moments are adamw's; train.optimizer is lion"):
        form.save(["bad", "lion", "int8", "cosine", ["query"], [], 1.0, 0.0, 0.0, "embedded", ""])
    assert not (tmp_path / "ws" / "configs" / "bad.yaml").exists()


def test_export_tab_offers_every_format_and_gguf_type(tmp_path):
    """The Export tab's lists are the config's own: every format `kerasft export` writes
    (hf, peft, gguf, savedmodel, onnx, torch) and every GGUF type (f32 ... q4_0, q5_0)."""
    from kerasft.config import EXPORT_FORMATS, GGUF_QUANTS, HF_DTYPES
    from kerasft.ui.app import build_app

    app = build_app(tmp_path / "ws")
    by_id = {block.elem_id: block for block in app.blocks.values() if getattr(block, "elem_id", None)}
    for elem_id, allowed, default in (("export_format", EXPORT_FORMATS, "hf"), ("export_quant", GGUF_QUANTS, "f16"),
                                      ("export_dtype", HF_DTYPES, "float32")):
        assert [value for _, value in by_id[elem_id].choices] == list(allowed) and by_id[elem_id].value == default
    assert {"savedmodel", "onnx", "torch"} <= set(EXPORT_FORMATS) and {"q4_0", "q5_0"} <= set(GGUF_QUANTS)


def test_playground_colours_tokens_by_probability(tmp_path):
    """The playground's token view is made from `kerasft generate --json --top-k` records
    (kerasft.evaluate.generate.token_probabilities): shade by probability, escaped text, the
    alternatives in the tooltip."""
    import math

    from kerasft.evaluate.generate import token_probabilities
    from kerasft.ui.app import build_app, token_probabilities_html

    pieces = {7: "<b>", 8: " sí", 9: "no"}
    entries = [{"token": 7, "logprob": 0.0, "top": [(7, 0.0), (9, -30.0)]},
               {"token": 8, "logprob": math.log(0.25), "top": [(9, math.log(0.5)), (8, math.log(0.25))]}]
    records = token_probabilities(entries, lambda ids: "".join(pieces[i] for i in ids), 2)
    page = token_probabilities_html(records)
    assert page.count('class="kerasft-token"') == 2
    assert "&lt;b&gt;" in page and "<b>" not in page.split("</div>")[0]  # token text is escaped
    assert "hsla(120," in page and "hsla(30," in page  # p=1 green, p=0.25 a quarter of the way
    assert 'data-prob="0.2500"' in page and "alternatives: &#x27;no&#x27; 0.500, &#x27; sí&#x27; 0.250" in page
    assert token_probabilities_html([]) == ""
    app = build_app(tmp_path / "ws")
    assert any(getattr(block, "elem_id", None) == "playground_tokens" for block in app.blocks.values())
