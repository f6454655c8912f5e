"""`kerasft sweep`: axes and budgets, the rule that picks the best trial, and a two-trial sweep on the
tiny preset that writes its table, plots and test score and resumes where it stopped."""

import json
from pathlib import Path

import pytest

from kerasft.cli import main
from kerasft.errors import KerasftError
from kerasft.sweep import best_trial, parse_axes, plan_trials

ROOT = Path(__file__).resolve().parent.parent


def test_axes_budget_and_rule():
    axes, fixed = parse_axes(["lora.rank=4,8,16", "train.learning_rate=1e-4,3e-4", "train.max_steps=5",
                              "lora.targets=[query,value]"])
    assert axes == {"lora.rank": ["4", "8", "16"], "train.learning_rate": ["1e-4", "3e-4"]}
    assert fixed == ["train.max_steps=5", "lora.targets=[query,value]"]
    grid = plan_trials(axes)
    assert len(grid) == 6 and grid[0] == {"lora.rank": "4", "train.learning_rate": "1e-4"}
    sample = plan_trials(axes, budget=3, seed=1)
    assert len(sample) == 3 and sample == plan_trials(axes, budget=3, seed=1)
    assert all(combo in grid for combo in sample) and sample == sorted(sample, key=grid.index)
    assert plan_trials(axes, budget=10) == grid
    with pytest.raises(KerasftError, match="values '4,,8' must be distinct and non-empty"):
        parse_axes(["lora.rank=4,,8"])

    trials = [{"index": 0, "score": 50.0}, {"index": 1, "score": 61.5}, {"index": 2, "score": 61.5},
              {"index": 3, "score": None}]
    assert best_trial(trials, "f1")["index"] == 1  # ties: the earliest in grid order
    assert best_trial(trials, "perplexity")["index"] == 0  # lower is better
    with pytest.raises(KerasftError, match="no trial finished"):
        best_trial([{"index": 0, "score": None}], "f1")


def test_sweep_runs_scores_plots_and_resumes(tiny_preset, tmp_path, monkeypatch, capsys):
    import kerasft.workflow as workflow

    monkeypatch.chdir(ROOT)
    calls = []
    real_run = workflow.run
    monkeypatch.setattr(workflow, "run", lambda cfg, **kw: calls.append(cfg.name) or real_run(cfg, **kw))
    out = tmp_path / "sw"
    # The quickstart's held-out questions serve as validation here too (eval.split picks the split).
    args = ["sweep", str(ROOT / "configs/quickstart.yaml"), "lora.rank=2,4", f"model.preset={tiny_preset}",
            "data.validation=data/qa_es/heldout.json", "train.max_steps=2", "data.eval_limit=2", "eval.max_new_tokens=2",
            "eval.plots=false", "train.plots=false", "--out", str(out)]
    assert main(args) == 0
    spec = json.loads((out / "sweep.json").read_text())
    assert calls == ["t000", "t001"]
    assert [t["overrides"] for t in spec["trials"]] == [{"lora.rank": "2"}, {"lora.rank": "4"}]
    assert spec["metric"] == "f1" and all(isinstance(t["score"], float) for t in spec["trials"])
    assert spec["best"] == best_trial(spec["trials"], "f1")["name"]
    assert spec["rule"].startswith("highest validation f1")
    # Trials were scored on validation; only the best was scored on test.
    for trial in spec["trials"]:
        scored = {e["id"] for e in json.loads((out / trial["name"] / "eval.json").read_text())["examples"]}
        validation = [json.loads(l)["id"] for l in (out / trial["name"] / "data/validation.jsonl").read_text().splitlines()]
        assert scored == set(validation[:2])
        assert not (out / trial["name"] / "export_hf").exists()
    test = json.loads((out / "best_test.json").read_text())
    assert test["count"] == 2 and spec["test"]["f1"] == test["f1"]
    assert (out / "plots" / "sensitivity_lora_rank.png").stat().st_size > 1000
    table = (out / "results.md").read_text()
    assert f"| {spec['best']} (best) |" in table and "Rule: highest validation f1" in table

    # Half-finished: a trial without its evaluation reruns; the finished one is read back.
    (out / "t001" / "eval.json").unlink()
    calls.clear()
    assert main(args) == 0
    assert calls == ["t001"]
    assert [t["status"] for t in json.loads((out / "sweep.json").read_text())["trials"]] == ["resumed", "done"]

    # Another sweep in the same folder is refused before anything runs.
    capsys.readouterr()
    assert main([*args[:2], "lora.rank=2,8", *args[3:]]) == 2
    assert "holds another sweep" in capsys.readouterr().err and calls == ["t001"]
