"""Builds the two extra Spanish QA held-out sets in the benchmark files' own JSON layouts.

    python scripts/build_heldout_qa_es.py [OUT_DIR]     # OUT_DIR defaults to data/qa_es

Reads the hand-written sources data/src/qa_es_mlqa_style.jsonl and data/src/qa_es_xquad_style.jsonl
(one paragraph per line: title, context, questions with answer texts), computes each answer_start,
refuses an answer that does not occur exactly once in its paragraph or a paragraph that also
appears in data/qa_es/train.json or heldout.json, and writes:

  data/qa_es/mlqa_style_es.json   MLQA's layout (as test-context-es-question-es.json): SQuAD v1.1
                                  JSON, consecutive paragraphs with the same title grouped under one
                                  article, 40-hex-digit question ids
  data/qa_es/xquad_style_es.json  XQuAD's layout (as xquad.es.json): SQuAD v1.1 JSON, one paragraph
                                  per article, 24-hex-digit question ids

Ids are sha1 hashes of context and question, so a rebuild gives the same files.
"""

import hashlib
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SRC = ROOT / "data" / "src"
OUT = ROOT / "data" / "qa_es"
SETS = {
    "mlqa_style_es.json": ("qa_es_mlqa_style.jsonl", 40, "1.0"),
    "xquad_style_es.json": ("qa_es_xquad_style.jsonl", 24, "1.1"),
}


def shipped_contexts() -> set[str]:
    contexts = set()
    for name in ("train.json", "heldout.json"):
        doc = json.loads((OUT / name).read_text(encoding="utf-8"))
        contexts |= {p["context"] for a in doc["data"] for p in a["paragraphs"]}
    return contexts


def build(source: Path, id_digits: int, version: str, taken: set[str]) -> dict:
    articles = []
    for lineno, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        record = json.loads(line)
        context = record["context"]
        if context in taken:
            sys.exit(f"{source}:{lineno}: paragraph already used by another shipped QA file")
        taken.add(context)
        qas = []
        for qa in record["qas"]:
            answer = qa["answer"]
            if context.count(answer) != 1:
                sys.exit(f"{source}:{lineno}: answer {answer!r} occurs {context.count(answer)} times in its paragraph")
            qid = hashlib.sha1(f"{context}\n{qa['question']}".encode()).hexdigest()[:id_digits]
            qas.append({"answers": [{"answer_start": context.index(answer), "text": answer}],
                        "question": qa["question"], "id": qid})
        paragraph = {"context": context, "qas": qas}
        if id_digits == 40 and articles and articles[-1]["title"] == record["title"]:
            articles[-1]["paragraphs"].append(paragraph)
        else:
            articles.append({"title": record["title"], "paragraphs": [paragraph]})
    return {"data": articles, "version": version}


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else OUT
    taken = shipped_contexts()
    for name, (source, digits, version) in SETS.items():
        doc = build(SRC / source, digits, version, taken)
        (out / name).write_text(json.dumps(doc, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
        paragraphs = [p for a in doc["data"] for p in a["paragraphs"]]
        questions = sum(len(p["qas"]) for p in paragraphs)
        print(f"{name}: {len(doc['data'])} articles, {len(paragraphs)} paragraphs, {questions} questions")


if __name__ == "__main__":
    main()
