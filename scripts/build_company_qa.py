"""Builds the open-book company QA file from the handbook and the hand-labelled questions.

    python scripts/build_company_qa.py [OUT_FILE]   # default data/company/questions_open_book.jsonl

Reads data/company/manual.md (sections headed `## N. Title`) and data/company/questions.jsonl (id,
question, answer, difficulty, category, section = the heading of the section that answers it) and
writes one record per question with the section's text added as `manual`, so that
configs/recipe_company_qa.yaml can put the section in the prompt (retrieval given, as in RAG).
Refuses a question whose section does not exist, a duplicate id or question, an unknown
difficulty, and an easy question whose answer is not written verbatim in its section.
"""

import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FOLDER = ROOT / "data" / "company"
DIFFICULTIES = ("easy", "medium", "hard")


def sections(manual: str) -> dict[str, str]:
    """Heading ("21. Devoluciones") -> the section's text, one paragraph."""
    found = {}
    for part in re.split(r"^## ", manual, flags=re.M)[1:]:
        head, _, body = part.partition("\n")
        if re.match(r"\d+\. ", head):
            found[head.strip()] = " ".join(body.split())
    return found


def main() -> None:
    out = Path(sys.argv[1]) if len(sys.argv) > 1 else FOLDER / "questions_open_book.jsonl"
    texts = sections((FOLDER / "manual.md").read_text(encoding="utf-8"))
    seen_ids, seen_questions, records = set(), set(), []
    source = FOLDER / "questions.jsonl"
    for lineno, line in enumerate(source.read_text(encoding="utf-8").splitlines(), 1):
        row = json.loads(line)
        where = f"{source}:{lineno} ({row.get('id')})"
        if row["section"] not in texts:
            sys.exit(f"{where}: no handbook section {row['section']!r}")
        if row["difficulty"] not in DIFFICULTIES:
            sys.exit(f"{where}: difficulty {row['difficulty']!r} is not one of {', '.join(DIFFICULTIES)}")
        if row["id"] in seen_ids or row["question"] in seen_questions:
            sys.exit(f"{where}: duplicate id or question")
        text = texts[row["section"]]
        if row["difficulty"] == "easy" and row["answer"].lower() not in text.lower():
            sys.exit(f"{where}: an easy answer must be written verbatim in its section: {row['answer']!r}")
        seen_ids.add(row["id"])
        seen_questions.add(row["question"])
        records.append({**row, "manual": text})
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    counts = {d: sum(r["difficulty"] == d for r in records) for d in DIFFICULTIES}
    print(f"{out.name}: {len(records)} questions over {len({r['section'] for r in records})} sections, {counts}")


if __name__ == "__main__":
    main()
