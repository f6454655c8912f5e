"""Lineage (lineage.json, the card's reproducibility section, `kerasft reproduce --check`) and
notifications at the end of a run (a webhook on a loopback HTTP server, email through a loopback
aiosmtpd server)."""

import json
import shutil
import threading
from email import message_from_bytes, policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from kerasft import lineage
from kerasft.cli import main
from kerasft.config import load_config
from kerasft.errors import KerasftError
from kerasft.notify import check_targets, notify

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def webhook():
    """A loopback HTTP server that records the JSON bodies POSTed to it; yields (url, bodies)."""
    bodies = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802 (http.server's name)
            length = int(self.headers["Content-Length"])
            bodies.append({"path": self.path, "type": self.headers["Content-Type"],
                           "json": json.loads(self.rfile.read(length))})
            self.send_response(204)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_port}/hook?token=s3cret", bodies
    server.shutdown()
    server.server_close()


def _closed_port_url() -> str:
    import socket

    with socket.socket() as sock:  # bound, then closed: nothing listens there
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/gone"


def test_notify_targets_are_checked_at_config_load():
    with pytest.raises(KerasftError, match=r"train.notify\[1\]: 'ftp://x' is neither"):
        load_config(ROOT / "configs/quickstart.yaml", ["train.notify=[https://example.org/h, ftp://x]"])
    with pytest.raises(KerasftError, match=r"train.notify\[0\]: 'mailto:nobody'"):
        check_targets(["mailto:nobody"])
    assert load_config(ROOT / "configs/quickstart.yaml", ["train.notify=[mailto:a@b.org]"]).train.notify == ("mailto:a@b.org",)


def test_webhook_gets_the_summary_and_a_dead_one_only_warns(webhook, capsys):
    url, bodies = webhook
    dead = _closed_port_url()
    failed = notify([url, dead], "finished", {"run": "r", "summary": {"train": {"steps": 3}}})
    assert failed == [dead]
    assert bodies == [{"path": "/hook?token=s3cret", "type": "application/json",
                       "json": {"event": "finished", "run": "r", "summary": {"train": {"steps": 3}}}}]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"kerasft: warning: notification to {dead} failed")


def test_email_through_smtp_with_login_from_the_environment(monkeypatch, capsys):
    from aiosmtpd.controller import Controller
    from aiosmtpd.smtp import AuthResult

    received, logins = [], []

    class Handler:
        async def handle_RCPT(self, server, session, envelope, address, rcpt_options):  # noqa: N802
            if address.startswith("nobody@"):
                return "550 no such mailbox"
            envelope.rcpt_tos.append(address)
            return "250 OK"

        async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's name)
            received.append((envelope.mail_from, envelope.rcpt_tos, envelope.content))
            return "250 OK"

    def authenticator(server, session, envelope, mechanism, auth_data):
        logins.append((auth_data.login, auth_data.password))
        return AuthResult(success=auth_data.password == b"pw")

    port = int(_closed_port_url().split(":")[2].split("/")[0])  # a free port
    controller = Controller(Handler(), hostname="127.0.0.1", port=port, authenticator=authenticator,
                            auth_require_tls=False)
    controller.start()
    try:
        for key, value in {"HOST": "127.0.0.1", "PORT": str(port), "USER": "kf", "PASSWORD": "pw",
                           "SECURITY": "none", "FROM": "runs@example.org"}.items():
            monkeypatch.setenv(f"KERASFT_SMTP_{key}", value)
        payload = {"run": "qa", "run_dir": "runs/qa", "summary": {"eval": {"tuned": {"f1": 70.5}}}}
        assert notify(["mailto:team@example.org"], "finished", payload) == []
        assert logins == [(b"kf", b"pw")]
        (sender, recipients, content), = received
        mail = message_from_bytes(content, policy=policy.default)
        assert sender == "runs@example.org" and recipients == ["team@example.org"]
        assert mail["Subject"] == "kerasft: run qa finished"
        parts = list(mail.iter_parts())
        assert "tuned: f1 70.5" in parts[0].get_content()
        assert json.loads(parts[1].get_content()) == {"event": "finished", **payload}
        # A refused recipient warns on one line and does not raise.
        assert notify(["mailto:nobody@example.org"], "failed", payload) == ["mailto:nobody@example.org"]
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "notification to mailto:nobody@example.org failed" in err[0]
    finally:
        controller.stop()
    monkeypatch.delenv("KERASFT_SMTP_HOST")
    assert notify(["mailto:team@example.org"], "finished", payload) == ["mailto:team@example.org"]
    assert "KERASFT_SMTP_HOST is not set" in capsys.readouterr().err


def test_differences_and_comparison_name_what_changed(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "response": "b"}\n')
    config = {"data": {"train": str(data), "eval": "hf:squad_es@validation"}, "train": {"seed": 3},
              "data_split": {"seed": 5}}
    first = lineage.collect(config, tmp_path / "none")
    assert first["data_files"]["data.train"]["sha256"] == lineage.sha256_file(data)
    assert first["data_files"]["data.eval"] == {"source": "hf:squad_es@validation", "sha256": None}
    assert first["seeds"] == {"train.seed": 3, "data_split.seed": 5}
    assert first["packages"]["keras"] and first["kerasft"]["version"]
    # (a developer's checkout may have uncommitted changes: that line is not what is tested here)
    def differences(recorded, current):
        return [line for line in lineage.differences(recorded, current) if not line.startswith("kerasft source")]

    assert differences(first, lineage.collect(config, tmp_path / "none")) == []
    data.write_text('{"prompt": "a", "response": "c"}\n')
    changed = differences({**first, "packages": {**first["packages"], "keras": "0.0.1"}},
                          lineage.collect(config, tmp_path / "none"))
    assert changed[0].startswith("package keras: recorded 0.0.1, now ")
    assert changed[1].startswith(f"data.train ({data.resolve()}): sha256 recorded {first['data_files']['data.train']['sha256']}")

    # compare_runs: measured values (tokens/s, seconds) may differ, nothing else may.
    old, new = tmp_path / "old", tmp_path / "new"
    for folder, loss, rate in ((old, 1.5, 100.0), (new, 1.5, 180.0)):
        (folder / "adapter").mkdir(parents=True)
        (folder / "adapter" / "adapter.safetensors").write_bytes(b"weights")
        (folder / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": loss, "tokens_per_second": rate}) + "\n")
        (folder / "eval.json").write_text(json.dumps({"f1": 50.0, "latency_seconds": rate, "model": f"p + {folder}/adapter",
                                                      "examples": [{"prediction": "Ebro"}]}))
    assert lineage.compare_runs(old, new) == []
    (new / "eval.json").write_text(json.dumps({"f1": 50.0, "model": f"p + {new}/adapter", "examples": [{"prediction": "el Ebro"}]}))
    (new / "adapter" / "adapter.safetensors").write_bytes(b"weightz")
    assert lineage.compare_runs(old, new) == ["eval.json: examples[0].prediction: recorded 'Ebro', rerun 'el Ebro'",
                                              "adapter/adapter.safetensors: the rerun's bytes differ"]


def test_run_records_lineage_notifies_and_reproduces_exactly(tiny_preset, tmp_path, webhook, monkeypatch, capsys):
    url, bodies = webhook
    monkeypatch.chdir(ROOT)
    train = tmp_path / "train.json"
    shutil.copy(ROOT / "data/qa_es/train.json", train)
    run_dir = tmp_path / "runs" / "t"
    args = ["run", str(ROOT / "configs/quickstart.yaml"), f"model.preset={tiny_preset}", "train.max_steps=2",
            f"data.train={train}", "data.eval_limit=2", "eval.max_new_tokens=2", "eval.compare_base=false",
            "export.enabled=false",
            f"output_dir={tmp_path}/runs", "name=t", f'train.notify=["{url}", "{_closed_port_url()}"]']
    assert main(args) == 0
    record = json.loads((run_dir / "lineage.json").read_text())
    assert record["data_files"]["data.train"]["sha256"] == lineage.sha256_file(train)
    assert set(record["run_files"]) >= {"config.yaml", "data/train.jsonl"} and record["seeds"]["train.seed"] == 0
    assert record["config"]["train"]["max_steps"] == 2
    assert [b["json"]["event"] for b in bodies] == ["finished"]
    assert bodies[0]["json"]["summary"]["train"]["steps"] == 2
    assert "failed" in capsys.readouterr().err  # the dead webhook warned; the run succeeded

    # The card states the lineage.
    from kerasft.export.card import _run_facts  # noqa: PLC2701 (the card's own reader)

    assert "lineage" in _run_facts(run_dir) and _run_facts(run_dir)["lineage"]["kerasft"] == record["kerasft"]

    # Same commit, same machine: every logged value, evaluation and adapter byte repeats.
    assert main(["reproduce", str(run_dir), "--check"]) == 0
    out = capsys.readouterr().out
    assert "reproduced: every logged training value" in out
    assert (tmp_path / "runs" / "t-reproduce" / "adapter" / "adapter.safetensors").is_file()
    assert [b["json"]["event"] for b in bodies] == ["finished", "finished"]

    # A changed data file: --check refuses before running, naming the key and the file.
    train.write_text(train.read_text() + "\n")
    assert main(["reproduce", str(run_dir), "--check", "--out", str(tmp_path / "again")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("kerasft: error: ") and f"data.train ({train.resolve()}): sha256 recorded" in err
    assert not (tmp_path / "again").exists()


def test_a_failed_run_notifies_failed(tiny_preset, tmp_path, webhook, monkeypatch, capsys):
    import kerasft.workflow as workflow

    url, bodies = webhook
    monkeypatch.chdir(ROOT)

    def broken(*args, **kwargs):
        raise KerasftError("disk full")

    monkeypatch.setattr(workflow, "load_model", broken)
    assert main(["run", str(ROOT / "configs/quickstart.yaml"), f"model.preset={tiny_preset}", f"output_dir={tmp_path}",
                 "name=f", f'train.notify=["{url}"]']) == 2
    assert [b["json"]["event"] for b in bodies] == ["failed"] and bodies[0]["json"]["error"] == "disk full"
    assert (tmp_path / "f" / "FAILED").is_file() and (tmp_path / "f" / "lineage.json").is_file()
