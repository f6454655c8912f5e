"""One evaluator for every task and every model source.

`evaluate(model, examples, cfg.eval, cfg.data)` generates answers for held-out examples, scores
them with the task's metrics (kerasft.evaluate.metrics) and keeps every example's prompt, gold,
prediction, score and failure kinds for the report. `model` is a KerasModel (a keras-hub preset
or a run dir's base + adapter) or an HFModel (a Hugging Face folder run in transformers);
`open_model(src)` picks the right one.
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

from kerasft.config import TASK_METRICS
from kerasft.data.template import example_prompt_ids, render_chat
from kerasft.errors import KerasftError
from kerasft.evaluate import metrics
from kerasft.evaluate.generate import HFModel, KerasModel, Sampling
from kerasft.models.presets import load_source
from kerasft.runtime import peak_rss_bytes, reset_peak_rss

DEFAULT_NO_ANSWER = "Sin respuesta"
# Extra per metric group that needs one (checked before anything slow starts).
_NEEDS = {"bleu": ("sacrebleu", "BLEU"), "chrf": ("sacrebleu", "chrF"), "schema": ("jsonschema", "eval.schema")}


def check_eval_config(eval_cfg) -> None:
    """Fails early, in one line, when a configured metric needs a missing extra or file, or a
    user metric (package.module:function) cannot be loaded."""
    custom_metrics(eval_cfg)
    wanted = metrics_for(eval_cfg)
    for name, (module, what) in _NEEDS.items():
        if name in wanted and (name != "schema" or eval_cfg.schema) and importlib.util.find_spec(module) is None:
            raise KerasftError(f"{what} needs {module}: pip install 'kerasft[eval]' (or leave {name} out of eval.metrics)")
    if "schema" in metrics_for(eval_cfg) and eval_cfg.schema and not Path(eval_cfg.schema).is_file():
        raise KerasftError(f"eval.schema: {eval_cfg.schema}: file not found")


def metrics_for(eval_cfg) -> tuple[str, ...]:
    """The built-in metric groups to compute: those in eval.metrics, or every metric the task
    declares when eval.metrics names none (it may name only user metrics)."""
    return tuple(name for name in eval_cfg.metrics if ":" not in name) or TASK_METRICS[eval_cfg.task]


def custom_metrics(eval_cfg) -> dict:
    """The user metrics of eval.metrics: "package.module:function" -> the loaded function."""
    return {spec: metrics.load_metric_function(spec) for spec in eval_cfg.metrics if ":" in spec}


def open_model(src: str, name: str = ""):
    """A KerasModel for a keras-hub preset string or a run dir (base + adapter), or an HFModel
    for a Hugging Face folder (its config.json has a model_type), run in transformers."""
    config = Path(src) / "config.json"
    if config.is_file():
        try:
            is_hf = "model_type" in json.loads(config.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise KerasftError(f"{config}: not a JSON config: {err}") from None
        if is_hf:
            return HFModel(src, name=name or src)

    loaded, _ = load_source(src)
    return KerasModel(loaded.backbone, loaded.tokenizer, name=name or src)


def prompt_ids(model, example, data_cfg) -> list[int]:
    """The example's prompt rendered exactly as training renders it, in the model's tokenizer."""
    system = example.system or data_cfg.system
    template = getattr(data_cfg, "template", "auto")
    if template == "auto":
        template = getattr(model, "template", "gemma")
    if model.kind == "keras":
        return example_prompt_ids(model.tokens, example, data_cfg)
    return model.encode_prompt_text(render_chat(example.prompt, None, system, example.history, template))


def evaluate(model, examples, eval_cfg, data_cfg) -> dict:
    """Generates answers for `examples` and scores them with the task's metrics.

    Args:
        model: a KerasModel or HFModel (see open_model).
        eval_cfg: kerasft.config.EvalConfig; data_cfg: kerasft.config.DataConfig (system prompt,
            template, no-answer text).

    Returns:
        {"task", "model", "count", metric name -> value (percentages for rates), "by" (per-group
        breakdowns), "failures" (kind -> count), "system" (latency, tokens/s, memory),
        "examples": [{"id", "prompt", "gold", "prediction", "score", "failures", "meta"}]}.
    """
    if not examples:
        raise KerasftError("evaluation: no held-out examples")
    wanted = metrics_for(eval_cfg)
    prompts = [prompt_ids(model, ex, data_cfg) for ex in examples]
    sampling = Sampling(eval_cfg.temperature, eval_cfg.top_k, eval_cfg.top_p, eval_cfg.seed)
    result = {"task": eval_cfg.task, "model": model.name, "source": model.kind, "count": len(examples),
              "lang": eval_cfg.lang, "by": {}, "failures": {}}
    predictions = {}
    timing = None
    # Peak memory is this evaluation's own, not that of training earlier in the same process.
    peak_since = "evaluation" if reset_peak_rss() else "process start"
    if wanted != ("perplexity",):
        new_ids, timing = model.generate(prompts, eval_cfg.max_new_tokens, eval_cfg.batch_size, sampling)
        predictions = {ex.id: model.decode(ids).strip() for ex, ids in zip(examples, new_ids)}
    scores = _TASKS[eval_cfg.task](model, examples, prompts, predictions, eval_cfg, data_cfg, wanted, result)
    custom = _custom_scores(examples, predictions, eval_cfg, data_cfg, result)
    if timing is not None:
        result["seconds"] = round(timing["seconds"], 2)
        result["generated_tokens"] = timing["generated_tokens"]
        if "system" in wanted:
            result["system"] = system_metrics(model, prompts, timing, eval_cfg.batch_size, peak_since)
    result["examples"] = _example_rows(examples, predictions, scores, eval_cfg, data_cfg, result.get("labels", ()))
    for row, ex in zip(result["examples"], examples):
        if custom:
            row["custom"] = {spec: values[ex.id] for spec, values in custom.items()}
    for row in result["examples"]:
        for kind in row["failures"]:
            result["failures"][kind] = result["failures"].get(kind, 0) + 1
    return result


def _qa(model, examples, prompts, predictions, eval_cfg, data_cfg, wanted, result) -> dict:
    no_answer = getattr(data_cfg, "no_answer", DEFAULT_NO_ANSWER)
    references = {ex.id: list(ex.answers) for ex in examples}
    headline = metrics.squad_v2_scores(predictions, references, no_answer, eval_cfg.lang)
    english = metrics.squad_v2_scores(predictions, references, no_answer, "en")
    result.update(f1=headline["f1"], exact_match=headline["exact_match"], f1_en=english["f1"],
                  exact_match_en=english["exact_match"])
    if "no_answer" in wanted:
        result.update({key: value for key, value in headline.items() if key.startswith(("has_answer", "no_answer"))})
        result["predicted_no_answer"] = headline["predicted_no_answer"]
    answerable = [ex.answerable for ex in examples]
    if "auroc" in wanted and any(answerable) and not all(answerable):
        result["answerability_auroc"] = answerability_auroc(model, examples, prompts, predictions, no_answer)
    per_example = {}
    for ex in examples:
        prediction = predictions.get(ex.id, "")
        if ex.answerable:
            per_example[ex.id] = 0.0 if metrics.is_no_answer(prediction, no_answer, eval_cfg.lang) else \
                metrics.best_over_golds(metrics.f1, prediction, list(ex.answers), eval_cfg.lang)
        else:
            per_example[ex.id] = float(metrics.is_no_answer(prediction, no_answer, eval_cfg.lang))
    return per_example


def answerability_auroc(model, examples, prompts, predictions, no_answer: str) -> float | None:
    """AUROC of "is answerable" from log p(greedy answer) - log p(no-answer text), both given
    the prompt (a forward pass each, summed over the response tokens)."""
    answers = [model.encode(predictions.get(ex.id, "")) for ex in examples]
    abstain = [model.encode(no_answer)] * len(examples)
    answer_lp = model.logprobs(prompts, answers, batch_size=16)
    abstain_lp = model.logprobs(prompts, abstain, batch_size=16)
    scores = [a[0] - b[0] for a, b in zip(answer_lp, abstain_lp)]
    return metrics.auroc(scores, [ex.answerable for ex in examples])


def _json(model, examples, prompts, predictions, eval_cfg, data_cfg, wanted, result) -> dict:
    golds = {}
    for ex in examples:
        ok, value = metrics.parse_json_output(ex.response)
        if not ok:
            raise KerasftError(f"{ex.origin or ex.id}: eval.task=json but the gold response is not JSON")
        golds[ex.id] = value
    validate = _schema_validator(eval_cfg.schema) if "schema" in wanted and eval_cfg.schema else None
    scores = metrics.json_scores(predictions, golds, validate)
    result.update(parse_rate=scores["parse_rate"], exact_match=scores["exact_match"])
    if validate is not None:
        result["schema_valid"] = scores["schema_valid"]
    result["by"]["field"] = {key: {"accuracy": value} for key, value in scores["field_accuracy"].items()}
    per_example = {}
    for ex_id, gold in golds.items():
        single = metrics.json_scores({ex_id: predictions.get(ex_id, "")}, {ex_id: gold})
        fields = single["field_accuracy"]
        per_example[ex_id] = 1.0 if single["exact_match"] else (sum(fields.values()) / len(fields) / 100 if fields else 0.0)
    return per_example


def _schema_validator(path: str):
    try:
        import jsonschema
    except ImportError:
        raise KerasftError("eval.schema needs jsonschema: pip install 'kerasft[eval]'") from None
    try:
        schema = json.loads(Path(path).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise KerasftError(f"eval.schema: {path}: file not found") from None
    except json.JSONDecodeError as err:
        raise KerasftError(f"eval.schema: {path}: invalid JSON at line {err.lineno}, column {err.colno}: {err.msg}") from None
    validator_cls = jsonschema.validators.validator_for(schema)
    try:
        validator_cls.check_schema(schema)
    except jsonschema.SchemaError as err:
        raise KerasftError(f"eval.schema: {path}: not a valid JSON schema: {err.message}") from None
    validator = validator_cls(schema)
    return validator.is_valid


def _short_answer(model, examples, prompts, predictions, eval_cfg, data_cfg, wanted, result) -> dict:
    references = {ex.id: list(ex.answers) or [ex.response] for ex in examples}
    groups = {ex.id: dict(ex.meta) for ex in examples if ex.meta}
    scores = metrics.short_answer_scores(predictions, references, groups, eval_cfg.threshold, eval_cfg.lang)
    result.update(exact_match=scores["exact_match"], f1=scores["f1"], accuracy=scores["accuracy"])
    result["by"] = scores["by"]
    return {ex_id: metrics.best_over_golds(metrics.f1, predictions.get(ex_id, ""), golds, eval_cfg.lang)
            for ex_id, golds in references.items()}


def _text(model, examples, prompts, predictions, eval_cfg, data_cfg, wanted, result) -> dict:
    if "perplexity" in wanted:
        # Held-out responses given their prompts: sum of token NLL over the number of tokens.
        scored = model.logprobs(prompts, [model.encode(ex.response) for ex in examples], eval_cfg.batch_size)
        tokens = sum(count for _, count in scored)
        result["perplexity"] = metrics.perplexity(-sum(total for total, _ in scored), tokens)
        result["eval_loss"] = -sum(total for total, _ in scored) / tokens
    if not predictions:
        return {ex.id: 0.0 for ex in examples}
    hypotheses = [predictions[ex.id] for ex in examples]
    references = [ex.response for ex in examples]
    if "bleu" in wanted or "chrf" in wanted:
        try:
            import sacrebleu
        except ImportError:
            raise KerasftError("BLEU/chrF need sacrebleu: pip install 'kerasft[eval]'") from None
        if "bleu" in wanted:
            result["bleu"] = sacrebleu.corpus_bleu(hypotheses, [references]).score
        if "chrf" in wanted:
            result["chrf"] = sacrebleu.corpus_chrf(hypotheses, [references]).score
    per_example = {ex.id: metrics.rouge_l(predictions[ex.id], ex.response)["f1"] for ex in examples}
    if "rouge_l" in wanted:
        result["rouge_l"] = 100.0 * sum(per_example.values()) / len(per_example)
    return per_example


def gold_label(example, eval_cfg) -> str:
    """The example's gold label: its response, or the eval.label_column metadata column."""
    if not eval_cfg.label_column:
        return example.response
    if eval_cfg.label_column not in example.meta:
        raise KerasftError(f"{example.origin or example.id}: eval.label_column {eval_cfg.label_column!r} is not a "
                           f"column of the example (keep it with data.columns.meta)")
    return str(example.meta[eval_cfg.label_column])


def label_set(examples, eval_cfg, data_cfg) -> list[str]:
    """The classification labels in report order: eval.labels, else data.labels, else the
    distinct gold labels of the examples, sorted."""
    return list(eval_cfg.labels or getattr(data_cfg, "labels", ()) or sorted({gold_label(ex, eval_cfg) for ex in examples}))


def _classification(model, examples, prompts, predictions, eval_cfg, data_cfg, wanted, result) -> dict:
    labels = label_set(examples, eval_cfg, data_cfg)
    golds = {}
    for ex in examples:
        gold = gold_label(ex, eval_cfg)
        if gold not in labels:
            raise KerasftError(f"{ex.origin or ex.id}: gold label {gold!r} is not in the label set "
                               f"({', '.join(labels)}); set eval.labels")
        golds[ex.id] = gold
    scores = metrics.classification_scores(predictions, golds, labels)
    result.update({key: scores[key] for key in ("accuracy", "macro_precision", "macro_recall", "macro_f1",
                                                "micro_precision", "micro_recall", "micro_f1", "invalid")})
    result["labels"] = labels
    result["by"]["class"] = scores["per_class"]
    result["confusion"] = scores["confusion"]
    return {ex_id: float(scores["predicted"][ex_id] == gold) for ex_id, gold in golds.items()}


def _custom_scores(examples, predictions, eval_cfg, data_cfg, result) -> dict:
    """Each user metric's mean into result (under its "package.module:function" name) and its
    per-example values, id -> value."""
    functions = custom_metrics(eval_cfg)
    if not functions:
        return {}
    references = [gold_label(ex, eval_cfg) if eval_cfg.task == "classification" else ex.response for ex in examples]
    rows = [{"id": ex.id, "prompt": ex.prompt, "response": ex.response, "answers": list(ex.answers),
             "context": ex.context, "system": ex.system or data_cfg.system, "meta": dict(ex.meta)} for ex in examples]
    texts = [predictions.get(ex.id, "") for ex in examples]
    per_example = {}
    for spec, function in functions.items():
        mean, values = metrics.custom_metric_mean(spec, function, texts, references, rows)
        result[spec] = mean
        per_example[spec] = {ex.id: value for ex, value in zip(examples, values)}
    return per_example


_TASKS = {"qa": _qa, "json": _json, "short_answer": _short_answer, "text": _text, "classification": _classification}


def system_metrics(model, prompts, timing: dict, batch_size: int, peak_since: str = "process start") -> dict:
    """Latency per example (Keras: from its prefill to its last token; transformers: its batch's
    wall time), prefill and decode tokens/s, peak memory.

    Prefill is timed as a separate forward pass over up to three batches of the run's prompts;
    decode time is the generation time less the prefill time that rate implies. The peak RSS
    counts from `peak_since` (see evaluate); the accelerator's peak, which JAX cannot reset,
    always counts from the process start.
    """
    batches = timing["batches"]
    latencies = [seconds for seconds, rows, _ in batches for _ in rows]
    # Whole prompt batches, not timing's entries: the Keras decode loop reports one entry per prompt.
    measured = [list(range(start, min(start + batch_size, len(prompts))))
                for start in range(0, len(prompts), batch_size)][:3]
    prefill_seconds = sum(model.prefill_seconds(prompts, rows, batch_size) for rows in measured)
    prefill_tokens = sum(len(prompts[i]) for rows in measured for i in rows)
    prefill_rate = prefill_tokens / prefill_seconds if prefill_seconds > 0 else None
    decode_seconds = timing["seconds"] - (timing["prompt_tokens"] / prefill_rate if prefill_rate else 0.0)
    stats = {
        "latency_p50_s": metrics.percentile(latencies, 50),
        "latency_p95_s": metrics.percentile(latencies, 95),
        "prefill_tokens_per_s": prefill_rate,
        "decode_tokens_per_s": timing["generated_tokens"] / decode_seconds if decode_seconds > 0 else None,
        "generate_seconds": timing["seconds"],
        "batches": len(batches),
        "peak_rss_mib": peak_rss_bytes() / 2**20,
        "peak_rss_since": peak_since,
        "device_peak_mib": None,
    }
    if "jax" in sys.modules:  # never import jax just to ask (the transformers path does not need it)
        device_stats = sys.modules["jax"].devices()[0].memory_stats() or {}
        if "peak_bytes_in_use" in device_stats:
            stats["device_peak_mib"] = device_stats["peak_bytes_in_use"] / 2**20
    return stats


def _example_rows(examples, predictions, scores, eval_cfg, data_cfg, labels=()) -> list[dict]:
    no_answer = getattr(data_cfg, "no_answer", DEFAULT_NO_ANSWER) if eval_cfg.task == "qa" else ""
    rows = []
    for ex in examples:
        prediction = predictions.get(ex.id, "")
        if eval_cfg.task == "classification":
            golds = [gold_label(ex, eval_cfg)]
            # a label answer is one word or two: only "empty" and "invalid_label" say anything about it
            failures = ["empty"] if not prediction.strip() else (
                ["invalid_label"] if metrics.match_label(prediction, labels) is None else [])
            rows.append({"id": ex.id, "prompt": ex.prompt, "gold": golds[0], "prediction": prediction,
                         "score": scores.get(ex.id, 0.0), "failures": failures, "meta": dict(ex.meta)})
            continue
        golds = list(ex.answers) if eval_cfg.task == "qa" else [ex.response]
        failures = metrics.failure_kinds(prediction, golds, ex.context if eval_cfg.task == "qa" else "",
                                         ex.prompt, no_answer, eval_cfg.lang) if predictions else []
        rows.append({"id": ex.id, "prompt": ex.prompt, "gold": golds[0] if golds else no_answer,
                     "prediction": prediction, "score": scores.get(ex.id, 0.0), "failures": failures,
                     "meta": dict(ex.meta)})
    return rows


def headline(result: dict) -> dict:
    """The scalar metrics of a result (no examples, breakdowns or timings), for tables and plots."""
    skip = {"count", "seconds", "generated_tokens", "predicted_no_answer", "has_answer_count", "no_answer_count"}
    return {key: value for key, value in result.items()
            if isinstance(value, (int, float)) and not isinstance(value, bool) and key not in skip}


def write_eval(result: dict, path: str | Path) -> None:
    """Writes an evaluation result as JSON."""
    Path(path).write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def comparison_table(rows: dict[str, dict]) -> str:
    """A small text table: one row per model, one column per headline metric."""
    columns = list(dict.fromkeys(key for r in rows.values() for key in headline(r)))
    width = max([5, *(len(c) for c in columns)])
    lines = [f"{'model':<12} " + " ".join(f"{c:>{width}}" for c in columns) + f" {'n':>5}"]
    for name, r in rows.items():
        cells = " ".join(f"{r[c]:>{width}.1f}" if r.get(c) is not None else f"{'-':>{width}}" for c in columns)
        lines.append(f"{name:<12} {cells} {r['count']:5d}")
    return "\n".join(lines)
