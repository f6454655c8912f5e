"""Extractive QA evaluation: greedy answers on a held-out split, scored with SQuAD F1/EM."""

from __future__ import annotations

import json
from pathlib import Path

from kerasft.data.records import Example
from kerasft.data.template import ChatTokens, encode_prompt
from kerasft.evaluate import metrics
from kerasft.evaluate.generate import generate_ids


def evaluate_qa(causal_lm, tokens: ChatTokens, examples: list[Example], cfg, system: str = "") -> dict:
    """Generates an answer for each example and scores it.

    Args:
        cfg: kerasft.config.EvalConfig.

    Returns:
        {"exact_match", "f1" (headline, cfg.lang normalisation), "exact_match_en", "f1_en" (SQuAD
        v1.1 English normalisation), "count", "seconds", "predictions": {id: answer}}.
    """
    prompts = [encode_prompt(tokens, ex.prompt, system) for ex in examples]
    new_ids, timing = generate_ids(
        causal_lm, prompts, cfg.max_new_tokens, cfg.batch_size, tokens.stop_ids, tokens.pad
    )
    predictions = {ex.id: tokens.decode(ids).strip() for ex, ids in zip(examples, new_ids)}
    references = {ex.id: list(ex.answers) for ex in examples}
    headline = metrics.squad_scores(predictions, references, lang=cfg.lang)
    english = metrics.squad_scores(predictions, references, lang="en")
    return {
        "exact_match": headline["exact_match"],
        "f1": headline["f1"],
        "exact_match_en": english["exact_match"],
        "f1_en": english["f1"],
        "count": len(examples),
        "lang": cfg.lang,
        "seconds": round(timing["seconds"], 2),
        "generated_tokens": timing["generated_tokens"],
        "predictions": predictions,
    }


def write_eval(result: dict, path: str | Path) -> None:
    """Writes an evaluation result as JSON."""
    Path(path).write_text(json.dumps(result, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")


def comparison_table(rows: dict[str, dict]) -> str:
    """A small text table: one row per model, F1/EM in both normalisations."""
    lines = [f"{'model':<12} {'F1':>6} {'EM':>6} {'F1(en)':>7} {'EM(en)':>7} {'n':>5}"]
    for name, r in rows.items():
        lines.append(
            f"{name:<12} {r['f1']:6.1f} {r['exact_match']:6.1f} {r['f1_en']:7.1f} {r['exact_match_en']:7.1f} {r['count']:5d}"
        )
    return "\n".join(lines)
