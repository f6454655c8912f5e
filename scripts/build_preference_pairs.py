"""Builds the preference pairs of the preference QA recipe (docs/recipes/preference_qa.md) from the
shipped Spanish QA questions: the exact answer span is preferred over a worse answer to the same
question over the same passage.

    python scripts/build_preference_pairs.py      # writes data/preference_qa/{train,heldout}_pairs.jsonl

For each question (in file order) the chosen answer is its gold span. The rejected answer is, in
turn:
- wrong_span: the gold span of another question on the same passage (the next one that does not
  overlap this answer): a span of the passage from the wrong place, the tuned 270M's usual error;
- verbose: the whole sentence of the passage that holds the answer (when it is longer than the
  span), i.e. the answer buried in extra words.
Every rejected answer is checked to differ from the chosen one and to occur in the passage.
Training pairs come from data/qa_es/train.json (the questions the SFT adapter trained on); the
held-out pairs, for the pair metrics, from the first HELDOUT_PASSAGES passages of
data/qa_es/heldout.json (no passage shared with training, nor with the MLQA-layout set the recipe
scores). Deterministic: no randomness, the same files every run.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN_PASSAGES = 8  # 8 passages x 6 questions = 48 training pairs: what the recipe's CPU budget allowed
HELDOUT_PASSAGES = 4  # 24 held-out pairs


def sentence_of(context: str, start: int, end: int) -> str:
    """The sentence of `context` that holds characters start..end (split after . ! ? ;)."""
    bounds = [0] + [m.end() for m in re.finditer(r"[.!?;]\s+", context)] + [len(context)]
    for lo, hi in zip(bounds, bounds[1:]):
        if lo <= start < hi:
            return context[lo:max(hi, end)].strip()
    return context.strip()


def pairs_of(path: Path, passages: int) -> list[dict]:
    data = json.loads(path.read_text(encoding="utf-8"))["data"]
    paragraphs = [p for article in data for p in article["paragraphs"]][:passages]
    out = []
    for paragraph in paragraphs:
        context, qas = paragraph["context"], paragraph["qas"]
        for n, qa in enumerate(qas):
            answer = qa["answers"][0]
            chosen, start = answer["text"], answer["answer_start"]
            end = start + len(chosen)
            verbose = sentence_of(context, start, end)
            kind = "wrong_span" if len(out) % 2 == 0 or len(verbose) <= len(chosen) + 3 else "verbose"
            rejected = verbose
            if kind == "wrong_span":
                others = [qas[(n + k) % len(qas)]["answers"][0] for k in range(1, len(qas))]
                other = next(o for o in others if o["answer_start"] + len(o["text"]) <= start or o["answer_start"] >= end)
                rejected = other["text"]
            assert rejected != chosen and rejected in context, (qa["id"], rejected)
            out.append({"id": qa["id"], "question": qa["question"], "context": context, "chosen": chosen,
                        "rejected": rejected, "kind": kind})
    return out


def main() -> None:
    folder = ROOT / "data" / "preference_qa"
    folder.mkdir(parents=True, exist_ok=True)
    for name, source, passages in (("train_pairs", "train.json", TRAIN_PASSAGES),
                                   ("heldout_pairs", "heldout.json", HELDOUT_PASSAGES)):
        pairs = pairs_of(ROOT / "data" / "qa_es" / source, passages)
        lines = "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in pairs)
        (folder / f"{name}.jsonl").write_text(lines, encoding="utf-8")
        kinds = {k: sum(p["kind"] == k for p in pairs) for k in ("wrong_span", "verbose")}
        print(f"{folder / name}.jsonl: {len(pairs)} pairs ({kinds['wrong_span']} wrong span, {kinds['verbose']} verbose)")


if __name__ == "__main__":
    main()
