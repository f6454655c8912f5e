"""Tokenisation throughput on QA data with the embedded Gemma 3 tokenizer (262k vocabulary).

    .venv/bin/python scripts/experiments/bench_tokenize.py [--examples 100000] [--json out.json]

Builds N distinct SQuAD-style examples from the shipped data/qa_es/train.json (each question
numbered, so no two prompts are equal and no cache can help), then times: reading and mapping
the records (build_datasets on a JSONL file), tokenising with the chat template (batched
SentencePiece), and a second call that hits the on-disk token cache. Prints examples/s and
tokens/s and the ratio to the issue's target (100k examples in 60 s).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=100_000)
    parser.add_argument("--json", default="", help="also write the figures here")
    args = parser.parse_args()

    from kerasft.config import load_config
    from kerasft.models.presets import load_tokenizer
    from kerasft.data.pipeline import tokenize_cached
    from kerasft.data.prepare import build_datasets
    from kerasft.data.template import chat_tokens

    doc = json.loads((ROOT / "data" / "qa_es" / "train.json").read_text(encoding="utf-8"))
    base = [(p["context"], qa) for a in doc["data"] for p in a["paragraphs"] for qa in p["qas"]]
    work = Path(tempfile.mkdtemp(prefix="kerasft-bench-"))
    source = work / "qa.jsonl"
    with source.open("w", encoding="utf-8") as handle:
        for n in range(args.examples):
            context, qa = base[n % len(base)]
            answer = qa["answers"][0]
            handle.write(json.dumps({"id": f"q{n}", "context": context, "question": f"{qa['question']} ({n})",
                                     "answer": answer["text"], "answer_start": answer["answer_start"]},
                                    ensure_ascii=False) + "\n")
    cfg = load_config(ROOT / "configs" / "quickstart.yaml", [f"data.train={source}"])
    tokens = chat_tokens(load_tokenizer(cfg.model))

    started = time.perf_counter()
    splits = build_datasets(cfg.data, need_eval=False)
    read_seconds = time.perf_counter() - started
    started = time.perf_counter()
    data, hit = tokenize_cached(tokens, splits.train, cfg.data, work / "cache")
    tokenize_seconds = time.perf_counter() - started
    assert not hit
    started = time.perf_counter()
    again, hit = tokenize_cached(tokens, splits.train, cfg.data, work / "cache")
    cached_seconds = time.perf_counter() - started
    assert hit and len(again) == len(data)

    total = read_seconds + tokenize_seconds
    figures = {
        "examples": args.examples,
        "tokens": int(data.offsets[-1]),
        "read_seconds": round(read_seconds, 2),
        "tokenize_seconds": round(tokenize_seconds, 2),
        "cached_seconds": round(cached_seconds, 2),
        "examples_per_second": round(args.examples / total),
        "tokens_per_second": round(int(data.offsets[-1]) / tokenize_seconds),
        "target_seconds_for_100k": 60,
        "seconds_for_100k": round(total * 100_000 / args.examples, 1),
        "cpu_count": os.cpu_count(),
    }
    figures["ratio_to_target"] = round(figures["target_seconds_for_100k"] / figures["seconds_for_100k"], 2)
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
