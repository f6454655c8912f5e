"""Evaluation metrics as pure functions: SQuAD v1.1 / MLQA exact match and token F1, SQuAD v2
no-answer scores and AUROC, structured-output (JSON) scores, short-answer accuracy by group,
classification scores (per-class, macro and micro P/R/F1, confusion matrix), user metrics,
ROUGE-L, perplexity, percentiles, a stopword language guess and failure kinds for error analysis.

Stdlib only: the CLI imports this module, so it must load instantly.
Normalisation follows the official scripts: lang "en" is the SQuAD v1.1 evaluate script,
lang "es" is MLQA's Spanish branch (all Unicode punctuation, Spanish articles).
"""

import importlib
import json
import math
import os
import re
import string
import sys
import unicodedata
from collections import Counter, defaultdict

from kerasft.config import LANGUAGES
from kerasft.errors import KerasftError

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


# --- SQuAD v2: questions without an answer ---------------------------------------------------


def is_no_answer(prediction, no_answer_text, lang="es"):
    """True when the prediction is the configured no-answer text (after normalisation)."""
    return normalize_answer(prediction, lang) == normalize_answer(no_answer_text, lang)


def squad_v2_scores(predictions, references, no_answer_text, lang="es"):
    """SQuAD v2 scores where "no answer" is a response text rather than an empty string.

    An unanswerable question (empty gold list) scores EM = F1 = 1 when the prediction is the
    no-answer text and 0 otherwise; an answerable one scores 0 when the prediction is the
    no-answer text, else the usual best-over-golds EM and F1. No-answer detection treats
    "predicted no answer" as the positive class.

    Args:
        predictions: Question id -> predicted text (a missing id counts as an empty answer).
        references: Question id -> gold texts; an empty list marks an unanswerable question.
        no_answer_text: The response the model was trained to give when there is no answer.
        lang: Normalisation language.

    Returns:
        Percentages exact_match, f1 (all questions), has_answer_exact_match / has_answer_f1,
        no_answer_exact_match / no_answer_f1 (None when that group is empty),
        no_answer_precision / no_answer_recall (None when undefined), and the counts
        count, has_answer_count, no_answer_count, predicted_no_answer.

    Raises:
        ValueError: If references is empty or lang is not supported.
    """
    _check_lang(lang)
    if not references:
        raise ValueError("no reference questions to score")
    sums = {"has": [0.0, 0.0, 0], "no": [0.0, 0.0, 0]}
    predicted_no = true_no = 0
    for question_id, golds in references.items():
        prediction = predictions.get(question_id, "")
        abstained = is_no_answer(prediction, no_answer_text, lang)
        predicted_no += abstained
        if golds:
            group = sums["has"]
            em = 0.0 if abstained else best_over_golds(exact_match, prediction, golds, lang)
            f = 0.0 if abstained else best_over_golds(f1, prediction, golds, lang)
        else:
            group = sums["no"]
            em = f = float(abstained)
            true_no += abstained
        group[0] += em
        group[1] += f
        group[2] += 1

    def percent(total, count):
        return 100.0 * total / count if count else None

    has_em, has_f1, has_n = sums["has"]
    no_em, no_f1, no_n = sums["no"]
    count = has_n + no_n
    return {
        "exact_match": percent(has_em + no_em, count),
        "f1": percent(has_f1 + no_f1, count),
        "has_answer_exact_match": percent(has_em, has_n),
        "has_answer_f1": percent(has_f1, has_n),
        "no_answer_exact_match": percent(no_em, no_n),
        "no_answer_f1": percent(no_f1, no_n),
        "no_answer_precision": percent(true_no, predicted_no),
        "no_answer_recall": percent(true_no, no_n),
        "count": count,
        "has_answer_count": has_n,
        "no_answer_count": no_n,
        "predicted_no_answer": predicted_no,
    }


def auroc(scores, labels):
    """Area under the ROC curve: the probability that a random positive scores above a random
    negative, ties counting one half (the Mann-Whitney U statistic).

    Args:
        scores: Higher means "more likely positive".
        labels: Truthy for positives, same length as scores.

    Returns:
        The AUROC in [0, 1], or None when there are no positives or no negatives.
    """
    if len(scores) != len(labels):
        raise ValueError(f"{len(scores)} scores but {len(labels)} labels")
    pairs = sorted(zip(scores, labels), key=lambda pair: pair[0])
    positives = sum(1 for _, label in pairs if label)
    negatives = len(pairs) - positives
    if not positives or not negatives:
        return None
    # Average ranks (1-based) over tied scores, then U = rank sum of positives - n+(n+ + 1)/2.
    rank_sum = 0.0
    start = 0
    while start < len(pairs):
        end = start
        while end + 1 < len(pairs) and pairs[end + 1][0] == pairs[start][0]:
            end += 1
        average_rank = (start + end) / 2 + 1
        rank_sum += average_rank * sum(1 for _, label in pairs[start : end + 1] if label)
        start = end + 1
    return (rank_sum - positives * (positives + 1) / 2) / (positives * negatives)


# --- structured output (JSON) ----------------------------------------------------------------

_CODE_FENCE = re.compile(r"^```(?:json)?\s*\n?(.*?)\n?```$", re.DOTALL)


def parse_json_output(text):
    """Parses a model's JSON answer; a surrounding ``` or ```json fence is allowed.

    Returns:
        (True, value) when the text is JSON, else (False, None).
    """
    text = text.strip()
    fenced = _CODE_FENCE.match(text)
    if fenced:
        text = fenced.group(1).strip()
    try:
        return True, json.loads(text)
    except (json.JSONDecodeError, RecursionError):
        return False, None


def json_scores(predictions, golds, validate=None):
    """Parse rate, schema validity, whole-object exact match and per-field accuracy.

    Args:
        predictions: Id -> generated text.
        golds: Id -> the gold value (parsed JSON, usually an object).
        validate: Optional callable value -> bool (e.g. a JSON-schema check); without it the
            schema_valid rate is None.

    Returns:
        Percentages parse_rate, schema_valid, exact_match; field_accuracy: top-level key of the
        gold objects -> percentage of examples having that key whose prediction parsed to an
        object with an equal value there; count.
    """
    if not golds:
        raise ValueError("no gold answers to score")
    parsed = valid = exact = 0
    field_hits, field_totals = Counter(), Counter()
    for example_id, gold in golds.items():
        ok, value = parse_json_output(predictions.get(example_id, ""))
        parsed += ok
        if ok and validate is not None:
            valid += bool(validate(value))
        exact += ok and _same_json(value, gold)
        if isinstance(gold, dict):
            for key, gold_value in gold.items():
                field_totals[key] += 1
                field_hits[key] += ok and isinstance(value, dict) and key in value and _same_json(value[key], gold_value)
    count = len(golds)
    return {
        "parse_rate": 100.0 * parsed / count,
        "schema_valid": 100.0 * valid / count if validate is not None else None,
        "exact_match": 100.0 * exact / count,
        "field_accuracy": {key: 100.0 * field_hits[key] / field_totals[key] for key in field_totals},
        "count": count,
    }


def _same_json(a, b):
    """JSON equality, recursively: 1 == 1.0, but true != 1 and [1] != {"0": 1}."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same_json(a[key], b[key]) for key in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same_json(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    return type(a) is type(b) and a == b


# --- short answers ---------------------------------------------------------------------------


_DIGIT_SEPARATOR = re.compile(r"(?<=\d)[.,:'](?=\d)")
_NUMBER = re.compile(r"\d+")


def numbers_in(text):
    """The numbers written in digits in a text, as digit strings with the separators inside them
    removed (1.080 -> 1080, 14:00 -> 1400), so the two ways of writing one amount compare equal."""
    return _NUMBER.findall(_DIGIT_SEPARATOR.sub("", text))


_UNITS = {
    "es": ["cero", "uno", "dos", "tres", "cuatro", "cinco", "seis", "siete", "ocho", "nueve", "diez", "once", "doce",
           "trece", "catorce", "quince", "dieciséis", "diecisiete", "dieciocho", "diecinueve", "veinte", "veintiuno",
           "veintidós", "veintitrés", "veinticuatro", "veinticinco", "veintiséis", "veintisiete", "veintiocho",
           "veintinueve"],
    "en": ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
           "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"],
}
_TENS = {
    "es": {"treinta": 30, "cuarenta": 40, "cincuenta": 50, "sesenta": 60, "setenta": 70, "ochenta": 80, "noventa": 90},
    "en": {"twenty": 20, "thirty": 30, "forty": 40, "fifty": 50, "sixty": 60, "seventy": 70, "eighty": 80, "ninety": 90},
}
_HUNDREDS = {"es": {"cien": 100, "mil": 1000}, "en": {"hundred": 100, "thousand": 1000}}


def _number_word_table(lang):
    """Spoken number word -> value for 0-99 (Spanish also without accents), plus 100 and 1000."""
    table = {word: value for value, word in enumerate(_UNITS[lang])}
    table.update({_strip_accents(word): value for word, value in table.items()})
    table.update(_TENS[lang])
    table.update(_HUNDREDS[lang])
    return table


def _strip_accents(word):
    return "".join(char for char in unicodedata.normalize("NFD", word) if unicodedata.category(char) != "Mn")


_NUMBER_WORDS = {lang: _number_word_table(lang) for lang in LANGUAGES}
_COMPOUND = {  # "treinta y dos", "forty-two", "forty two": tens, joiner, unit 1-9
    lang: re.compile(r"\b(" + "|".join(_TENS[lang]) + r")(?:\s+y\s+|-|\s+)(" + "|".join(_UNITS[lang][1:10]) + r")\b",
                     re.IGNORECASE)
    for lang in LANGUAGES
}


def number_words_to_digits(text, lang="es"):
    """Writes the spoken numbers of a text in digits ("siete" -> "7", "treinta y dos" -> "32",
    "forty-two" -> "42"), so a short answer given in digits matches a gold written in words and
    back. "un"/"una" stay words: in Spanish they are mostly articles."""
    _check_lang(lang)
    table = _NUMBER_WORDS[lang]
    text = _COMPOUND[lang].sub(lambda m: str(table[m.group(1).lower()] + table[m.group(2).lower()]), text)
    return re.sub(r"\w+", lambda m: str(table.get(m.group(0).lower(), m.group(0))), text)


def short_answer_correct(prediction, golds, threshold=0.5, lang="es"):
    """Whether a short answer counts as correct: token F1 >= threshold against some gold, and every
    number that gold writes in digits appears in the prediction. Without the number rule, "540 €"
    for a gold "1.080 €" has F1 0.5 from the shared "€" and passes at the usual threshold. Numbers
    written in words count as the same number in digits ("7" answers "siete")."""
    prediction = number_words_to_digits(prediction, lang)
    for gold in golds:
        gold = number_words_to_digits(gold, lang)
        if f1(prediction, gold, lang) >= threshold and set(numbers_in(gold)) <= set(numbers_in(prediction)):
            return True
    return False


def short_answer_scores(predictions, references, groups=None, threshold=0.5, lang="es"):
    """Normalised exact match, mean token F1 and accuracy (short_answer_correct: F1 >= threshold and
    the gold's numbers present), overall and by group.

    Args:
        predictions: Id -> predicted text (missing ids score 0).
        references: Id -> gold texts (best over golds).
        groups: Optional id -> {column: value} (an Example's meta); each column is broken down
            by its values. Ids without a column are left out of that column's breakdown.
        threshold: Token F1 at or above which an answer with the gold's numbers counts as correct.
        lang: Normalisation language.

    Returns:
        {"exact_match", "f1", "accuracy" (percentages), "count", "by": {column: {value:
        {"exact_match", "f1", "accuracy", "count"}}}}.
    """
    _check_lang(lang)
    if not references:
        raise ValueError("no reference answers to score")
    per_example = {}
    for example_id, gold in references.items():
        prediction = predictions.get(example_id, "")
        em = best_over_golds(exact_match, prediction, gold, lang)
        f = best_over_golds(f1, prediction, gold, lang)
        per_example[example_id] = (em, f, float(short_answer_correct(prediction, gold, threshold, lang)))

    def summary(ids):
        n = len(ids)
        em, f, acc = (sum(per_example[i][k] for i in ids) for k in range(3))
        return {"exact_match": 100.0 * em / n, "f1": 100.0 * f / n, "accuracy": 100.0 * acc / n, "count": n}

    result = summary(list(per_example))
    by = defaultdict(lambda: defaultdict(list))
    for example_id, columns in (groups or {}).items():
        if example_id in per_example:
            for column, value in columns.items():
                by[column][str(value)].append(example_id)
    result["by"] = {column: {value: summary(ids) for value, ids in sorted(values.items())}
                    for column, values in sorted(by.items())}
    return result


# --- classification ---------------------------------------------------------------------------


def normalize_label(text):
    """A label or a generated answer reduced for comparison: accents removed (ñ too), case folded,
    underscores and hyphens read as spaces, punctuation dropped, whitespace collapsed.
    "  Envío." , "ENVIO" and "envio!" all become "envio"; "estado_envío" becomes "estado envio"."""
    text = _strip_accents(unicodedata.normalize("NFKC", text)).casefold().replace("_", " ").replace("-", " ")
    text = "".join(char for char in text if not _is_mlqa_punctuation(char))
    return " ".join(text.split())


def match_label(prediction, labels):
    """The label of `labels` that the whole prediction names after normalize_label, or None
    (an invalid answer: empty, another word, a label with more text around it)."""
    wanted = normalize_label(prediction)
    return next((label for label in labels if normalize_label(label) == wanted), None) if wanted else None


def _ratio(numerator, denominator):
    # An undefined precision (a class never predicted) or recall counts as 0, as in
    # scikit-learn's zero_division=0: a class the model never names cannot raise the macro mean.
    return numerator / denominator if denominator else 0.0


def _f1(precision, recall):
    return 2 * precision * recall / (precision + recall) if precision + recall else 0.0


def classification_scores(predictions, golds, labels):
    """Accuracy, per-class and macro/micro precision, recall and F1, invalid answers and the
    confusion matrix of generated labels.

    A prediction is mapped to a label with match_label; one that names no label is "invalid": it
    is wrong (a false negative of its gold class) but a false positive of no class. Hence micro
    recall equals accuracy, and micro precision is the accuracy over the valid answers only.
    Macro scores are unweighted means over `labels` of the per-class scores (macro F1 is the
    mean of the per-class F1s, not the F1 of macro P and R).

    Args:
        predictions: Id -> generated text (a missing id counts as an empty, invalid answer).
        golds: Id -> gold label, each one of `labels`.
        labels: The label set, in report order.

    Returns:
        {"accuracy", "macro_precision", "macro_recall", "macro_f1", "micro_precision",
        "micro_recall", "micro_f1"} as percentages; "invalid" and "count"; "per_class": label ->
        {"precision", "recall", "f1" (percentages), "support"}; "confusion": {"labels": the gold
        rows, "predicted": the columns (labels, then "invalid"), "matrix": counts [gold][predicted]};
        "predicted": id -> the matched label or None.

    Raises:
        ValueError: If golds is empty, labels has duplicates after normalisation, or a gold
            label is not in labels.
    """
    if not golds:
        raise ValueError("no gold labels to score")
    labels = list(labels)
    if len({normalize_label(label) for label in labels}) != len(labels):
        raise ValueError(f"labels {labels} are not distinct after normalisation")
    index = {label: i for i, label in enumerate(labels)}
    matrix = [[0] * (len(labels) + 1) for _ in labels]
    predicted = {}
    for example_id, gold in golds.items():
        if gold not in index:
            raise ValueError(f"{example_id}: gold label {gold!r} is not one of {labels}")
        label = match_label(predictions.get(example_id, ""), labels)
        predicted[example_id] = label
        matrix[index[gold]][index[label] if label is not None else len(labels)] += 1
    count = len(golds)
    per_class = {}
    true_positives = predicted_valid = 0
    for i, label in enumerate(labels):
        tp = matrix[i][i]
        column = sum(row[i] for row in matrix)
        support = sum(matrix[i])
        precision, recall = _ratio(tp, column), _ratio(tp, support)
        per_class[label] = {"precision": 100.0 * precision, "recall": 100.0 * recall,
                            "f1": 100.0 * _f1(precision, recall), "support": support}
        true_positives += tp
        predicted_valid += column
    invalid = count - predicted_valid
    micro_precision, micro_recall = _ratio(true_positives, predicted_valid), true_positives / count
    return {
        "accuracy": 100.0 * true_positives / count,
        "macro_precision": sum(c["precision"] for c in per_class.values()) / len(labels),
        "macro_recall": sum(c["recall"] for c in per_class.values()) / len(labels),
        "macro_f1": sum(c["f1"] for c in per_class.values()) / len(labels),
        "micro_precision": 100.0 * micro_precision,
        "micro_recall": 100.0 * micro_recall,
        "micro_f1": 100.0 * _f1(micro_precision, micro_recall),
        "invalid": invalid,
        "count": count,
        "per_class": per_class,
        "confusion": {"labels": labels, "predicted": [*labels, "invalid"], "matrix": matrix},
        "predicted": predicted,
    }


# --- user metrics ------------------------------------------------------------------------------


def load_metric_function(spec):
    """Imports the user metric "package.module:function" and returns the function.

    The working directory is searched after sys.path, so a metrics.py next to the config works.

    Raises:
        KerasftError: One line naming the function, when the module cannot be imported (or fails
            while importing), has no such attribute, or the attribute is not callable.
    """
    module_name, _, function_name = spec.partition(":")
    if not module_name or not function_name:
        raise KerasftError(f"eval.metrics: {spec!r} is not of the form package.module:function")
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.append(cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as error:  # an import error or any error the module raises while importing
        raise KerasftError(f"eval.metrics: {spec}: cannot import {module_name}: "
                           f"{type(error).__name__}: {_one_line(error)}") from None
    finally:
        if added:
            sys.path.remove(cwd)
    function = getattr(module, function_name, None)
    if function is None:
        raise KerasftError(f"eval.metrics: {spec}: module {module_name} has no attribute {function_name!r}")
    if not callable(function):
        raise KerasftError(f"eval.metrics: {spec}: {function_name} is not callable ({type(function).__name__})")
    return function


def custom_metric_mean(spec, function, predictions, references, examples):
    """The mean of a user metric over the examples, and its value for each.

    Args:
        spec: "package.module:function", for messages.
        function: (prediction, reference, example) -> int or float (not bool, finite).
        predictions, references: one text per example, in order.
        examples: one dict per example (passed as `example`).

    Returns:
        (mean, values).

    Raises:
        KerasftError: One line naming the function and the example index when the function
            raises or returns something other than a finite number.
    """
    if not examples:
        raise ValueError("no examples to score")
    values = []
    for index, (prediction, reference, example) in enumerate(zip(predictions, references, examples)):
        try:
            value = function(prediction, reference, example)
        except Exception as error:
            raise KerasftError(f"eval.metrics: {spec} raised on example {index} ({example.get('id')}): "
                               f"{type(error).__name__}: {_one_line(error)}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise KerasftError(f"eval.metrics: {spec} returned {_one_line(repr(value))} on example {index} "
                               f"({example.get('id')}); expected a finite number")
        values.append(float(value))
    return sum(values) / len(values), values


def _one_line(value, limit=200):
    text = " ".join(str(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


# --- text: ROUGE-L and perplexity ------------------------------------------------------------

_WORD = re.compile(r"\w+", re.UNICODE)


def rouge_tokens(text):
    """Lowercased word tokens (Unicode letters and digits), as ROUGE compares them."""
    return _WORD.findall(text.lower())


def lcs_length(a, b):
    """Length of the longest common subsequence of two sequences (O(len(a) * len(b)))."""
    if len(a) < len(b):
        a, b = b, a
    previous = [0] * (len(b) + 1)
    for x in a:
        current = [0]
        for j, y in enumerate(b):
            current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
        previous = current
    return previous[-1]


def rouge_l(prediction, reference):
    """ROUGE-L F1 of one prediction against one reference: LCS precision and recall over words.

    Returns:
        {"precision", "recall", "f1"} in [0, 1]; all 0 when either side has no words.
    """
    pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
    lcs = lcs_length(pred, ref)
    if not lcs:
        return {"precision": 0.0, "recall": 0.0, "f1": 0.0}
    precision, recall = lcs / len(pred), lcs / len(ref)
    return {"precision": precision, "recall": recall, "f1": 2 * precision * recall / (precision + recall)}


def perplexity(nll_sum, token_count):
    """exp(total negative log-likelihood / number of scored tokens)."""
    if token_count <= 0:
        raise ValueError("perplexity needs at least one scored token")
    return math.exp(nll_sum / token_count)


# --- system ----------------------------------------------------------------------------------


def percentile(values, q):
    """The q-th percentile (0-100) with linear interpolation between order statistics, as
    numpy's default method computes it."""
    if not values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile {q} is outside 0-100")
    ordered = sorted(values)
    position = (len(ordered) - 1) * q / 100
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# --- error analysis --------------------------------------------------------------------------

# Frequent function words that exist in one language only (no "a", "no", "me", "he", "son").
_STOPWORDS = {
    "es": frozenset(
        "el la los las un una unos unas del al de que y en por para con sin se es está están son fue "
        "era pero como más muy ya también porque cuando donde qué cuál quién cómo dónde este esta "
        "estos estas ese esa hay su sus lo le les nos yo tú él ella ellos ellas sí ha han".split()
    ),
    "en": frozenset(
        "the of and to in is are was were be been that this these those with for on at by from it "
        "its as an or but not which who what where when how there their they he she we you has have "
        "had will would can could do does did".split()
    ),
}


def guess_language(text):
    """"es", "en" or "unknown" from counts of language-specific stopwords.

    Short answers ("Madrid", "1492") carry no stopwords and come back "unknown"; a tie is
    "unknown" too.
    """
    words = rouge_tokens(text)
    es = sum(word in _STOPWORDS["es"] for word in words)
    en = sum(word in _STOPWORDS["en"] for word in words)
    if es == en:
        return "unknown"
    return "es" if es > en else "en"


FAILURE_KINDS = ("empty", "not_in_context", "too_long", "wrong_language", "missed_no_answer", "false_no_answer")


def failure_kinds(prediction, golds, context="", question="", no_answer_text="", lang="es", max_ratio=3.0):
    """Why an answer may have failed; an empty list when none of the checks fires.

    Kinds: "empty" (nothing but whitespace), "not_in_context" (an extractive answer whose
    normalised text is not inside the normalised context), "too_long" (more than max_ratio
    times as many words as the longest gold, and at least 3 more), "wrong_language" (the
    question is guessed Spanish and the answer English, or the reverse), "missed_no_answer"
    (answered an unanswerable question), "false_no_answer" (said the no-answer text to an
    answerable one).
    """
    kinds = []
    if not prediction.strip():
        return ["empty"]
    abstained = bool(no_answer_text) and is_no_answer(prediction, no_answer_text, lang)
    if no_answer_text and not golds and not abstained:
        kinds.append("missed_no_answer")
    if golds and abstained:
        kinds.append("false_no_answer")
    if abstained:
        return kinds
    if context and normalize_answer(prediction, lang) not in normalize_answer(context, lang):
        kinds.append("not_in_context")
    if golds:
        words = len(prediction.split())
        longest = max(len(gold.split()) for gold in golds)
        if words > max_ratio * longest and words >= longest + 3:
            kinds.append("too_long")
    asked, answered = guess_language(question), guess_language(prediction)
    if "unknown" not in (asked, answered) and asked != answered:
        kinds.append("wrong_language")
    return kinds
