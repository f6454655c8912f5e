"""eval.task classification: label normalisation, hand-computed accuracy / per-class / macro / micro
scores and confusion matrix, and the evaluator and report on a scripted model (no network, no
keras: the metric code needs no model)."""

import json

import pytest

from kerasft.config import DataConfig, EvalConfig
from kerasft.data.records import Example
from kerasft.errors import KerasftError
from kerasft.evaluate import metrics
from kerasft.evaluate.evaluator import evaluate
from kerasft.evaluate.report import write_report

LABELS = ["envío", "baja", "horario"]


def test_normalize_label_ignores_case_accents_punctuation_and_spacing():
    assert metrics.normalize_label("  ENVÍO. ") == "envio"
    assert metrics.normalize_label("Dirección_nueva!") == "direccion nueva"
    assert metrics.normalize_label("cambio-de  dirección") == "cambio de direccion"
    assert metrics.normalize_label("¡Año!") == "ano"
    assert metrics.match_label("Envio", LABELS) == "envío"
    assert metrics.match_label("HORARIO.", LABELS) == "horario"
    # more words than the label, another word, or nothing: invalid
    assert metrics.match_label("envío del pedido", LABELS) is None
    assert metrics.match_label("devolución", LABELS) is None
    assert metrics.match_label("  ", LABELS) is None


def test_classification_scores_by_hand():
    golds = {"1": "envío", "2": "envío", "3": "envío", "4": "baja", "5": "baja",
             "6": "horario", "7": "horario", "8": "horario"}
    predictions = {"1": "Envío", "2": " ENVIO. ", "3": "baja", "4": "baja", "5": "no sé",
                   "6": "horario", "7": "envio"}  # "8" missing: an empty, invalid answer
    s = metrics.classification_scores(predictions, golds, LABELS)
    # rows gold, columns envío / baja / horario / invalid
    assert s["confusion"] == {"labels": LABELS, "predicted": [*LABELS, "invalid"],
                              "matrix": [[2, 1, 0, 0], [0, 1, 0, 1], [1, 0, 1, 1]]}
    assert s["invalid"] == 2 and s["count"] == 8
    assert s["accuracy"] == pytest.approx(50.0)  # 4 of 8
    # envío P 2/3 R 2/3 F1 2/3; baja P 1/2 R 1/2 F1 1/2; horario P 1/1 R 1/3 F1 1/2
    assert s["per_class"]["envío"] == pytest.approx({"precision": 200 / 3, "recall": 200 / 3, "f1": 200 / 3, "support": 3})
    assert s["per_class"]["baja"] == pytest.approx({"precision": 50.0, "recall": 50.0, "f1": 50.0, "support": 2})
    assert s["per_class"]["horario"] == pytest.approx({"precision": 100.0, "recall": 100 / 3, "f1": 50.0, "support": 3})
    assert s["macro_precision"] == pytest.approx(100 * 13 / 18)
    assert s["macro_recall"] == pytest.approx(50.0)
    assert s["macro_f1"] == pytest.approx(100 * 10 / 18)  # mean of the F1s, not F1 of the means
    # micro: 4 right of 6 valid answers and of 8 golds; invalid answers are no class's false positive
    assert s["micro_precision"] == pytest.approx(100 * 4 / 6)
    assert s["micro_recall"] == pytest.approx(s["accuracy"])
    assert s["micro_f1"] == pytest.approx(100 * 4 / 7)
    assert s["predicted"] == {"1": "envío", "2": "envío", "3": "baja", "4": "baja", "5": None,
                              "6": "horario", "7": "envío", "8": None}


def test_a_label_never_given_nor_predicted_scores_zero_in_the_macro_mean():
    s = metrics.classification_scores({"a": "envío", "b": "baja"}, {"a": "envío", "b": "baja"}, LABELS)
    assert s["accuracy"] == s["micro_f1"] == 100.0
    assert s["per_class"]["horario"] == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 0}
    assert s["macro_f1"] == pytest.approx(200 / 3)


def test_classification_scores_refuse_unknown_gold_and_ambiguous_labels():
    with pytest.raises(ValueError, match="'devolución' is not one of"):
        metrics.classification_scores({}, {"x": "devolución"}, LABELS)
    with pytest.raises(ValueError, match="not distinct"):
        metrics.classification_scores({}, {"x": "envío"}, ["envío", "Envio"])
    with pytest.raises(ValueError, match="no gold"):
        metrics.classification_scores({}, {}, LABELS)


class ScriptedModel:
    """The evaluator's model interface with canned answers: prompt ids are the prompt's code
    points, and each prompt gets the answer whose key it contains."""

    kind, template = "hf", "gemma"

    def __init__(self, answers, name="scripted"):
        self.answers, self.name = answers, name

    def encode_prompt_text(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))

    def generate(self, prompts, max_new_tokens, batch_size, sampling):
        texts = ["".join(map(chr, p)) for p in prompts]
        new = [[ord(c) for c in next(a for key, a in self.answers.items() if key in t)] for t in texts]
        return new, {"seconds": 0.01, "generated_tokens": sum(map(len, new)), "prompt_tokens": 0, "batches": []}


MESSAGES = [("m1", "¿Dónde está mi pedido?", "envío", "Envío"), ("m2", "Quiero darme de baja", "baja", "baja."),
            ("m3", "¿Abren el sábado?", "horario", "envio"), ("m4", "paquete perdido", "envío", "ni idea")]


def _examples(label_in_meta=False):
    return [Example(i, text, "x" if label_in_meta else gold, meta={"intent": gold} if label_in_meta else {})
            for i, text, gold, _ in MESSAGES]


def test_evaluate_and_report_classification(tmp_path):
    model = ScriptedModel({text: answer for _, text, _, answer in MESSAGES})
    cfg = EvalConfig(task="classification", metrics=("classification",), labels=tuple(LABELS), label_column="intent")
    result = evaluate(model, _examples(label_in_meta=True), cfg, DataConfig())
    assert result["accuracy"] == 50.0 and result["invalid"] == 1
    assert result["micro_precision"] == pytest.approx(100 * 2 / 3)
    assert result["by"]["class"]["horario"]["support"] == 1
    assert result["confusion"]["matrix"] == [[1, 0, 0, 1], [0, 1, 0, 0], [1, 0, 0, 0]]
    rows = {row["id"]: row for row in result["examples"]}
    assert rows["m4"]["failures"] == ["invalid_label"] and rows["m3"]["failures"] == []
    assert [rows[i]["score"] for i in ("m1", "m2", "m3", "m4")] == [1.0, 1.0, 0.0, 0.0]
    assert rows["m3"]["gold"] == "horario"

    report = write_report(tmp_path, {"base": result, "tuned": result})
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved["models"]["tuned"]["invalid"] == 1 and saved["models"]["tuned"]["macro_f1"] == pytest.approx(
        result["macro_f1"])
    assert saved["models"]["base"]["confusion"]["matrix"] == result["confusion"]["matrix"]
    assert {"plots/confusion_base.png", "plots/confusion_tuned.png", "plots/by_class.png"} <= set(report["plots"])
    assert (tmp_path / "plots" / "confusion_tuned.png").read_bytes()[:4] == b"\x89PNG"
    md = (tmp_path / "report.md").read_text()
    assert "## Confusion matrix (tuned): rows gold, columns predicted" in md
    assert "| envío | 1 | 0 | 0 | 1 |" in md
    assert ("| model | accuracy | macro_precision | macro_recall | macro_f1 | micro_precision | micro_recall | "
            "micro_f1 | invalid |") in md
    assert "| tuned | 50.0 | 50.0 | 50.0 | 50.0 | 66.7 | 50.0 | 57.1 | 1 |" in md


def test_gold_label_outside_the_label_set_or_missing_column_is_one_line_error():
    model = ScriptedModel({text: answer for _, text, _, answer in MESSAGES})
    cfg = EvalConfig(task="classification", metrics=("classification",), labels=("envío", "baja"))
    with pytest.raises(KerasftError, match=r"m3: gold label 'horario' is not in the label set \(envío, baja\)"):
        evaluate(model, _examples(), cfg, DataConfig())
    cfg = EvalConfig(task="classification", metrics=("classification",), label_column="intencion")
    with pytest.raises(KerasftError, match="eval.label_column 'intencion' is not a column"):
        evaluate(model, _examples(), cfg, DataConfig())


def test_label_set_defaults_to_the_sorted_gold_labels():
    model = ScriptedModel({text: answer for _, text, _, answer in MESSAGES})
    result = evaluate(model, _examples(), EvalConfig(task="classification", metrics=("classification",)), DataConfig())
    assert result["labels"] == ["baja", "envío", "horario"]


def test_eval_labels_must_be_distinct():
    with pytest.raises(KerasftError, match="eval.labels"):
        EvalConfig(task="classification", labels=("a", "a"))
