"""The kerasft command: instant help, one-line errors, and every shipped config run end to end
on the tiny preset with the same override strings a user types."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kerasft.cli import main
from kerasft.config import load_config

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


def test_help_imports_no_heavy_framework():
    code = (
        "import sys\nfrom kerasft.cli import main\n"
        "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('keras', 'jax', 'tensorflow', 'torch', 'numpy') if m in sys.modules]\n"
        "print(heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_python_dash_m_entry_point():
    result = subprocess.run([sys.executable, "-m", "kerasft", "--version"], capture_output=True, text=True)
    assert result.returncode == 0 and result.stdout.startswith("kerasft ")


def test_score_prints_squad_json(tmp_path, capsys):
    refs = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": "El río Ebro.", "qas": [
        {"id": "a", "question": "¿Qué río?", "answers": [{"text": "Ebro", "answer_start": 7}]},
        {"id": "b", "question": "¿Qué?", "answers": [{"text": "El río Ebro", "answer_start": 0}]}]}]}]}
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    (tmp_path / "preds.json").write_text(json.dumps({"a": "¡el Ebro!", "b": "río"}))
    assert main(["score", str(tmp_path / "preds.json"), str(tmp_path / "refs.json")]) == 0
    scores = json.loads(capsys.readouterr().out)
    assert scores["exact_match"] == 50.0
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3) / 2)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["run", "missing.yaml"], "missing.yaml: config file not found"),
        (["score", "nope.json", "refs.json"], "nope.json"),
        (["run", "configs/quickstart.yaml", "train.batch_sise=2"], "did you mean train.batch_size"),
        (["run", "configs/quickstart.yaml", "data.train=absent.json", "--overwrite", "output_dir=OUT"], "absent.json: data file not found"),
        (["import-gguf", "no.gguf", "OUT/p"], "no.gguf"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    argv = [a.replace("OUT", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("kerasft: error:") and message in err


def test_bad_data_fails_before_anything_is_written(tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{"prompt": \n')
    assert main(["run", str(ROOT / "configs/quickstart.yaml"), f"data.train={bad}", f"output_dir={tmp_path}/runs"]) == 2
    assert "bad.jsonl: line 2: invalid JSON" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_unknown_preset_is_named(tmp_path, capsys):
    assert main(["run", str(ROOT / "configs/quickstart.yaml"), "model.preset=gemma3_270mm", f"output_dir={tmp_path}",
                 f"data.train={ROOT}/data/qa_es/train.json", f"data.eval={ROOT}/data/qa_es/heldout.json"]) == 2
    err = capsys.readouterr().err
    assert "unknown preset 'gemma3_270mm'" in err and "did you mean gemma3_270m" in err
    assert not any((tmp_path / "quickstart").glob("adapter*"))


# The quickstart runs on every family; the other configs differ in data, not in model code. With the
# tiny preset gemma_7b_tpu_v3_8 repeats gemma2_9b_tpu_v3_8's path (bfloat16, mesh model, batch 2 x 4;
# only its sequence length differs), so it runs with -m slow (CI runs both tiers).
REPEATS = {"gemma_7b_tpu_v3_8"}
CONFIG_CASES = [pytest.param(c, f, id=f"{c.stem}-{f}", marks=[pytest.mark.slow] if c.stem in REPEATS else [])
                for c in CONFIGS for f in (["gemma", "gemma2", "gemma3"] if c.stem == "quickstart" else ["gemma3"])]


# What a run dir is used for next (generate, export, eval re-scoring, the HF export as a source) runs
# once per kind of run: each task and template, a split chosen on validation, an int8 base, a preset
# with added tokens and a spreadsheet source. The other configs differ from these only in numbers.
FOLLOW_UPS = {"quickstart", "chat", "pretrain_text", "recipe_company_qa", "recipe_structured_json_int8", "dialect_sft",
              "faq_csv"}


@pytest.mark.parametrize("config, family", CONFIG_CASES)
def test_shipped_config_runs_two_steps_on_tiny_preset(config, family, tiny_presets, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(ROOT)
    overrides = [f"model.preset={tiny_presets[family]}", "train.max_steps=2", "data.eval_limit=4", f"output_dir={tmp_path}",
                 "name=t", "eval.batch_size=4", "eval.max_new_tokens=4"]
    assert main(["run", str(config), *overrides]) == 0
    run_dir = tmp_path / "t"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["train"]["steps"] == 2
    assert summary["export"]["verify"]["ok"]
    lines = [json.loads(l) for l in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [l["step"] for l in lines] == [1, 2] and all(l["loss"] > 0 for l in lines)
    evaluates = load_config(config).data.task != "pretrain"
    # the exact training data: the examples as JSONL, or for a streamed corpus its source and fingerprint
    expected = ["config.yaml", "data/train.jsonl" if evaluates else "data/train.source.json",
                "adapter/adapter.safetensors", "export_hf/model.safetensors"]
    for name in expected + (["eval.json", "eval_base.json"] if evaluates else []):
        assert (run_dir / name).is_file(), name
    out = capsys.readouterr().out
    assert ("tuned" in out and "base" in out) == evaluates
    if config.stem not in FOLLOW_UPS or family != "gemma3":
        return

    # The run dir is a source for generate and export, and a second run refuses to clobber it.
    assert main(["generate", str(run_dir), "Hola", "--max-new-tokens", "3"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["prompt"] == "Hola"
    assert main(["export", str(run_dir), str(tmp_path / "again")]) == 0
    assert main(["run", str(config), *overrides]) == 2
    assert "already exists" in capsys.readouterr().err

    # `kerasft eval` re-scores the saved adapter (and the base) with the same config.
    if evaluates:
        heldout = next(run_dir / "data" / f"{name}.jsonl" for name in ("test", "validation")
                       if (run_dir / "data" / f"{name}.jsonl").is_file())
        from_run = json.loads((run_dir / "eval.json").read_text())
        (run_dir / "eval.json").unlink()
        assert main(["eval", str(config), *overrides]) == 0
        from_eval = json.loads((run_dir / "eval.json").read_text())
        assert from_eval["count"] == min(4, len(heldout.read_text().splitlines()))
        # One evaluation stage: the saved adapter scores exactly as the trained model did in `run`.
        assert [e["prediction"] for e in from_eval["examples"]] == [e["prediction"] for e in from_run["examples"]]
        if config.stem == "recipe_company_qa":  # settings are chosen on the validation split
            assert main(["eval", str(config), *overrides, "eval.split=validation"]) == 0
            scored = {row["id"] for row in json.loads((run_dir / "eval.json").read_text())["examples"]}
            validation = [json.loads(line)["id"] for line in (run_dir / "data" / "validation.jsonl").read_text().splitlines()]
            assert scored == set(validation[:4])

    # The HF export is itself a model source (a local Hugging Face folder).
    assert main(["generate", str(run_dir / "export_hf"), "Hola", "--max-new-tokens", "2"]) == 0
