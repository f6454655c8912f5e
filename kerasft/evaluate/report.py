"""The evaluation report: report.md, report.json and PNG plots, base next to fine-tuned.

Plots (matplotlib, the `eval` extra, Agg backend): the training loss curve from
RUN_DIR/metrics.jsonl (and eval loss when logged), headline metrics base vs tuned (user metrics of
eval.metrics included), per-group bars for any breakdown (metadata column, JSON field, class) and,
for classification, one confusion matrix per model. Error analysis lists the worst examples
with prompt, gold and prediction, and counts failure kinds.
"""

from __future__ import annotations

import json
from pathlib import Path

from kerasft.evaluate.evaluator import headline
from kerasft.paths import RunDir
from kerasft.train.logs import draw_loss_curve, read_metrics

PROMPT_CHARS = 300  # prompts in report.md are cut to this many characters (report.json keeps them whole)
PROMPT_TAIL_CHARS = 160  # of which this many come from the end, where QA prompts put the question


def write_report(out_dir: str | Path, results: dict[str, dict], training_log: str | Path | None = None,
                 worst: int = 10, plots: bool = True) -> dict:
    """Writes report.md, report.json and plots/*.png into out_dir and returns the report.

    Args:
        results: model name ("base", "tuned", ...) -> an evaluate() result.
        training_log: a metrics.jsonl with {"step", "loss"[, "eval_loss"]} lines, if any.
        worst: how many of the lowest-scoring examples (of the last model) to list.
        plots: draw PNGs (skipped with a note when matplotlib is missing).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(results)
    last = results[names[-1]]
    log = read_metrics(training_log) if training_log else []
    report = {
        "task": last["task"],
        "count": last["count"],
        "models": {name: {"source": r.get("model", ""), **headline(r), "system": r.get("system", {}),
                          "failures": r.get("failures", {}), "by": r.get("by", {}),
                          **({"preference": r["preference"]} if r.get("preference") else {}),
                          **({"confusion": r["confusion"]} if r.get("confusion") else {})}
                   for name, r in results.items()},
        "worst": sorted(last["examples"], key=lambda row: row["score"])[:worst],
        "training": {"steps": len(log), "final_loss": log[-1].get("loss") if log else None},
        "plots": [],
    }
    if plots:
        try:
            report["plots"] = _draw_plots(RunDir(out_dir).plots, results, log)
        except ImportError:
            report["plots_skipped"] = "matplotlib is not installed: pip install 'kerasft[eval]'"
            print(f"  report: plots skipped ({report['plots_skipped']})", flush=True)
    RunDir(out_dir).report_json.write_text(json.dumps(report, ensure_ascii=False, indent=2) + "\n", encoding="utf-8")
    RunDir(out_dir).report_md.write_text(_markdown(report), encoding="utf-8")
    return report


def _markdown(report: dict) -> str:
    models = report["models"]
    names = list(models)
    columns = list(dict.fromkeys(key for m in models.values() for key in m
                                 if key not in ("source", "system", "failures", "by", "preference", "confusion")))
    lines = [f"# Evaluation report ({report['task']}, {report['count']} examples)", ""]
    lines += ["| model | " + " | ".join(columns) + " |", "| --- |" + " --- |" * len(columns)]
    for name in names:
        # user metrics (package.module:function) are means on their own scale, often 0-1: 3 digits
        lines.append(f"| {name} | " + " | ".join(_cell(models[name].get(c), 3 if ":" in c else 1) for c in columns) + " |")
    lines += ["", "Rates are percentages; perplexity and eval_loss are per token"
              + ("; invalid counts the answers that name no label" if any("invalid" in m for m in models.values()) else "")
              + ("; package.module:function columns are the means of user metrics (eval.metrics)"
                 if any(":" in c for c in columns) else "") + ".", ""]
    sources = [f"- {name}: `{m['source']}`" for name, m in models.items() if m["source"]]
    if sources:
        lines += ["Models:", *sources, ""]
    preference = {name: m["preference"] for name, m in models.items() if m.get("preference")}
    if preference:
        keys = [k for k in PAIR_COLUMNS if any(k in p for p in preference.values())]
        count = next(iter(preference.values())).get("pairs", "")
        lines += [f"## Held-out preference pairs ({count} pairs)", "",
                  "| model | " + " | ".join(keys) + " |", "| --- |" + " --- |" * len(keys)]
        for name, p in preference.items():
            lines.append(f"| {name} | " + " | ".join(_cell(p.get(k), 3) for k in keys) + " |")
        lines += ["", "reward_accuracy is the share of pairs whose chosen answer gets the higher reward (DPO: beta "
                  "times the log-ratio to the reference, the base model, so the base scores 0 margin; ORPO: beta "
                  "times the mean log-prob per token); logps are summed over each answer's tokens (ORPO: averaged).",
                  ""]
    system_keys = list(dict.fromkeys(k for m in models.values() for k in m["system"]))
    if system_keys:
        lines += ["## System", "", "| model | " + " | ".join(system_keys) + " |", "| --- |" + " --- |" * len(system_keys)]
        for name in names:
            lines.append(f"| {name} | " + " | ".join(_cell(models[name]["system"].get(k), 3) for k in system_keys) + " |")
        lines += ["", "Latency is the wall time of an example's batch, XLA compilation of each new batch shape "
                  "included; prefill is timed as a separate forward pass, decode is the rest.", ""]
    for column in dict.fromkeys(c for m in models.values() for c in m["by"]):
        lines += [f"## By {column}", ""]
        values = list(dict.fromkeys(v for m in models.values() for v in m["by"].get(column, {})))
        keys = list(dict.fromkeys(k for m in models.values() for v in m["by"].get(column, {}).values() for k in v))
        lines += ["| model | " + column + " | " + " | ".join(keys) + " |", "| --- | --- |" + " --- |" * len(keys)]
        for name in names:
            for value in values:
                row = models[name]["by"].get(column, {}).get(value, {})
                lines.append(f"| {name} | {value} | " + " | ".join(_cell(row.get(k)) for k in keys) + " |")
        lines.append("")
    for name, m in models.items():
        if m.get("confusion"):
            confusion = m["confusion"]
            lines += [f"## Confusion matrix ({name}): rows gold, columns predicted", "",
                      "| gold \\ predicted | " + " | ".join(confusion["predicted"]) + " |",
                      "| --- |" + " ---: |" * len(confusion["predicted"])]
            lines += [f"| {label} | " + " | ".join(str(n) for n in row) + " |"
                      for label, row in zip(confusion["labels"], confusion["matrix"])]
            lines.append("")
    kinds = list(dict.fromkeys(k for m in models.values() for k in m["failures"]))
    lines += ["## Failure kinds", ""]
    if kinds:
        lines += ["| model | " + " | ".join(kinds) + " |", "| --- |" + " --- |" * len(kinds)]
        for name in names:
            lines.append(f"| {name} | " + " | ".join(str(models[name]["failures"].get(k, 0)) for k in kinds) + " |")
    else:
        lines.append("No failure kind was detected.")
    lines += ["", f"## Worst {len(report['worst'])} examples ({names[-1]})", ""]
    for row in report["worst"]:
        prompt = _shortened(row["prompt"])
        lines += [f"### {row['id']} (score {row['score']:.2f}; {', '.join(row['failures']) or 'no failure kind'})", "",
                  "Prompt:", "", *_quoted(prompt), "", "Gold:", "", *_quoted(row["gold"]), "",
                  "Prediction:", "", *_quoted(row["prediction"]), ""]
    if report["plots"]:
        lines += ["## Plots", "", *[f"![{Path(p).stem}]({p})" for p in report["plots"]], ""]
    elif report.get("plots_skipped"):
        lines += [f"Plots skipped: {report['plots_skipped']}.", ""]
    return "\n".join(lines)


# The columns of the held-out preference table (kerasft.train.loop.score_pairs' keys).
PAIR_COLUMNS = ("loss", "reward_accuracy", "reward_margin", "chosen_reward", "rejected_reward", "chosen_logps",
                "rejected_logps")


def _shortened(prompt: str) -> str:
    """The prompt's start and end with " [...] " between them when it is longer than PROMPT_CHARS:
    an instruction and a context come first, the question last."""
    if len(prompt) <= PROMPT_CHARS:
        return prompt
    head = PROMPT_CHARS - PROMPT_TAIL_CHARS
    return prompt[:head] + " [...] " + prompt[-PROMPT_TAIL_CHARS:]


def _quoted(text: str) -> list[str]:
    return ["> " + line for line in text.splitlines()] or ["> "]


def _cell(value, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def _draw_plots(folder: Path, results: dict[str, dict], log: list[dict]) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")  # files only: no display on servers and CI
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name):
        fig.tight_layout()
        fig.savefig(folder / name, dpi=100)
        plt.close(fig)
        written.append(f"plots/{name}")

    if log:
        draw_loss_curve(log, folder / "loss.png")
        written.append("plots/loss.png")
    names = list(results)
    scalars = [key for key in dict.fromkeys(k for r in results.values() for k in headline(r))
               if key not in ("perplexity", "eval_loss", "invalid")]  # the rest are percentages on one axis
    if scalars:
        save(_bars(plt, scalars, {n: [headline(results[n]).get(k) for k in scalars] for n in names}, "score"), "metrics.png")
    for column in dict.fromkeys(c for r in results.values() for c in r.get("by", {})):
        values = list(dict.fromkeys(v for r in results.values() for v in r["by"].get(column, {})))
        key = next((k for k in ("accuracy", "f1", "exact_match")
                    if any(k in row for r in results.values() for row in r["by"].get(column, {}).values())), None)
        if key is None or not values:
            continue
        heights = {n: [results[n].get("by", {}).get(column, {}).get(v, {}).get(key) for v in values] for n in names}
        fig = _bars(plt, values, heights, f"{key} by {column}")
        save(fig, f"by_{_file_safe(column)}.png")
    for name, result in results.items():
        if result.get("confusion"):
            save(_confusion(plt, result["confusion"], name), f"confusion_{_file_safe(name)}.png")
    return written


def _confusion(plt, confusion: dict, name: str):
    """A confusion matrix as a heat map with the count in every cell (rows gold, columns predicted)."""
    matrix, rows, columns = confusion["matrix"], confusion["labels"], confusion["predicted"]
    fig, ax = plt.subplots(figsize=(1.0 + 0.75 * len(columns), 1.0 + 0.6 * len(rows)))
    ax.imshow(matrix, cmap="Blues", vmin=0, vmax=max(1, max(max(row) for row in matrix)))
    ax.set_xticks(range(len(columns)))
    ax.set_xticklabels(columns, rotation=45, ha="right")
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows)
    ax.set_xlabel("predicted")
    ax.set_ylabel("gold")
    ax.set_title(f"confusion matrix: {name}")
    top = max(max(row) for row in matrix)
    for i, row in enumerate(matrix):
        for j, count in enumerate(row):
            ax.text(j, i, str(count), ha="center", va="center", color="white" if count > top / 2 else "black")
    return fig


def _bars(plt, labels, heights: dict, ylabel: str):
    fig, ax = plt.subplots(figsize=(max(4, 0.9 * len(labels) * len(heights)), 3.5))
    width = 0.8 / len(heights)
    for n, (name, values) in enumerate(heights.items()):
        positions = [i + n * width for i in range(len(labels))]
        ax.bar(positions, [v if v is not None else 0 for v in values], width, label=name)
    ax.set_xticks([i + width * (len(heights) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels(labels, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.legend()
    return fig


def _file_safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in name) or "group"
