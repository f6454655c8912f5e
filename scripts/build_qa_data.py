"""Builds the shipped Spanish QA set (SQuAD v1.1 JSON) from the hand-written sources.

    python scripts/build_qa_data.py

Reads data/src/qa_es_part_*.jsonl (one passage per line with its questions and answer texts),
computes each answer_start, checks that every answer occurs exactly once in its passage, and
writes data/qa_es/train.json and data/qa_es/heldout.json. Every fourth passage of each source
file (in file order) is held out, so held-out questions are about passages never trained on.
"""

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SOURCES = sorted((ROOT / "data" / "src").glob("qa_es_part_*.jsonl"))
OUT = ROOT / "data" / "qa_es"


def squad_article(record: dict, source: Path, lineno: int) -> dict:
    context = record["context"]
    qas = []
    for n, qa in enumerate(record["qas"]):
        answer = qa["answer"]
        if context.count(answer) != 1:
            sys.exit(f"{source}:{lineno}: answer {answer!r} occurs {context.count(answer)} times in its passage")
        qas.append({
            "id": f"{record['title']}-{n + 1}",
            "question": qa["question"],
            "answers": [{"text": answer, "answer_start": context.index(answer)}],
        })
    return {"title": record["title"], "topic": record["topic"], "paragraphs": [{"context": context, "qas": qas}]}


def main() -> None:
    train, heldout = [], []
    for source in SOURCES:
        lines = [line for line in source.read_text(encoding="utf-8").splitlines() if line.strip()]
        for index, line in enumerate(lines):
            article = squad_article(json.loads(line), source, index + 1)
            (heldout if index % 4 == 3 else train).append(article)
    OUT.mkdir(parents=True, exist_ok=True)
    for name, articles in (("train", train), ("heldout", heldout)):
        doc = {"version": "1.1", "data": articles}
        (OUT / f"{name}.json").write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        questions = sum(len(p["qas"]) for a in articles for p in a["paragraphs"])
        print(f"{name}: {len(articles)} passages, {questions} questions")


if __name__ == "__main__":
    main()
