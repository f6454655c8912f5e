"""eval.metrics "package.module:function": a user metric from a temporary module, its mean beside
the built-in metrics in the result, report.md, report.json and the metrics plot, and one-line
errors naming the function (and the example for a bad value). No model: a scripted one answers."""

import json
import math

import pytest

from kerasft.config import EvalConfig
from kerasft.config import DataConfig
from kerasft.data.records import Example
from kerasft.errors import KerasftError
from kerasft.evaluate import metrics
from kerasft.evaluate.evaluator import check_eval_config, evaluate
from kerasft.evaluate.report import write_report

USER_MODULE = '''
def length_ratio(prediction, reference, example):
    return len(prediction) / len(reference)

def mentions_id(prediction, reference, example):
    return 1 if example["id"] in prediction else 0

def says_text(prediction, reference, example):
    return "bad" if example["id"] == "q2" else 1.0

def says_true(prediction, reference, example):
    return True

def says_nan(prediction, reference, example):
    return float("nan")

def divides(prediction, reference, example):
    return 1 / len(prediction)

NOT_A_FUNCTION = 3
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """A module, unique to the test, defining the metrics above; its name."""
    name = f"user_metrics_{tmp_path.name.replace('-', '_')}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


class ScriptedModel:
    """The evaluator's model interface with one canned answer per prompt."""

    kind, template, name = "hf", "gemma", "scripted"

    def __init__(self, answers):
        self.answers = answers

    def encode_prompt_text(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(map(chr, ids))

    def prefill_seconds(self, prompts, rows, batch_size):
        return 0.01

    def generate(self, prompts, max_new_tokens, batch_size, sampling):
        texts = ["".join(map(chr, p)) for p in prompts]
        new = [[ord(c) for c in next(a for key, a in self.answers.items() if key in t)] for t in texts]
        return new, {"seconds": 0.01, "generated_tokens": sum(map(len, new)), "prompt_tokens": 0,
                     "batches": [(0.01, list(range(len(prompts))), None)]}


EXAMPLES = [Example("q1", "primera pregunta", "Madrid"), Example("q2", "segunda pregunta", "Lima"),
            Example("q3", "tercera pregunta", "Quito")]
MODEL = ScriptedModel({"primera": "Madrid", "segunda": "q2: Lima", "tercera": ""})


def test_load_and_average_by_hand(user_module):
    ratio = metrics.load_metric_function(f"{user_module}:length_ratio")
    mean, values = metrics.custom_metric_mean("m:f", ratio, ["abc", "a"], ["abcdef", "ab"], [{"id": "x"}, {"id": "y"}])
    assert values == [0.5, 0.5] and mean == 0.5
    mean, values = metrics.custom_metric_mean("m:f", lambda p, r, e: len(p), ["", "ab", "abcd"], ["", "", ""],
                                              [{}, {}, {}])
    assert values == [0.0, 2.0, 4.0] and mean == 2.0


def test_user_metric_is_reported_beside_the_built_in_ones(user_module, tmp_path):
    spec = f"{user_module}:mentions_id"
    cfg = EvalConfig(task="short_answer", metrics=("short_answer", spec, f"{user_module}:length_ratio"))
    result = evaluate(MODEL, EXAMPLES, cfg, DataConfig())
    assert result[spec] == pytest.approx(1 / 3)  # only "q2: Lima" names its example's id
    # "Madrid"/"Madrid" 1, "q2: Lima"/"Lima" 8/4, ""/"Quito" 0
    assert result[f"{user_module}:length_ratio"] == pytest.approx((1 + 8 / 4 + 0) / 3)
    assert "exact_match" in result and "f1" in result
    assert [row["custom"][spec] for row in result["examples"]] == [0.0, 1.0, 0.0]

    report = write_report(tmp_path / "report", {"base": result, "tuned": result})
    saved = json.loads((tmp_path / "report" / "report.json").read_text())
    assert saved["models"]["tuned"][spec] == pytest.approx(1 / 3)
    md = (tmp_path / "report" / "report.md").read_text()
    header = next(line for line in md.splitlines() if line.startswith("| model |"))
    assert header.endswith(f"| {spec} | {user_module}:length_ratio |") and "means of user metrics" in md
    assert "| tuned | 33.3 | 55.6 | 66.7 | 0.333 | 1.000 |" in md  # EM 1/3, F1 (1 + 2/3 + 0)/3, F1>=0.5 2/3
    assert "plots/metrics.png" in report["plots"]


def test_only_user_metrics_still_computes_every_built_in_group(user_module):
    cfg = EvalConfig(task="short_answer", metrics=(f"{user_module}:mentions_id",))
    result = evaluate(MODEL, EXAMPLES, cfg, DataConfig())
    assert {"exact_match", "f1", "accuracy", "system", f"{user_module}:mentions_id"} <= set(result)


@pytest.mark.parametrize("function, message", [
    ("says_text", r"eval\.metrics: {m}:says_text returned 'bad' on example 1 \(q2\); expected a finite number$"),
    ("says_true", r"{m}:says_true returned True on example 0 \(q1\)"),
    ("says_nan", r"{m}:says_nan returned nan on example 0 \(q1\)"),
    ("divides", r"{m}:divides raised on example 2 \(q3\): ZeroDivisionError: division by zero$"),
])
def test_bad_values_name_the_function_and_the_example(user_module, function, message):
    cfg = EvalConfig(task="short_answer", metrics=(f"{user_module}:{function}",))
    with pytest.raises(KerasftError, match=message.format(m=user_module)) as error:
        evaluate(MODEL, EXAMPLES, cfg, DataConfig())
    assert "\n" not in str(error.value)


def test_import_errors_are_one_line_and_name_the_function(user_module, tmp_path):
    (tmp_path / f"{user_module}_broken.py").write_text("import no_such_package_for_kerasft\n")
    cases = [
        ("no_such_module_kerasft:f", r"eval\.metrics: no_such_module_kerasft:f: cannot import no_such_module_kerasft: "
                                     r"ModuleNotFoundError"),
        (f"{user_module}_broken:f", rf"{user_module}_broken:f: cannot import {user_module}_broken: ModuleNotFoundError: "
                                    r"No module named 'no_such_package_for_kerasft'"),
        (f"{user_module}:absent", rf"{user_module}:absent: module {user_module} has no attribute 'absent'"),
        (f"{user_module}:NOT_A_FUNCTION", r"NOT_A_FUNCTION is not callable \(int\)"),
    ]
    for spec, message in cases:
        # check_eval_config runs before any model loads: the error comes first, in one line
        with pytest.raises(KerasftError, match=message) as error:
            check_eval_config(EvalConfig(task="qa", metrics=(spec,)))
        assert "\n" not in str(error.value)


def test_config_accepts_only_the_module_colon_function_form():
    assert EvalConfig(task="text", metrics=("rouge_l", "pkg.mod:fn")).metrics == ("rouge_l", "pkg.mod:fn")
    for bad in ("pkg.mod:", ":fn", "pkg..mod:fn", "pkg.mod:fn:x", "pkg mod:fn"):
        with pytest.raises(KerasftError, match="package.module:function"):
            EvalConfig(task="text", metrics=(bad,))
    with pytest.raises(KerasftError, match="'rouge' is not a metric of task text"):
        EvalConfig(task="text", metrics=("rouge",))
    assert math.isfinite(metrics.custom_metric_mean("m:f", lambda p, r, e: 1, ["x"], ["y"], [{}])[0])
