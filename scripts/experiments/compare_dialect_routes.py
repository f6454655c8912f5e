"""Compares two ways of adapting Gemma to Aragonese-flavoured Spanish, side by side.

Route A, LoRA only:  kerasft run configs/dialect_sft.yaml (chat SFT from the base model).
Route B, vocabulary: kerasft vocab add (data/dialect/words.txt as single tokens)
                     -> kerasft run configs/dialect_cpt.yaml (continued pretraining, new rows + LoRA)
                     -> kerasft run configs/dialect_sft.yaml on stage 1's merged export.

Every stage runs as its own `kerasft` process, so its wall time and peak RSS (os.wait4) are its
own. Each route's final model is then measured in a fresh process: eval loss on the held-out
conversations (per token and per character, since the routes tokenise differently), tokens per
dialect word, parameter count, export size, and greedy answers to a fixed prompt list. Writes
OUT/comparison.json and OUT/comparison.md.

    python scripts/experiments/compare_dialect_routes.py --preset embedded --out runs/dialect_compare
    python scripts/experiments/compare_dialect_routes.py --preset PATH --out DIR train.max_steps=2   # overrides go to every run
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from kerasft.paths import RunDir

ROOT = Path(__file__).resolve().parents[2]
WORDS = ROOT / "data" / "dialect" / "words.txt"
PROMPTS = (
    "¿Qué es el cierzo?",
    "¿Qué significa tener rasmia?",
    "Mi habitación es un chandrío. ¿Qué quiere decir?",
    "Reescribe en aragonés: «El niño resbaló en el charco».",
    "¿Cómo se dice amapola en Aragón?",
)


def run_stage(name: str, argv: list[str], log_dir: Path) -> dict:
    """Runs one command (a `kerasft` stage or a measurement) and returns its wall time and peak RSS."""
    log_path = log_dir / f"{name}.log"
    print(f"[{name}] {' '.join(argv)}", flush=True)
    start = time.perf_counter()
    with log_path.open("w", encoding="utf-8") as log:
        process = subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(process.pid, 0)
    process.returncode = os.waitstatus_to_exitcode(status)
    seconds = time.perf_counter() - start
    if process.returncode != 0:
        tail = log_path.read_text(encoding="utf-8").strip().splitlines()[-5:]
        sys.exit(f"{name} failed (exit {process.returncode}); see {log_path}:\n" + "\n".join(tail))
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def kerasft(*args: str) -> list[str]:
    return [sys.executable, "-m", "kerasft", *args]


def compare(preset: str, out: Path, overrides: list[str], max_new_tokens: int) -> dict:
    """Runs both routes from `preset` into `out` and returns the comparison."""
    out.mkdir(parents=True)
    logs = out / "logs"
    logs.mkdir()
    common = [f"output_dir={out}", *overrides]
    stages = {"A": {}, "B": {}}
    stages["A"]["sft"] = run_stage("A_sft", kerasft("run", "configs/dialect_sft.yaml", f"model.preset={preset}",
                                                    "name=A_sft", *common), logs)
    grown = out / "B_preset"
    stages["B"]["vocab_add"] = run_stage("B_vocab_add", kerasft("vocab", "add", "--preset", preset, "--words", str(WORDS),
                                                                "--out", str(grown), "--init", "subtokens", "--type", "normal"),
                                    logs)
    stages["B"]["cpt"] = run_stage("B_cpt", kerasft("run", "configs/dialect_cpt.yaml", f"model.preset={grown}",
                                                    "name=B_cpt", *common), logs)
    stages["B"]["sft"] = run_stage("B_sft", kerasft("run", "configs/dialect_sft.yaml",
                                                    f"model.preset={RunDir(out / 'B_cpt').export('hf')}", "name=B_sft", *common),
                                   logs)
    routes = {}
    for route, final in (("A", out / "A_sft"), ("B", out / "B_sft")):
        measured_path = out / f"{route}_measure.json"
        stages[route]["measure"] = run_stage(f"{route}_measure", [sys.executable, __file__, "--measure", str(final),
                                                                  "--json", str(measured_path),
                                                                  "--max-new-tokens", str(max_new_tokens)], logs)
        train_seconds = 0.0
        for stage in ("cpt", "sft"):
            summary_path = RunDir(out / f"{route}_{stage}").summary
            if summary_path.is_file():
                summary = json.loads(summary_path.read_text())
                train_seconds += summary["timings"].get("train", 0.0)
                stages[route][stage]["summary"] = {k: summary.get(k) for k in ("train", "timings", "eval")}
        routes[route] = {
            "train_seconds": round(train_seconds, 1),
            # Per stage: on a shared machine a slow stage shows up here, not only in the times.
            "train_tokens_per_second": " / ".join(
                f"{stage} {stages[route][stage]['summary']['train']['tokens_per_second']:g}"
                for stage in ("cpt", "sft") if "summary" in stages[route].get(stage, {})),
            "wall_seconds": round(sum(s["seconds"] for n, s in stages[route].items() if n != "measure"), 1),
            "peak_rss_mb": max(s["peak_rss_mb"] for n, s in stages[route].items() if n != "measure"),
            **json.loads(measured_path.read_text()),
            "stages": stages[route],
        }
    result = {
        "date": datetime.date.today().isoformat(),
        "preset": preset,
        "overrides": overrides,
        "command": " ".join([Path(sys.executable).name, "scripts/experiments/compare_dialect_routes.py", *sys.argv[1:]]),
        "routes": routes,
    }
    (out / "comparison.json").write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    (out / "comparison.md").write_text(markdown(result), encoding="utf-8")
    return result


def measure(run_dir: Path, max_new_tokens: int) -> dict:
    """Eval loss, tokens per dialect word, size and generations of a run dir's tuned model."""
    import numpy as np

    sys.path.insert(0, str(ROOT))
    from kerasft.data.prepare import build_datasets
    from kerasft.data.template import chat_tokens, encode_conversation, encode_prompt
    from kerasft.evaluate.generate import causal_lm_for, generate_ids
    from kerasft.export.hf import keras_logits
    from kerasft.models.vocab import processor, read_word_list, segmentation_stats
    from kerasft.runtime import init_backend
    from kerasft.models.presets import load_source

    init_backend(0)
    loaded, cfg = load_source(str(run_dir))
    tokens = chat_tokens(loaded.tokenizer)
    examples = build_datasets(cfg.data, need_train=False, need_eval=True).eval
    nll, targets, chars = 0.0, 0, 0
    for example in examples:
        ids, weights = encode_conversation(tokens, example.prompt, example.response, example.system or cfg.data.system,
                                           example.history, cfg.data.template)
        ids, weights = ids[: cfg.data.sequence_length], weights[: cfg.data.sequence_length]
        logits = keras_logits(loaded.backbone, np.asarray([ids]))[0].astype(np.float64)
        log_probs = logits - np.logaddexp.reduce(logits, axis=-1, keepdims=True)
        positions = [t for t in range(1, len(ids)) if weights[t]]
        nll -= float(sum(log_probs[t - 1, ids[t]] for t in positions))
        targets += len(positions)
        chars += len(example.response) + sum(len(answer) for _, answer in example.history)
    system = next((e.system for e in examples if e.system), cfg.data.system)
    prompts = [encode_prompt(tokens, text, system, template=cfg.data.template) for text in PROMPTS]
    outputs, _ = generate_ids(causal_lm_for(loaded.backbone), prompts, max_new_tokens, len(prompts), tokens.stop_ids)
    export = RunDir(run_dir).export("hf")
    words = segmentation_stats(processor(loaded.tokenizer.proto), read_word_list(WORDS), top=5)
    return {
        "eval_examples": len(examples),
        "eval_loss": round(nll / max(targets, 1), 4),
        "eval_nll_per_char": round(nll / max(chars, 1), 4),
        "eval_targets": targets,
        "vocabulary_size": int(loaded.backbone.vocabulary_size),
        "parameters": int(loaded.backbone.count_params()),
        "export_mb": round(sum(f.stat().st_size for f in export.glob("*.safetensors")) / 1e6, 1) if export.is_dir() else None,
        "tokens_per_dialect_word": words["tokens_per_word"],
        "dialect_words_single_token": words["single_token_words"],
        "generations": [{"prompt": p, "response": tokens.decode(o)} for p, o in zip(PROMPTS, outputs)],
    }


def markdown(result: dict) -> str:
    """The side-by-side table and generations as markdown."""
    a, b = result["routes"]["A"], result["routes"]["B"]
    rows = [
        ("training time (s, all stages)", "train_seconds"),
        ("training tokens/s by stage", "train_tokens_per_second"),
        ("wall time of the stages (s)", "wall_seconds"),
        ("final eval loss (per token)", "eval_loss"),
        ("final eval NLL per character", "eval_nll_per_char"),
        ("tokens per dialect word", "tokens_per_dialect_word"),
        ("dialect words that are one token", "dialect_words_single_token"),
        ("peak RSS of a stage (MB)", "peak_rss_mb"),
        ("vocabulary size", "vocabulary_size"),
        ("parameters", "parameters"),
        ("merged export (MB)", "export_mb"),
    ]
    lines = [f"# Dialect adaptation: LoRA only (A) vs vocabulary expansion + continued pretraining + LoRA (B)", "",
             f"{result['date']}, preset `{result['preset']}`, overrides `{' '.join(result['overrides']) or 'none'}`", "",
             f"`{result['command']}`", "", "| | A: LoRA only | B: vocab + CPT + LoRA |", "| --- | --- | --- |"]
    lines += [f"| {label} | {a[key]} | {b[key]} |" for label, key in rows]
    lines += ["", f"Held-out conversations: {a['eval_examples']}; eval loss per token is not comparable across "
              "routes (B has fewer, longer tokens): compare NLL per character.", "", "## Generations (greedy)", "",
              "| prompt | A | B |", "| --- | --- | --- |"]
    for ga, gb in zip(a["generations"], b["generations"]):
        cell = lambda text: text.replace("|", "\\|").replace("\n", " ")  # noqa: E731
        lines.append(f"| {cell(ga['prompt'])} | {cell(ga['response'])} | {cell(gb['response'])} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="embedded", help="the base model of both routes")
    parser.add_argument("--out", default="runs/dialect_compare", help="folder for every run and the comparison")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --out folder")
    parser.add_argument("--max-new-tokens", type=int, default=40, help="length of the generations")
    parser.add_argument("--measure", default="", help=argparse.SUPPRESS)  # internal: measure one run dir
    parser.add_argument("--json", default="", help=argparse.SUPPRESS)
    args, overrides = parser.parse_known_args(argv)
    if args.measure:
        result = measure(Path(args.measure), args.max_new_tokens)
        Path(args.json).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return 0
    bad = [item for item in overrides if "=" not in item]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)}")
    out = Path(args.out).resolve()
    if out.exists():
        if not args.overwrite:
            parser.error(f"{out} already exists; pass --overwrite")
        shutil.rmtree(out)
    result = compare(args.preset, out, overrides, args.max_new_tokens)
    print((out / "comparison.md").read_text(encoding="utf-8"))
    print(f"wrote {out / 'comparison.md'} and {out / 'comparison.json'}")
    return 0 if result else 1


if __name__ == "__main__":
    sys.exit(main())
