"""`kerasft sweep`: a grid (or a random sample of it within a budget) of runs of one config, each
scored on the validation split; a table, one sensitivity plot per swept key, the best run by a
stated rule, and that run alone scored on the test split.

Layout of the sweep folder (OUTPUT_DIR/NAME-sweep): sweep.json (the spec and every trial's
overrides, score and status, rewritten after each trial), t000/, t001/, ... (ordinary run dirs,
trained and evaluated on validation, no export), results.md, plots/sensitivity_KEY.png and
best_test.json. Rerunning the same command resumes: finished trials are read back, unfinished
ones rerun.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import replace
from pathlib import Path

from kerasft.config import RunConfig, load_config
from kerasft.errors import KerasftError
from kerasft.paths import RunDir, write_json

# Metrics where lower is better; every other headline metric (F1, EM, accuracy, BLEU, ...) is
# maximised.
LOWER_IS_BETTER = ("perplexity", "loss", "invalid")
# The metric that picks the best trial unless --metric names another, by eval.task; a task not
# listed uses its first headline metric.
DEFAULT_METRIC = {"qa": "f1", "short_answer": "accuracy", "classification": "accuracy", "text": "perplexity"}


def parse_axes(items: list[str]) -> tuple[dict[str, list[str]], list[str]]:
    """Splits CLI items into swept keys (`key=v1,v2,...`) and fixed overrides (`key=v`, or any
    value in brackets, such as `lora.targets=[query,value]`). Values stay strings: load_config
    parses them exactly as it parses `kerasft run` overrides."""
    axes, fixed = {}, []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise KerasftError(f"sweep axis {item!r}: expected key=v1,v2,... or key=value")
        values = [v.strip() for v in value.split(",")] if "," in value and not value.lstrip().startswith("[") else []
        if values:
            if any(not v for v in values) or len(set(values)) != len(values):
                raise KerasftError(f"sweep axis {key}: values {value!r} must be distinct and non-empty")
            if key in axes:
                raise KerasftError(f"sweep axis {key}: given twice")
            axes[key] = values
        else:
            fixed.append(item)
    return axes, fixed


def plan_trials(axes: dict[str, list[str]], budget: int = 0, seed: int = 0) -> list[dict[str, str]]:
    """Every combination of the axes in grid order, or, when 0 < budget < grid size, a random
    sample of `budget` combinations (drawn with `seed`, kept in grid order)."""
    keys = list(axes)
    grid = [dict(zip(keys, values)) for values in itertools.product(*(axes[k] for k in keys))]
    if budget < 0:
        raise KerasftError(f"--budget: must be 0 (the whole grid) or more, got {budget}")
    if 0 < budget < len(grid):
        chosen = sorted(random.Random(seed).sample(range(len(grid)), budget))
        grid = [grid[i] for i in chosen]
    return grid


def best_trial(trials: list[dict], metric: str) -> dict:
    """The rule: the finished trial with the best validation `metric` (highest, or lowest for
    LOWER_IS_BETTER metrics); ties go to the earliest trial in grid order."""
    finished = [t for t in trials if t.get("score") is not None]
    if not finished:
        raise KerasftError("sweep: no trial finished with a validation score")
    lower = any(word in metric for word in LOWER_IS_BETTER)
    return min(finished, key=lambda t: (t["score"] if lower else -t["score"], t["index"]))


def sweep(config_path: str, items: list[str], *, budget: int = 0, metric: str = "", seed: int = 0,
          out: str | Path | None = None) -> dict:
    """Runs the sweep (see the module docstring) and returns sweep.json's content.

    Args:
        config_path: the YAML config every trial starts from.
        items: `key=v1,v2` axes and `key=value` fixed overrides.
        budget: at most this many trials, a random sample of the grid (0: the whole grid).
        metric: the validation metric that picks the best trial (default: DEFAULT_METRIC of the
            task, e.g. f1 for QA).
        seed: the sample's seed.
        out: the sweep folder (default OUTPUT_DIR/NAME-sweep).
    """
    axes, fixed = parse_axes(items)
    if not axes:
        raise KerasftError("sweep: no axis to sweep; give at least one key=v1,v2,...")
    base = load_config(config_path, fixed)
    folder = Path(out) if out else Path(base.output_dir) / f"{base.name}-sweep"
    trials = [{"index": i, "name": f"t{i:03d}", "overrides": combo, "score": None, "status": "pending"}
              for i, combo in enumerate(plan_trials(axes, budget, seed))]
    # Every trial's config is built (and checked) before the first one trains.
    configs = [_trial_config(config_path, fixed, t, folder) for t in trials]
    if not configs[0].data.validation and not configs[0].data.split.ratios:
        raise KerasftError("sweep: trials are scored on the validation split; set data.validation or data.split.ratios")
    if configs[0].data.task == "pretrain":
        raise KerasftError("sweep: data.task pretrain has no held-out answers to score")
    spec = {"config": str(config_path), "axes": axes, "fixed": fixed, "budget": budget, "seed": seed,
            "metric": metric, "rule": ""}
    state_path = folder / "sweep.json"
    if state_path.is_file():
        previous = json.loads(state_path.read_text(encoding="utf-8"))
        if {k: previous.get(k) for k in ("config", "axes", "fixed", "budget", "seed")} != \
                {k: spec[k] for k in ("config", "axes", "fixed", "budget", "seed")}:
            raise KerasftError(f"{state_path}: holds another sweep (other config, axes, budget or seed); "
                               "use another --out or remove it")
        metric = metric or previous.get("metric", "")
    folder.mkdir(parents=True, exist_ok=True)

    from kerasft.workflow import run  # keras loads here, after every config was checked

    print(f"sweep: {len(trials)} trial(s) over {', '.join(axes)} in {folder}", flush=True)
    for trial, cfg in zip(trials, configs):
        result_path = RunDir(cfg.run_dir).eval_result("tuned")
        finished = result_path.is_file() and not RunDir(cfg.run_dir).failed.exists()
        label = " ".join(f"{k}={v}" for k, v in trial["overrides"].items())
        if not finished:
            print(f"sweep: {trial['name']} {label}", flush=True)
            run(cfg, export=False, overwrite=True)
        result = json.loads(result_path.read_text(encoding="utf-8"))
        metric = metric or DEFAULT_METRIC.get(cfg.eval.task) or _first_metric(result)
        trial.update(score=_score(result, metric, result_path), status="resumed" if finished else "done",
                     train_loss=_final_loss(cfg.run_dir))
        spec.update(metric=metric, trials=trials)
        write_json(state_path, spec)
        print(f"sweep: {trial['name']} validation {metric} {trial['score']:.4g}", flush=True)

    best = best_trial(trials, metric)
    spec["rule"] = (f"{'lowest' if any(w in metric for w in LOWER_IS_BETTER) else 'highest'} validation {metric}; "
                    "ties go to the earliest trial in grid order")
    spec["best"] = best["name"]
    spec["test"] = _score_on_test(configs[best["index"]], folder / "best_test.json")
    spec["plots"] = [str(p) for p in sensitivity_plots(trials, axes, metric, folder / "plots")]
    write_json(state_path, spec)
    (folder / "results.md").write_text(results_table(spec), encoding="utf-8")
    print(results_table(spec), flush=True)
    return spec


def _trial_config(config_path: str, fixed: list[str], trial: dict, folder: Path) -> RunConfig:
    swept = [f"{k}={v}" for k, v in trial["overrides"].items()]
    cfg = load_config(config_path, [*fixed, *swept])
    return replace(cfg, output_dir=str(folder), name=trial["name"],
                   eval=replace(cfg.eval, split="validation", compare_base=False))  # base: the same for all


def _first_metric(result: dict) -> str:
    from kerasft.evaluate.evaluator import headline

    names = list(headline(result))
    if not names:
        raise KerasftError("sweep: the evaluation reported no metric to compare")
    return names[0]


def _score(result: dict, metric: str, path: Path) -> float:
    value = result.get(metric)
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        from kerasft.evaluate.evaluator import headline

        raise KerasftError(f"{path}: no metric {metric!r}; --metric is one of {', '.join(headline(result))}")
    return float(value)


def _final_loss(run_dir: Path):
    summary = RunDir(run_dir).summary
    if summary.is_file():
        return json.loads(summary.read_text()).get("train", {}).get("final_loss")
    return None


def _score_on_test(cfg: RunConfig, path: Path) -> dict:
    """The best trial's adapter on the test split (the only test evaluation of the sweep)."""
    from kerasft.data.prepare import build_datasets
    from kerasft.evaluate.evaluator import evaluate, headline, open_model, write_eval
    from kerasft.workflow import held_out_examples

    test_cfg = replace(cfg, eval=replace(cfg.eval, split="test"))
    examples = held_out_examples(build_datasets(test_cfg.data, need_train=False, need_eval=True), test_cfg)
    if not examples:
        return {}
    print(f"sweep: scoring {cfg.name} on {len(examples)} test examples", flush=True)
    result = evaluate(open_model(str(cfg.run_dir), name=f"{cfg.model.preset} + {cfg.run_dir}"), examples,
                      test_cfg.eval, test_cfg.data)
    write_eval(result, path)
    return {**headline(result), "count": result["count"]}


def sensitivity_plots(trials: list[dict], axes: dict, metric: str, folder: Path) -> list[Path]:
    """One PNG per swept key: every trial's validation score against that key's value (points),
    and the mean over the other keys (line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for key, values in axes.items():
        fig, ax = plt.subplots(figsize=(5, 3.2))
        means = []
        for position, value in enumerate(values):
            scores = [t["score"] for t in trials if t["overrides"][key] == value and t["score"] is not None]
            ax.scatter([position] * len(scores), scores, color="tab:blue", alpha=0.6)
            means.append(sum(scores) / len(scores) if scores else float("nan"))
        ax.plot(range(len(values)), means, color="tab:orange", marker="o", label="mean over the other keys")
        ax.set_xticks(range(len(values)), values)
        ax.set_xlabel(key)
        ax.set_ylabel(f"validation {metric}")
        ax.set_title(f"sensitivity of {metric} to {key}")
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = folder / f"sensitivity_{key.replace('.', '_')}.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def results_table(spec: dict) -> str:
    """results.md: one row per trial (its swept values, validation score, final training loss),
    the rule, the best trial and its test score."""
    keys = list(spec["axes"])
    lines = [f"# Sweep of {spec['config']}", "",
             "| trial | " + " | ".join(keys) + f" | validation {spec['metric']} | final train loss |",
             "| --- |" + " --- |" * (len(keys) + 2)]
    for trial in spec["trials"]:
        mark = " (best)" if trial["name"] == spec.get("best") else ""
        loss = trial.get("train_loss")
        lines.append(f"| {trial['name']}{mark} | " + " | ".join(trial["overrides"][k] for k in keys)
                     + f" | {trial['score']:.4g} | {'' if loss is None else f'{loss:.4f}'} |")
    lines += ["", f"Rule: {spec['rule']}.", ""]
    if spec.get("test"):
        lines.append(f"Best trial {spec['best']} on the test split: "
                     + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in spec["test"].items()))
    return "\n".join(lines) + "\n"

