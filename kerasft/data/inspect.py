"""`kerasft data inspect CONFIG`: what the configured data looks like before a run spends time
on it: counts per split, bad records, duplicates, empty fields, token lengths against the
sequence length, categories. Errors (records that cannot be used) and warnings (usable but
suspicious) are kept apart.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np

from kerasft.data.prepare import SPLITS, build_datasets, normalized_key
from kerasft.data.template import chat_tokens, encode_conversation, encode_text
from kerasft.models.presets import load_tokenizer

PERCENTILES = (50, 90, 95, 99, 100)


def inspect_data(cfg, out_dir: str | Path) -> dict:
    """Builds the splits of `cfg.data` (skipping, not stopping at, bad records), measures them
    with the model's tokenizer and writes inspect.json and token_lengths.png into `out_dir`.

    Args:
        cfg: the whole RunConfig (the data slice, and the model for its tokenizer).

    Returns the report (also written as inspect.json).
    """
    data_cfg = replace(cfg.data, on_error="skip")
    splits = build_datasets(data_cfg, need_train=bool(cfg.data.train), need_eval=bool(
        cfg.data.eval or cfg.data.validation or cfg.data.split.ratios))
    tokens = chat_tokens(load_tokenizer(cfg.model))
    report = {"errors": [], "warnings": [], "splits": {}, "sequence_length": cfg.data.sequence_length}
    report["errors"] = [f"{item['error']}" for item in splits.report["skipped"]]
    if splits.report["duplicates_removed"]:
        report["warnings"].append(f"{len(splits.report['duplicates_removed'])} duplicate training examples removed "
                                  f"(data.clean.dedup={cfg.data.clean.dedup})")
    if splits.report.get("heldout_in_train"):
        report["warnings"].append(f"{len(splits.report['heldout_in_train'])} held-out examples also appear in training")
    lengths_by_split = {}
    for name in SPLITS:
        examples = getattr(splits, name)
        if not examples:
            continue
        examples = list(examples)  # a streamed corpus is read once here
        report["errors"] += [item["error"] for item in getattr(getattr(splits, name), "skipped", [])]
        stats, lengths = _split_stats(examples, tokens, cfg.data)
        report["splits"][name] = stats
        lengths_by_split[name] = lengths
        over = stats["longer_than_sequence_length"]
        if over:
            what = "trimmed around the answer or left out" if stats["qa_examples"] else "left out of training"
            report["warnings"].append(f"{name}: {over} examples are longer than sequence_length="
                                      f"{cfg.data.sequence_length} tokens and would be {what}")
        for kind, count in (("exact", stats["duplicates_exact"]), ("normalized", stats["duplicates_normalized"])):
            if count and cfg.data.clean.dedup == "none":
                report["warnings"].append(f"{name}: {count} {kind} duplicates (set data.clean.dedup to remove them)")
        if stats["empty_fields"]:
            report["warnings"].append(f"{name}: empty fields: {stats['empty_fields']}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    report["plot"] = _histogram(lengths_by_split, cfg.data.sequence_length, out_dir / "token_lengths.png")
    (out_dir / "inspect.json").write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    return report


def format_report(report: dict) -> str:
    """The report as a few readable lines for the terminal."""
    lines = []
    for name, s in report["splits"].items():
        p = s["tokens"]
        lines.append(f"{name:<10} {s['examples']:>6} examples  tokens p50 {p['p50']:.0f} p90 {p['p90']:.0f} "
                     f"p99 {p['p99']:.0f} max {p['p100']:.0f}  over {report['sequence_length']}: "
                     f"{s['longer_than_sequence_length']}  unanswerable: {s['unanswerable']}")
        for column, counts in s["categories"].items():
            lines.append(f"{'':<10} {column}: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    lines.append(f"errors ({len(report['errors'])}):")
    lines += [f"  {e}" for e in report["errors"][:20]] + (["  ..."] if len(report["errors"]) > 20 else [])
    lines.append(f"warnings ({len(report['warnings'])}):")
    lines += [f"  {w}" for w in report["warnings"]]
    if report.get("plot"):
        lines.append(f"histogram: {report['plot']}")
    return "\n".join(lines)


def _split_stats(examples, tokens, data_cfg) -> tuple[dict, np.ndarray]:
    if data_cfg.task == "pretrain":
        lengths = np.asarray([len(encode_text(tokens, ex.response)) for ex in examples])
    else:
        lengths = np.asarray([
            len(encode_conversation(tokens, ex.prompt, ex.response, ex.system or data_cfg.system, ex.history,
                                    data_cfg.template)[0])
            for ex in examples
        ])
    exact = Counter((ex.prompt, ex.response) for ex in examples)
    normalized = Counter((normalized_key(ex.prompt), normalized_key(ex.response)) for ex in examples)
    empty = Counter()
    for ex in examples:
        for name in ("prompt", "response"):
            if not getattr(ex, name).strip() and not (name == "prompt" and data_cfg.task == "pretrain"):
                empty[name] += 1
    categories: dict[str, dict[str, int]] = {}
    for ex in examples:
        for key, value in ex.meta.items():
            categories.setdefault(key, Counter())[value or "(empty)"] += 1
    stats = {
        "examples": len(examples),
        "qa_examples": sum(bool(ex.context) for ex in examples),
        "unanswerable": sum(not ex.answerable for ex in examples if ex.context),
        "multi_turn": sum(bool(ex.history) for ex in examples),
        "tokens": {f"p{q}": float(np.percentile(lengths, q)) for q in PERCENTILES},
        "longer_than_sequence_length": int((lengths > data_cfg.sequence_length).sum()),
        "duplicates_exact": sum(n - 1 for n in exact.values()),
        "duplicates_normalized": sum(n - 1 for n in normalized.values()),
        "empty_fields": dict(empty),
        "categories": {k: dict(sorted(v.items())) for k, v in categories.items()},
    }
    return stats, lengths


def _histogram(lengths_by_split: dict, sequence_length: int, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return ""  # the JSON report has the percentiles; the plot needs the `eval` extra
    fig, ax = plt.subplots(figsize=(7, 3.5), dpi=100)
    for name, lengths in lengths_by_split.items():
        ax.hist(lengths, bins=40, alpha=0.6, label=f"{name} ({len(lengths)})")
    ax.axvline(sequence_length, color="black", linestyle="--", label=f"sequence_length {sequence_length}")
    ax.set_xlabel("tokens per example (template included)")
    ax.set_ylabel("examples")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return str(path)
