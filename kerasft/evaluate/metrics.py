"""Extractive question-answering metrics: SQuAD v1.1 / MLQA exact match and token F1.

Pure functions and stdlib only: the CLI imports this module, so it must load instantly.
Normalisation follows the official scripts: lang "en" is the SQuAD v1.1 evaluate script,
lang "es" is MLQA's Spanish branch (all Unicode punctuation, Spanish articles).
"""

import json
import re
import string
import unicodedata
from collections import Counter

from kerasft.errors import KerasftError

LANGUAGES = ("es", "en")

_ASCII_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = {
    "en": re.compile(r"\b(a|an|the)\b"),
    "es": re.compile(r"\b(un|una|unos|unas|el|la|los|las)\b"),
}


def _check_lang(lang):
    if lang not in _ARTICLES:
        raise ValueError(f"unknown language {lang!r}; expected one of {', '.join(LANGUAGES)}")


def _is_mlqa_punctuation(char):
    # MLQA precomputes every category-P code point plus string.punctuation; asking
    # unicodedata per character gives the same set without a 1.1M-entry table at import.
    return char in _ASCII_PUNCTUATION or unicodedata.category(char).startswith("P")


def normalize_answer(text, lang="es"):
    """Normalises an answer the way the official SQuAD v1.1 / MLQA scripts do.

    Lowercase, remove punctuation, remove articles, collapse whitespace, in that order.
    Accents are kept.

    Args:
        text: The answer text.
        lang: "es" (MLQA Spanish: all Unicode punctuation, un/una/unos/unas/el/la/los/las)
            or "en" (SQuAD v1.1: string.punctuation, a/an/the).

    Returns:
        The normalised text, tokens separated by single spaces.

    Raises:
        ValueError: If lang is not supported.
    """
    _check_lang(lang)
    text = text.lower()
    if lang == "es":
        text = "".join(char for char in text if not _is_mlqa_punctuation(char))
    else:
        text = "".join(char for char in text if char not in _ASCII_PUNCTUATION)
    text = _ARTICLES[lang].sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction, gold, lang="es"):
    """Returns 1.0 if prediction and gold are equal after normalisation, else 0.0."""
    return float(normalize_answer(prediction, lang) == normalize_answer(gold, lang))


def f1(prediction, gold, lang="es"):
    """Token-level F1 between normalised prediction and gold (0.0 when no token is shared).

    As in SQuAD v1.1, two answers that normalise to nothing score 0.0, not 1.0.
    """
    prediction_tokens = normalize_answer(prediction, lang).split()
    gold_tokens = normalize_answer(gold, lang).split()
    num_same = sum((Counter(prediction_tokens) & Counter(gold_tokens)).values())
    if num_same == 0:
        return 0.0
    precision = num_same / len(prediction_tokens)
    recall = num_same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def best_over_golds(metric, prediction, golds, lang="es"):
    """Returns the best score of metric(prediction, gold, lang) over the gold answers.

    Raises:
        ValueError: If golds is empty.
    """
    if not golds:
        raise ValueError("no gold answers to compare against")
    return max(metric(prediction, gold, lang) for gold in golds)


def squad_scores(predictions, references, lang="es"):
    """Scores predictions against references like the official SQuAD v1.1 script.

    Every reference question counts; a question with no prediction scores 0. Predictions
    for ids not in references are ignored.

    Args:
        predictions: Question id -> predicted answer text.
        references: Question id -> list of gold answer texts.
        lang: Normalisation language, see normalize_answer.

    Returns:
        {"exact_match": float, "f1": float, "count": int, "missing": int}; exact_match
        and f1 are percentages (0-100), count is the number of reference questions and
        missing how many of them had no prediction.

    Raises:
        ValueError: If references is empty or lang is not supported.
    """
    _check_lang(lang)
    if not references:
        raise ValueError("no reference questions to score")
    total_em = total_f1 = 0.0
    missing = 0
    for question_id, golds in references.items():
        if question_id not in predictions:
            missing += 1
            continue
        prediction = predictions[question_id]
        total_em += best_over_golds(exact_match, prediction, golds, lang)
        total_f1 += best_over_golds(f1, prediction, golds, lang)
    count = len(references)
    return {
        "exact_match": 100.0 * total_em / count,
        "f1": 100.0 * total_f1 / count,
        "count": count,
        "missing": missing,
    }


def _read_json(path):
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except FileNotFoundError:
        raise KerasftError(f"{path}: file not found") from None
    except IsADirectoryError:
        raise KerasftError(f"{path}: is a directory, expected a JSON file") from None
    except UnicodeDecodeError as error:
        raise KerasftError(f"{path}: not UTF-8 text (byte {error.start})") from None
    except json.JSONDecodeError as error:
        raise KerasftError(
            f"{path}: invalid JSON at line {error.lineno}, column {error.colno}: {error.msg}"
        ) from None
    except OSError as error:
        raise KerasftError(f"{path}: cannot read: {error.strerror}") from None


# JSON names, so messages speak the file's language rather than Python's.
_JSON_TYPE_NAMES = {
    dict: "an object", list: "a list", str: "a string", int: "a number", float: "a number",
    bool: "a boolean", type(None): "null",
}


def _type_name(value):
    return _JSON_TYPE_NAMES.get(type(value), type(value).__name__)


def _require(path, where, container, key, expected_type):
    """Returns container[key], checked to be of expected_type, or raises naming where."""
    if key not in container:
        raise KerasftError(f"{path}: {where}: missing {key!r}")
    value = container[key]
    if not isinstance(value, expected_type):
        expected = _JSON_TYPE_NAMES[expected_type]
        raise KerasftError(f"{path}: {where}.{key}: expected {expected}, got {_type_name(value)}")
    return value


def _require_object(path, where, value):
    if not isinstance(value, dict):
        raise KerasftError(f"{path}: {where}: expected an object, got {_type_name(value)}")
    return value


def load_squad_references(path):
    """Reads gold answers from a SQuAD v1.1 JSON file.

    Args:
        path: File with {"data": [{"paragraphs": [{"qas": [{"id", "answers": [{"text"}]}]}]}]}.

    Returns:
        Question id -> list of gold answer texts, in file order.

    Raises:
        KerasftError: If the file is missing, is not valid JSON (line and column given), or
            lacks a key (its path given, e.g. "data[0].paragraphs[2].qas[1]: missing 'id'"),
            or a question has no answers or a duplicate id.
    """
    root = _require_object(path, "top level", _read_json(path))
    references = {}
    for i, article in enumerate(_require(path, "top level", root, "data", list)):
        where_article = f"data[{i}]"
        _require_object(path, where_article, article)
        for j, paragraph in enumerate(_require(path, where_article, article, "paragraphs", list)):
            where_paragraph = f"{where_article}.paragraphs[{j}]"
            _require_object(path, where_paragraph, paragraph)
            for k, qa in enumerate(_require(path, where_paragraph, paragraph, "qas", list)):
                where_qa = f"{where_paragraph}.qas[{k}]"
                _require_object(path, where_qa, qa)
                question_id = _require(path, where_qa, qa, "id", str)
                answers = _require(path, where_qa, qa, "answers", list)
                if not answers:
                    # SQuAD v2 unanswerable questions have no gold text to score against.
                    raise KerasftError(f"{path}: {where_qa}.answers: empty (id {question_id!r})")
                golds = []
                for m, answer in enumerate(answers):
                    where_answer = f"{where_qa}.answers[{m}]"
                    _require_object(path, where_answer, answer)
                    golds.append(_require(path, where_answer, answer, "text", str))
                if question_id in references:
                    raise KerasftError(f"{path}: {where_qa}: duplicate id {question_id!r}")
                references[question_id] = golds
    if not references:
        raise KerasftError(f"{path}: no questions found under data[].paragraphs[].qas[]")
    return references


def load_predictions(path):
    """Reads predictions from a JSON object mapping question id to answer text.

    Raises:
        KerasftError: If the file is missing, is not valid JSON (line and column given), is
            not an object, or maps an id to something other than a string.
    """
    predictions = _require_object(path, "top level", _read_json(path))
    for question_id, answer in predictions.items():
        if not isinstance(answer, str):
            raise KerasftError(
                f"{path}: [{question_id!r}]: expected a string, got {_type_name(answer)}"
            )
    return predictions


def score_files(predictions_path, references_path, lang="es"):
    """Loads a predictions file and a SQuAD v1.1 references file and scores them.

    Returns:
        The squad_scores dict: exact_match and f1 in percent, count and missing.
    """
    predictions = load_predictions(predictions_path)
    references = load_squad_references(references_path)
    return squad_scores(predictions, references, lang)
