"""The evaluator on the tiny preset: every task, the Keras and transformers paths giving the same
metrics on an export, the report files, and `kerasft eval ... compare=base`."""

import json
from dataclasses import replace
from pathlib import Path

import pytest

from kerasft.config import DataConfig, EvalConfig, ModelConfig, load_config
from kerasft.data.records import Example, qa_prompt
from kerasft.errors import KerasftError
from kerasft.evaluate.evaluator import check_eval_config, comparison_table, evaluate, open_model
from kerasft.evaluate.generate import HFModel, KerasModel
from kerasft.evaluate.report import write_report
from kerasft.models.presets import load_model

ROOT = Path(__file__).resolve().parents[2]
CONTEXT = "El río Ebro atraviesa Zaragoza. La capital de España es Madrid."
QA = [
    Example("q1", qa_prompt("", CONTEXT, "¿Qué río atraviesa Zaragoza?"), "río Ebro", ("río Ebro", "Ebro"), CONTEXT,
            meta={"difficulty": "fácil"}),
    Example("q2", qa_prompt("", CONTEXT, "¿Cuál es la capital de España?"), "Madrid", ("Madrid",), CONTEXT,
            meta={"difficulty": "difícil"}),
    Example("q3", qa_prompt("", CONTEXT, "¿Quién escribió el Quijote?"), "Sin respuesta", (), CONTEXT,
            meta={"difficulty": "difícil"}),
]
FAST = dict(batch_size=4, max_new_tokens=6)


@pytest.fixture(scope="module")
def keras_model(tiny_preset):
    loaded = load_model(ModelConfig(preset=str(tiny_preset)))
    return KerasModel(loaded.backbone, loaded.tokenizer, name="tiny")


@pytest.fixture(scope="module")
def hf_dir(keras_model, tmp_path_factory):
    from kerasft.export.hf import export_hf

    return export_hf(keras_model.backbone, keras_model.tokenizer, tmp_path_factory.mktemp("hf") / "hf")


def test_qa_result_has_v2_scores_auroc_system_and_examples(keras_model):
    import numpy as np

    from kerasft.runtime import peak_rss_bytes

    np.ones(2**28, np.float32).sum()  # 1 GiB touched and freed before: the process's peak, not the evaluation's
    process_peak = peak_rss_bytes() / 2**20
    result = evaluate(keras_model, QA, EvalConfig(**FAST), DataConfig())
    for key in ("f1", "exact_match", "f1_en", "has_answer_f1", "no_answer_f1", "no_answer_recall"):
        assert key in result, key
    assert 0.0 <= result["answerability_auroc"] <= 1.0  # both classes present: a forward pass each
    assert result["has_answer_count"] == 2 and result["no_answer_count"] == 1
    system = result["system"]
    assert system["latency_p50_s"] > 0 and system["latency_p95_s"] >= system["latency_p50_s"]
    assert system["prefill_tokens_per_s"] > 0 and system["decode_tokens_per_s"] > 0 and system["peak_rss_mib"] > 100
    assert system["peak_rss_since"] == "evaluation"
    assert system["peak_rss_mib"] < process_peak - 500, (system["peak_rss_mib"], process_peak)
    assert [row["id"] for row in result["examples"]] == ["q1", "q2", "q3"]
    assert all(set(row) >= {"prompt", "gold", "prediction", "score", "failures"} for row in result["examples"])
    assert sum(result["failures"].values()) == sum(len(r["failures"]) for r in result["examples"])


def test_keras_and_transformers_give_the_same_metrics(keras_model, hf_dir):
    cfg = EvalConfig(metrics=("squad", "no_answer", "auroc"), **FAST)
    hf_model = open_model(str(hf_dir))
    assert isinstance(hf_model, HFModel)
    ours, theirs = evaluate(keras_model, QA, cfg, DataConfig()), evaluate(hf_model, QA, cfg, DataConfig())
    assert [r["prediction"] for r in ours["examples"]] == [r["prediction"] for r in theirs["examples"]]
    assert any(r["prediction"] for r in ours["examples"])  # the tiny model says something
    for key in ("f1", "exact_match", "f1_en", "has_answer_f1", "no_answer_f1"):
        assert ours[key] == theirs[key], key
    # The AUROC comes from log-probabilities: float32 Keras vs float32 transformers, same ranking.
    assert ours["answerability_auroc"] == theirs["answerability_auroc"]
    prompts = [[2, 5, 17, 40], [2, 99, 7]]
    responses = [[41, 12, 13], [250, 14]]
    for (a, n), (b, m) in zip(keras_model.logprobs(prompts, responses, 2), hf_model.logprobs(prompts, responses, 2)):
        assert n == m and a == pytest.approx(b, abs=1e-3)


def test_short_answer_json_and_text_tasks(keras_model, tmp_path):
    short = evaluate(keras_model, QA[:2], EvalConfig(task="short_answer", metrics=("short_answer",), **FAST), DataConfig())
    assert set(short["by"]["difficulty"]) == {"fácil", "difícil"} and "accuracy" in short

    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps({"type": "object", "required": ["ciudad"]}))
    rows = [Example("j1", "Devuelve JSON", '{"ciudad": "Madrid", "año": 1561}'),
            Example("j2", "Devuelve JSON", '{"ciudad": "Sevilla"}')]
    result = evaluate(keras_model, rows, EvalConfig(task="json", schema=str(schema), metrics=("json", "schema"), **FAST),
                      DataConfig())
    assert {"parse_rate", "schema_valid", "exact_match"} <= set(result) and set(result["by"]["field"]) == {"ciudad", "año"}

    text = evaluate(keras_model, [Example("t1", "Resume", "El gato duerme en el sofá.")],
                    EvalConfig(task="text", **FAST), DataConfig())
    assert text["perplexity"] > 1 and {"bleu", "chrf", "rouge_l", "eval_loss"} <= set(text)
    # A random 512-token model: perplexity near the vocabulary size, far from 1.
    only_ppl = evaluate(keras_model, [Example("t1", "Resume", "El gato duerme en el sofá.")],
                        EvalConfig(task="text", metrics=("perplexity",), **FAST), DataConfig())
    assert only_ppl["perplexity"] == pytest.approx(text["perplexity"]) and not only_ppl["examples"][0]["prediction"]


def test_bad_json_gold_and_schema_are_one_line_errors(keras_model, tmp_path):
    with pytest.raises(KerasftError, match="gold response is not JSON"):
        evaluate(keras_model, [Example("j", "p", "no es JSON")], EvalConfig(task="json", **FAST), DataConfig())
    bad = tmp_path / "bad.json"
    bad.write_text('{"type": 5}')
    with pytest.raises(KerasftError, match="bad.json: not a valid JSON schema"):
        evaluate(keras_model, [Example("j", "p", "{}")], EvalConfig(task="json", schema=str(bad), **FAST), DataConfig())
    with pytest.raises(KerasftError, match="eval.schema: .*missing.json: file not found"):
        check_eval_config(EvalConfig(task="json", schema=str(tmp_path / "missing.json")))


def test_report_files(keras_model, tmp_path):
    results = {name: evaluate(keras_model, QA, EvalConfig(metrics=("squad",), **FAST), DataConfig())
               for name in ("base", "tuned")}
    results["tuned"] = dict(results["tuned"], f1=80.0)  # so the bars differ
    log = tmp_path / "metrics.jsonl"
    log.write_text('{"step": 1, "loss": 3.0}\n{"step": 2, "loss": 2.5, "eval_loss": 2.7}\n{"step": 3, "lo')
    report = write_report(tmp_path, results, log, worst=2)
    assert report["training"] == {"steps": 2, "final_loss": 2.5}  # a cut last line is left out
    assert report["plots"] == ["plots/loss.png", "plots/metrics.png"]
    for name in ("report.md", "report.json", "plots/loss.png", "plots/metrics.png"):
        assert (tmp_path / name).stat().st_size > 100, name
    assert (tmp_path / "plots/loss.png").read_bytes()[:4] == b"\x89PNG"
    markdown = (tmp_path / "report.md").read_text()
    assert "| base |" in markdown and "| tuned |" in markdown and "80.0" in markdown
    assert "## Worst 2 examples (tuned)" in markdown and "## Failure kinds" in markdown
    assert json.loads((tmp_path / "report.json").read_text())["models"]["tuned"]["f1"] == 80.0
    assert "tuned" in comparison_table(results)


def test_per_group_plot(keras_model, tmp_path):
    cfg = EvalConfig(task="short_answer", metrics=("short_answer",), **FAST)
    results = {"base": evaluate(keras_model, QA[:2], cfg, DataConfig())}
    report = write_report(tmp_path, results, None, plots=True)
    assert "plots/by_difficulty.png" in report["plots"] and "## By difficulty" in (tmp_path / "report.md").read_text()


def test_eval_command_compare_base_on_an_hf_source(tiny_preset, hf_dir, tmp_path, capsys):
    from kerasft.cli import main

    data = tmp_path / "eval.jsonl"
    data.write_text("\n".join(json.dumps({"id": ex.id, "prompt": ex.prompt, "response": ex.response}) for ex in QA[:2]))
    config = tmp_path / "c.yaml"
    config.write_text(f"name: e\noutput_dir: {tmp_path}\nmodel:\n  preset: {tiny_preset}\ndata:\n  eval: {data}\n")
    argv = ["eval", str(config), "compare=base", f"eval.source={hf_dir}", "eval.task=short_answer",
            "eval.batch_size=2", "eval.max_new_tokens=4"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "base" in out and "tuned" in out
    run_dir = tmp_path / "e"
    report = json.loads((run_dir / "report.json").read_text())
    assert list(report["models"]) == ["base", "tuned"]
    assert report["models"]["tuned"]["source"] == str(hf_dir)
    # Same weights (the export of the base) through both paths: the same scores.
    assert report["models"]["base"]["f1"] == report["models"]["tuned"]["f1"]
    assert main(["eval", str(config), "compare=tuned"]) == 2
    assert "compare=tuned" in capsys.readouterr().err


def test_long_prompts_keep_their_question_in_the_report():
    from kerasft.evaluate.report import PROMPT_CHARS, _shortened

    prompt = "Responde.\n\nTexto: " + "palabra " * 200 + "\n\nPregunta: ¿Quién descubrió el cometa?"
    short = _shortened(prompt)
    assert len(short) < len(prompt) and len(short) <= PROMPT_CHARS + len(" [...] ")
    assert short.startswith("Responde.\n\nTexto: palabra") and short.endswith("¿Quién descubrió el cometa?")
    assert " [...] " in short and _shortened("corto") == "corto"
