"""The recipe data sets of issue 10 (data/README.md): answers are where their offsets say, the
held-out QA paragraphs are new, and the files are what their build scripts write."""

import json
import re
import subprocess
import sys
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
QA = ROOT / "data" / "qa_es"


def _paragraphs(path: Path):
    doc = json.loads(path.read_text(encoding="utf-8"))
    return [p for a in doc["data"] for p in a["paragraphs"]]


@pytest.mark.parametrize("name, id_digits", [("mlqa_style_es.json", 40), ("xquad_style_es.json", 24)])
def test_heldout_qa_sets_are_squad_layout_with_exact_offsets(name, id_digits):
    paragraphs = _paragraphs(QA / name)
    ids = []
    for paragraph in paragraphs:
        for qa in paragraph["qas"]:
            assert set(qa) == {"answers", "question", "id"}, qa
            assert re.fullmatch(f"[0-9a-f]{{{id_digits}}}", qa["id"]), qa["id"]
            assert qa["question"].startswith("¿") and qa["question"].endswith("?"), qa["question"]
            (answer,) = qa["answers"]
            start = answer["answer_start"]
            assert paragraph["context"][start : start + len(answer["text"])] == answer["text"], qa["id"]
            ids.append(qa["id"])
    assert 60 <= len(ids) <= 100 and len(set(ids)) == len(ids)


def test_heldout_qa_paragraphs_are_not_in_training_or_each_other():
    seen = {}
    for name in ("train.json", "heldout.json", "mlqa_style_es.json", "xquad_style_es.json"):
        for paragraph in _paragraphs(QA / name):
            assert paragraph["context"] not in seen, (name, seen.get(paragraph["context"]))
            seen[paragraph["context"]] = name


def test_heldout_qa_files_match_their_sources(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_heldout_qa_es.py"), str(tmp_path)], check=True,
                   capture_output=True)
    for name in ("mlqa_style_es.json", "xquad_style_es.json"):
        assert (tmp_path / name).read_bytes() == (QA / name).read_bytes(), f"{name}: rerun scripts/build_heldout_qa_es.py"


def test_company_open_book_file_matches_handbook_and_questions(tmp_path):
    out = tmp_path / "open_book.jsonl"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_company_qa.py"), str(out)], check=True,
                   capture_output=True)
    shipped = ROOT / "data" / "company" / "questions_open_book.jsonl"
    assert out.read_bytes() == shipped.read_bytes(), "rerun scripts/build_company_qa.py"
    rows = [json.loads(line) for line in shipped.read_text(encoding="utf-8").splitlines()]
    assert len(rows) >= 280 and len({r["section"] for r in rows}) >= 30
    for difficulty in ("easy", "medium", "hard"):
        assert sum(r["difficulty"] == difficulty for r in rows) >= 0.2 * len(rows), difficulty
    # yes/no questions must not teach the model to always say one of them
    yes, no = (sum(r["answer"].startswith(w) for r in rows) for w in ("Sí", "No"))
    assert min(yes, no) >= 0.6 * max(yes, no), (yes, no)


def test_structured_queries_validate_against_their_schema():
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((ROOT / "data" / "structured" / "schema.json").read_text(encoding="utf-8"))
    validator = jsonschema.Draft202012Validator(schema)
    rows = [json.loads(line) for line in
            (ROOT / "data" / "structured" / "consultas_viaje.jsonl").read_text(encoding="utf-8").splitlines()]
    assert 250 <= len(rows) <= 300
    assert len({r["id"] for r in rows}) == len(rows) and len({r["query"] for r in rows}) == len(rows)
    for row in rows:
        assert list(row["output"]) == schema["required"], row["id"]  # one key order for the targets
        errors = [e.message for e in validator.iter_errors(row["output"])]
        assert not errors, (row["id"], errors)
    # the schema really is strict: a missing key, an extra key or a value outside an enum fails
    sample = dict(rows[0]["output"])
    assert not validator.is_valid({k: v for k, v in sample.items() if k != "dia"})
    assert not validator.is_valid({**sample, "hora": "8:00"})
    assert not validator.is_valid({**sample, "franja": "por la mañana"})
    assert not validator.is_valid({**sample, "dia": "31 de febrerito"})
    for key in ("transporte", "origen", "destino", "dia", "franja", "pasajeros", "ida_y_vuelta"):
        assert any(r["output"][key] is None for r in rows) and any(r["output"][key] is not None for r in rows), key


def test_intent_splits_match_their_build_script_and_stay_apart(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "scripts" / "build_intents_data.py"), str(tmp_path)], check=True,
                   capture_output=True)
    shipped = ROOT / "data" / "intents_es"
    splits = {}
    for name in ("train", "validation", "test"):
        assert (tmp_path / f"{name}.jsonl").read_bytes() == (shipped / f"{name}.jsonl").read_bytes(), \
            f"{name}.jsonl: rerun scripts/build_intents_data.py"
        splits[name] = [json.loads(line) for line in (shipped / f"{name}.jsonl").read_text(encoding="utf-8").splitlines()]
    rows = [row for rows in splits.values() for row in rows]
    intents = sorted({row["intent"] for row in rows})
    assert len(rows) >= 300 and len(intents) >= 6
    assert len({row["id"] for row in rows}) == len(rows)
    # no message twice, in any split, even up to case and accents
    folded = [re.sub(r"\W", "", unicodedata.normalize("NFD", row["text"].lower())) for row in rows]
    assert len(set(folded)) == len(rows)
    for name, share in (("train", 0.7), ("validation", 0.15), ("test", 0.15)):
        counts = {intent: sum(row["intent"] == intent for row in splits[name]) for intent in intents}
        assert len(set(counts.values())) == 1 and sum(counts.values()) == round(share * len(rows)), (name, counts)
    # the recipe's label set is exactly the data's
    from kerasft.config import load_config
    assert sorted(load_config(ROOT / "configs" / "recipe_intents.yaml").eval.labels) == intents
