"""Hand-built cases for the SQuAD v1.1 / MLQA metrics; expected values are worked out by hand."""

import json
import math
import subprocess
import sys

import pytest

from kerasft.errors import KerasftError
from kerasft.evaluate.metrics import (
    auroc,
    best_over_golds,
    exact_match,
    f1,
    failure_kinds,
    guess_language,
    is_no_answer,
    json_scores,
    lcs_length,
    load_predictions,
    load_squad_references,
    normalize_answer,
    parse_json_output,
    percentile,
    perplexity,
    rouge_l,
    rouge_tokens,
    score_files,
    short_answer_scores,
    squad_scores,
    squad_v2_scores,
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


# --- SQuAD v2: no-answer handling ----------------------------------------------------------

NO_ANSWER = "Sin respuesta"


def test_is_no_answer_normalises():
    assert is_no_answer("¡Sin respuesta!", NO_ANSWER)
    assert is_no_answer("  sin   RESPUESTA. ", NO_ANSWER)
    assert not is_no_answer("Sin respuesta clara", NO_ANSWER)
    assert not is_no_answer("", NO_ANSWER)


def test_squad_v2_scores_by_hand():
    references = {
        "a1": ["Madrid"],  # answered right: EM 1, F1 1
        "a2": ["río Ebro"],  # partial: "el río Ebro en Zaragoza" -> F1 2/3
        "a3": ["1492"],  # model abstains on an answerable question: 0, 0
        "n1": [],  # unanswerable, model abstains: 1, 1
        "n2": [],  # unanswerable, model answers: 0, 0
    }
    predictions = {"a1": "madrid", "a2": "el río Ebro en Zaragoza", "a3": "Sin respuesta.", "n1": "¡Sin respuesta!",
                   "n2": "Cervantes"}
    scores = squad_v2_scores(predictions, references, NO_ANSWER)
    assert scores["has_answer_exact_match"] == pytest.approx(100 / 3)
    assert scores["has_answer_f1"] == pytest.approx(100 * (1 + 2 / 3) / 3)
    assert scores["no_answer_exact_match"] == 50.0 and scores["no_answer_f1"] == 50.0
    assert scores["exact_match"] == pytest.approx(100 * 2 / 5)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3 + 1) / 5)
    # Predicted no answer: a3 (wrong), n1 (right) -> precision 1/2; true no-answer: n1, n2 -> recall 1/2.
    assert scores["no_answer_precision"] == 50.0 and scores["no_answer_recall"] == 50.0
    assert (scores["count"], scores["has_answer_count"], scores["no_answer_count"], scores["predicted_no_answer"]) == (5, 3, 2, 2)


def test_squad_v2_scores_empty_groups_are_none():
    scores = squad_v2_scores({"a": "Madrid"}, {"a": ["Madrid"]}, NO_ANSWER)
    assert scores["no_answer_f1"] is None and scores["no_answer_recall"] is None
    assert scores["no_answer_precision"] is None  # nothing predicted as no answer
    assert scores["f1"] == 100.0
    with pytest.raises(ValueError):
        squad_v2_scores({}, {}, NO_ANSWER)


def test_auroc_by_hand():
    assert auroc([0.9, 0.8, 0.2, 0.1], [1, 1, 0, 0]) == 1.0
    assert auroc([0.1, 0.2, 0.8, 0.9], [1, 1, 0, 0]) == 0.0
    # Positives 0.8, 0.4; negatives 0.6, 0.2: pairs won (0.8>0.6, 0.8>0.2, 0.4>0.2) = 3 of 4.
    assert auroc([0.8, 0.6, 0.4, 0.2], [1, 0, 1, 0]) == 0.75
    # A tie between a positive and a negative counts one half: (1 + 0.5) / 2.
    assert auroc([0.5, 0.5, 0.9], [0, 1, 1]) == 0.75
    assert auroc([1.0, 2.0], [1, 1]) is None
    with pytest.raises(ValueError):
        auroc([1.0], [1, 0])


# --- structured output ---------------------------------------------------------------------


def test_parse_json_output():
    assert parse_json_output('{"a": 1}') == (True, {"a": 1})
    assert parse_json_output('```json\n{"a": 1}\n```') == (True, {"a": 1})
    assert parse_json_output('```\n[1, 2]\n```') == (True, [1, 2])
    assert parse_json_output('{"a": 1') == (False, None)
    assert parse_json_output("") == (False, None)
    assert parse_json_output("Claro: {\"a\": 1}") == (False, None)  # prose around JSON is not JSON


def test_json_scores_by_hand():
    golds = {
        "1": {"ciudad": "Madrid", "año": 1561},
        "2": {"ciudad": "Sevilla", "año": 1248},
        "3": {"ciudad": "Toledo", "año": 1085},
        "4": {"ciudad": "Zaragoza", "activo": True},
    }
    predictions = {
        "1": '{"año": 1561.0, "ciudad": "Madrid"}',  # exact (1561 == 1561.0 in JSON), both fields right
        "2": '{"ciudad": "Sevilla", "año": 1249}',  # ciudad right, año wrong
        "3": "{ciudad: Toledo}",  # does not parse
        "4": '{"ciudad": "Zaragoza", "activo": 1}',  # 1 is not true
    }
    validate = lambda value: isinstance(value, dict) and "año" in value  # noqa: E731
    scores = json_scores(predictions, golds, validate)
    assert scores["parse_rate"] == 75.0
    assert scores["schema_valid"] == 50.0  # 1 and 2 have "año"
    assert scores["exact_match"] == 25.0
    # ciudad: 1, 2, 4 right of 4; año: only 1 of 3; activo: 0 of 1.
    assert scores["field_accuracy"] == {"ciudad": 75.0, "año": pytest.approx(100 / 3), "activo": 0.0}
    assert json_scores(predictions, golds)["schema_valid"] is None


# --- short answers -------------------------------------------------------------------------


def test_short_answer_scores_by_group():
    references = {"1": ["Madrid"], "2": ["río Ebro"], "3": ["1492"], "4": ["Cervantes"]}
    predictions = {"1": "¡Madrid!", "2": "el Ebro", "3": "en el año 1492 de nuestra era", "4": "Lope"}
    meta = {"1": {"difficulty": "fácil"}, "2": {"difficulty": "fácil", "category": "geo"},
            "3": {"difficulty": "difícil"}, "4": {"difficulty": "difícil"}}
    # F1: 1: 1; 2: "ebro" vs "río ebro": P 1, R 1/2 -> 2/3; 3: tokens en año 1492 de nuestra era (6),
    # P 1/6 R 1 -> 2/7; 4: 0. Accuracy at 0.5: 1, 2 pass.
    scores = short_answer_scores(predictions, references, meta, threshold=0.5)
    assert scores["exact_match"] == 25.0
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3 + 2 / 7) / 4)
    assert scores["accuracy"] == 50.0
    assert scores["by"]["difficulty"]["fácil"] == {"exact_match": 50.0, "f1": pytest.approx(100 * 5 / 6), "accuracy": 100.0, "count": 2}
    assert scores["by"]["difficulty"]["difícil"]["accuracy"] == 0.0
    assert scores["by"]["category"] == {"geo": {"exact_match": 0.0, "f1": pytest.approx(200 / 3), "accuracy": 100.0, "count": 1}}
    assert short_answer_scores(predictions, references, meta, threshold=0.25)["accuracy"] == 75.0


def test_short_answers_with_the_wrong_number_are_wrong():
    from kerasft.evaluate.metrics import numbers_in, short_answer_correct

    assert numbers_in("1.080 €, a las 14:00 o 3") == ["1080", "1400", "3"]
    # "540 €" shares only "€" with "1.080 €": F1 0.5, at the threshold, but the amount is wrong.
    assert f1("540 €", "1.080 €") == 0.5
    assert not short_answer_correct("540 €", ["1.080 €"], threshold=0.5)
    assert short_answer_correct("1080 €", ["1.080 €"], threshold=0.5)
    assert short_answer_correct("cuesta 65 euros", ["65 €", "65 euros"], threshold=0.5)
    assert not short_answer_correct("15 €", ["65 €"], threshold=0.5)
    assert short_answer_correct("el monte Carral", ["monte Carral"], threshold=0.5)  # no numbers: F1 alone
    scores = short_answer_scores({"a": "540 €", "b": "1.080 €"}, {"a": ["1.080 €"], "b": ["1.080 €"]})
    assert scores["accuracy"] == 50.0 and scores["f1"] == 75.0


def test_numbers_in_words_and_digits_are_the_same_answer():
    from kerasft.evaluate.metrics import number_words_to_digits, short_answer_correct

    assert number_words_to_digits("Siete mecánicos, treinta y dos socios, veintidós o veintidos") == "7 mecánicos, 32 socios, 22 o 22"
    assert number_words_to_digits("un árbol y una tienda") == "un árbol y una tienda"  # articles stay words
    assert number_words_to_digits("forty-two, Forty two, eleven", lang="en") == "42, 42, 11"
    assert short_answer_correct("7", ["siete"]) and short_answer_correct("siete", ["7"])
    assert short_answer_correct("dos tiendas", ["2"]) and not short_answer_correct("ocho", ["siete"])
    assert not short_answer_correct("treinta y uno", ["32"])


# --- ROUGE-L, perplexity, percentiles -------------------------------------------------------


def test_lcs_length():
    assert lcs_length("ABCBDAB", "BDCABA") == 4  # the textbook example (BCBA)
    assert lcs_length([], [1, 2]) == 0
    assert lcs_length([1, 2, 3], [1, 2, 3]) == 3


def test_rouge_l_by_hand():
    # pred: el gato duerme en el sofá (6); ref: el gato negro duerme en la cama (7).
    # LCS: el gato duerme en (4). P 4/6, R 4/7, F = 2PR/(P+R) = 8/13.
    score = rouge_l("El gato duerme en el sofá.", "¡El gato negro duerme en la cama!")
    assert score["precision"] == pytest.approx(4 / 6)
    assert score["recall"] == pytest.approx(4 / 7)
    assert score["f1"] == pytest.approx(8 / 13)
    assert rouge_l("¿Qué?", "qué")["f1"] == 1.0  # punctuation and case do not count
    assert rouge_l("", "algo") == {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    assert rouge_tokens("«Año» 2024, niño") == ["año", "2024", "niño"]


def test_perplexity():
    assert perplexity(0.0, 5) == 1.0
    assert perplexity(4 * math.log(8), 4) == pytest.approx(8.0)
    with pytest.raises(ValueError):
        perplexity(1.0, 0)


def test_percentile_matches_linear_interpolation():
    values = [4.0, 1.0, 3.0, 2.0]  # sorted 1 2 3 4
    assert percentile(values, 50) == 2.5
    assert percentile(values, 95) == pytest.approx(3.85)  # position 2.85: 3 + 0.85
    assert percentile(values, 0) == 1.0 and percentile(values, 100) == 4.0
    assert percentile([7.0], 95) == 7.0
    with pytest.raises(ValueError):
        percentile([], 50)


# --- language guess and failure kinds --------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("¿Cuál es la capital de España?", "es"),
        ("El río pasa por la ciudad y los puentes son antiguos.", "es"),
        ("The river flows through the city.", "en"),
        ("It was discovered in 2009 by two amateurs.", "en"),
        ("Madrid", "unknown"),
        ("1492", "unknown"),
        ("", "unknown"),
    ],
)
def test_guess_language(text, expected):
    assert guess_language(text) == expected


CONTEXT = "El cometa fue descubierto el 14 de marzo de 2009 por dos astrónomos aficionados."
QUESTION = "¿Cuándo fue descubierto el cometa?"


@pytest.mark.parametrize(
    "prediction, golds, expected",
    [
        ("14 de marzo de 2009", ["14 de marzo de 2009"], []),
        ("  ", ["2009"], ["empty"]),
        ("en 2010", ["2009"], ["not_in_context"]),
        ("El cometa fue descubierto el 14 de marzo de 2009", ["2009"], ["too_long"]),
        ("It was discovered in 2009 by the amateurs", ["2009"], ["not_in_context", "too_long", "wrong_language"]),
        ("Sin respuesta", ["2009"], ["false_no_answer"]),
        ("dos astrónomos", [], ["missed_no_answer"]),
        ("¡Sin respuesta!", [], []),
    ],
)
def test_failure_kinds(prediction, golds, expected):
    assert failure_kinds(prediction, golds, CONTEXT, QUESTION, NO_ANSWER) == expected
