"""Hand-built cases for the SQuAD v1.1 / MLQA metrics; expected values are worked out by hand."""

import json
import subprocess
import sys

import pytest

from kerasft.errors import KerasftError
from kerasft.evaluate.metrics import (
    best_over_golds,
    exact_match,
    f1,
    load_predictions,
    load_squad_references,
    normalize_answer,
    score_files,
    squad_scores,
)


# --- normalisation -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("¡El Museo del Prado!", "museo del prado"),
        ("¿Quién escribió «Cien años de soledad»?", "quién escribió cien años de soledad"),
        ("Los   Reyes\tCatólicos\n", "reyes católicos"),
        ("Unos años, unas horas: un día", "años horas día"),
        ("la losa de LAS Lastras", "losa de lastras"),  # articles only as whole words
        ("Canción", "canción"),  # accents are kept
        ("Él", "él"),  # "él" is not the article "el"
        ("“comillas” ‘simples’ — guion… ·", "comillas simples guion"),  # category P
        ("$100 + 5 = <x> ^ `y` | ~z", "100 5 x y z"),  # ASCII symbols in string.punctuation
        ("€100 ° ©", "€100 ° ©"),  # Unicode symbols (category S) outside string.punctuation
        ("el-libro", "ellibro"),  # punctuation goes before articles, as in MLQA
        ("", ""),
    ],
)
def test_normalize_spanish(text, expected):
    assert normalize_answer(text, "es") == expected


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Eiffel Tower!", "eiffel tower"),
        ("A cat and an owl", "cat and owl"),
        ("the El Dorado", "el dorado"),  # Spanish articles stay in English
        ("theatre", "theatre"),
        ("¿Qué «tal»?", "¿qué «tal»"),  # only string.punctuation is removed
        ("the-end", "theend"),
    ],
)
def test_normalize_english(text, expected):
    assert normalize_answer(text, "en") == expected


def test_spanish_is_default_and_keeps_english_articles():
    assert normalize_answer("The El Dorado") == "the dorado"


def test_unknown_language_is_rejected():
    with pytest.raises(ValueError, match="'fr'"):
        normalize_answer("le musée", "fr")


# --- exact match and F1 --------------------------------------------------------------------


def test_exact_match():
    assert exact_match("¡El Museo del Prado!", "museo del prado") == 1.0
    assert exact_match("canción", "cancion") == 0.0
    assert exact_match("Los Andes", "Andes", lang="en") == 0.0  # "los" is not an English article
    assert exact_match("The Andes", "andes", lang="en") == 1.0
    assert exact_match("el", "la") == 1.0  # both normalise to ""


def test_f1_partial_overlap():
    # pred tokens: río ebro en zaragoza (4); gold: río ebro (2); shared 2.
    # precision 2/4, recall 2/2, F1 = 2 * 0.5 * 1 / 1.5 = 2/3.
    assert f1("el río Ebro en Zaragoza", "río Ebro") == pytest.approx(0.6667, abs=1e-4)


def test_f1_counts_repeated_tokens_once_per_gold_occurrence():
    # shared = min(3, 1) = 1; precision 1/3, recall 1/1, F1 = (2/3) / (4/3) = 0.5.
    assert f1("Ebro Ebro Ebro", "Ebro") == pytest.approx(0.5)


def test_f1_no_overlap_and_empty_answers():
    assert f1("Madrid", "Barcelona") == 0.0
    assert f1("canción", "cancion") == 0.0
    assert f1("", "Madrid") == 0.0
    assert f1("el", "la") == 0.0  # SQuAD v1.1: nothing shared, even when both are empty


def test_f1_exact_answer_is_one():
    assert f1("«Don Quijote»", "don quijote") == 1.0


def test_best_over_golds():
    golds = ["Ebro", "río Ebro"]
    # vs "Ebro": precision 1/4, recall 1, F1 = 0.5 / 1.25 = 0.4; vs "río Ebro": 2/3.
    assert best_over_golds(f1, "río Ebro en Aragón", golds, "es") == pytest.approx(2 / 3)
    assert best_over_golds(exact_match, "el Ebro", golds, "es") == 1.0
    assert best_over_golds(exact_match, "Aragón", golds, "es") == 0.0


def test_best_over_golds_needs_a_gold():
    with pytest.raises(ValueError):
        best_over_golds(f1, "Ebro", [], "es")


# --- corpus scores -------------------------------------------------------------------------


def test_squad_scores_missing_ids_count_as_zero_and_extra_ids_are_ignored():
    references = {
        "q1": ["Madrid"],
        "q2": ["río Ebro"],
        "q3": ["1492"],
        "q4": ["Cervantes"],
    }
    predictions = {
        "q1": "madrid",  # EM 1, F1 1
        "q2": "el río Ebro en Zaragoza",  # EM 0, F1 2/3
        "q3": "en 1492",  # EM 0, F1: precision 1/2, recall 1 -> 2/3
        "unknown": "Cervantes",  # not a reference id: ignored
    }  # q4 missing: EM 0, F1 0
    scores = squad_scores(predictions, references)
    assert scores["count"] == 4
    assert scores["missing"] == 1
    assert scores["exact_match"] == pytest.approx(25.0)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3 + 2 / 3 + 0) / 4)  # 58.33
    assert scores["f1"] == pytest.approx(58.3333, abs=1e-4)


def test_squad_scores_language_changes_result():
    references = {"q1": ["The Beatles"]}
    assert squad_scores({"q1": "Beatles"}, references, lang="en")["exact_match"] == 100.0
    assert squad_scores({"q1": "Beatles"}, references, lang="es")["exact_match"] == 0.0


def test_squad_scores_rejects_empty_references_and_unknown_language():
    with pytest.raises(ValueError):
        squad_scores({}, {})
    with pytest.raises(ValueError):
        squad_scores({}, {"q1": ["x"]}, lang="fr")


# --- loaders -------------------------------------------------------------------------------


def _squad(paragraph_qas):
    """A SQuAD v1.1 document with one article whose paragraphs hold the given qas lists."""
    return {
        "version": "1.1",
        "data": [
            {
                "title": "Prueba",
                "paragraphs": [{"context": "texto", "qas": qas} for qas in paragraph_qas],
            }
        ],
    }


def _qa(question_id, *texts):
    return {
        "id": question_id,
        "question": "¿?",
        "answers": [{"text": text, "answer_start": 0} for text in texts],
    }


def _write(tmp_path, name, content):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content), encoding="utf-8")
    return path


def _error(function, path):
    with pytest.raises(KerasftError) as caught:
        function(path)
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{path}: ")
    return message


def test_load_squad_references(tmp_path):
    document = _squad([[_qa("a", "Madrid", "madrid")], [_qa("b", "río Ebro"), _qa("c", "1492")]])
    path = _write(tmp_path, "refs.json", document)
    assert load_squad_references(path) == {
        "a": ["Madrid", "madrid"],
        "b": ["río Ebro"],
        "c": ["1492"],
    }


def test_load_predictions(tmp_path):
    path = _write(tmp_path, "preds.json", {"a": "Madrid", "b": ""})
    assert load_predictions(path) == {"a": "Madrid", "b": ""}


def test_malformed_json_names_file_line_and_column(tmp_path):
    path = _write(tmp_path, "preds.json", '{\n  "a": "Madrid",\n  "b" "Ebro"\n}\n')
    message = _error(load_predictions, path)
    # Line 3 is `  "b" "Ebro"`: the ':' is expected at column 7.
    assert "line 3, column 7" in message
    assert "Expecting ':' delimiter" in message
    assert "line 1," in _error(load_squad_references, _write(tmp_path, "empty.json", ""))


def test_missing_key_names_the_key_path(tmp_path):
    document = _squad([[_qa("a", "x")], [_qa("b", "x")], [_qa("c", "x"), _qa("d", "x")]])
    del document["data"][0]["paragraphs"][2]["qas"][1]["id"]
    path = _write(tmp_path, "refs.json", document)
    expected = f"{path}: data[0].paragraphs[2].qas[1]: missing 'id'"
    assert _error(load_squad_references, path) == expected


_QA0 = "data[0].paragraphs[0].qas[0]"


@pytest.mark.parametrize(
    "document, expected",
    [
        ({"version": "1.1"}, "top level: missing 'data'"),
        ([], "top level: expected an object, got a list"),
        ({"data": {}}, "top level.data: expected a list, got an object"),
        ({"data": [{"title": "t"}]}, "data[0]: missing 'paragraphs'"),
        ({"data": [{"paragraphs": [{"context": "c"}]}]}, "data[0].paragraphs[0]: missing 'qas'"),
        ({"data": [{"paragraphs": [{"qas": ["q"]}]}]}, f"{_QA0}: expected an object, got a string"),
        (_squad([[{"id": "a"}]]), f"{_QA0}: missing 'answers'"),
        (_squad([[{"id": 7, "answers": []}]]), f"{_QA0}.id: expected a string, got a number"),
        (
            _squad([[{"id": "a", "answers": [{"answer_start": 0}]}]]),
            f"{_QA0}.answers[0]: missing 'text'",
        ),
        (
            _squad([[{"id": "a", "answers": [{"text": None}]}]]),
            f"{_QA0}.answers[0].text: expected a string, got null",
        ),
        (_squad([[{"id": "a", "answers": []}]]), f"{_QA0}.answers: empty (id 'a')"),
        (
            _squad([[_qa("a", "x")], [_qa("a", "y")]]),
            "data[0].paragraphs[1].qas[0]: duplicate id 'a'",
        ),
        ({"data": []}, "no questions found"),
    ],
)
def test_reference_structure_errors(tmp_path, document, expected):
    path = _write(tmp_path, "refs.json", document)
    assert _error(load_squad_references, path).startswith(f"{path}: {expected}")


@pytest.mark.parametrize(
    "document, expected",
    [
        (["Madrid"], "top level: expected an object, got a list"),
        ({"a": "Madrid", "b": None}, "['b']: expected a string, got null"),
        ({"a": ["Madrid"]}, "['a']: expected a string, got a list"),
    ],
)
def test_prediction_structure_errors(tmp_path, document, expected):
    path = _write(tmp_path, "preds.json", document)
    assert _error(load_predictions, path) == f"{path}: {expected}"


def test_missing_file(tmp_path):
    path = tmp_path / "nope.json"
    assert _error(load_predictions, path) == f"{path}: file not found"
    assert _error(load_squad_references, path) == f"{path}: file not found"


def test_directory_and_non_utf8_files(tmp_path):
    assert "is a directory" in _error(load_predictions, tmp_path)
    path = tmp_path / "latin1.json"
    path.write_bytes('{"a": "canción"}'.encode("latin-1"))
    assert "not UTF-8" in _error(load_predictions, path)


def test_score_files(tmp_path):
    document = _squad([[_qa("a", "Madrid"), _qa("b", "río Ebro", "Ebro")]])
    references = _write(tmp_path, "refs.json", document)
    predictions = _write(tmp_path, "preds.json", {"a": "¡Madrid!", "b": "el Ebro en Zaragoza"})
    # a: EM 1, F1 1. b: pred tokens ebro en zaragoza (3); vs "río Ebro" P 1/3 R 1/2 -> 0.4;
    # vs "Ebro" P 1/3 R 1 -> 0.5; best 0.5, EM 0. Means: EM 50, F1 75.
    scores = score_files(predictions, references)
    assert scores == {"exact_match": 50.0, "f1": pytest.approx(75.0), "count": 2, "missing": 0}


def test_module_is_stdlib_only():
    # The CLI imports this module, so it must not pull in the heavy stack.
    code = (
        "import sys, kerasft.evaluate.metrics; "
        "heavy = [m for m in ('numpy', 'keras', 'jax', 'tensorflow') if m in sys.modules]; "
        "print(' '.join(heavy))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    )
    assert result.stdout.strip() == ""
