"""Records, the chat template and the loss mask, on the shipped data and on bad input."""

import json
from pathlib import Path

import numpy as np
import pytest

from kerasft.data.pipeline import make_batch, tokenize_examples
from kerasft.config import DataConfig
from kerasft.data.records import Example, qa_prompt
from kerasft.data.sources import load_examples
from kerasft.data.template import chat_tokens, encode_prompt, encode_response, render_chat
from kerasft.errors import KerasftError

DATA = Path(__file__).resolve().parents[2] / "data" / "qa_es"


def _squad(path, context, answer, start, qid="q1"):
    doc = {"version": "1.1", "data": [{"title": "t", "paragraphs": [{"context": context, "qas": [
        {"id": qid, "question": "¿Dónde?", "answers": [{"text": answer, "answer_start": start}]}]}]}]}
    path.write_text(json.dumps(doc, ensure_ascii=False))
    return path


@pytest.mark.parametrize("split", ["train", "heldout"])
def test_shipped_answers_are_verbatim_spans(split):
    doc = json.loads((DATA / f"{split}.json").read_text(encoding="utf-8"))
    count = 0
    for article in doc["data"]:
        for paragraph in article["paragraphs"]:
            for qa in paragraph["qas"]:
                for answer in qa["answers"]:
                    start = answer["answer_start"]
                    assert paragraph["context"][start : start + len(answer["text"])] == answer["text"], qa["id"]
                count += 1
    assert count >= (300 if split == "train" else 100)


def test_shipped_splits_do_not_share_passages():
    contexts = {}
    for split in ("train", "heldout"):
        doc = json.loads((DATA / f"{split}.json").read_text(encoding="utf-8"))
        contexts[split] = {p["context"] for a in doc["data"] for p in a["paragraphs"]}
    assert len(contexts["train"]) + len(contexts["heldout"]) >= 60
    assert not contexts["train"] & contexts["heldout"]


def test_load_squad_builds_qa_examples(tmp_path):
    ctx = "El río Ebro pasa por Zaragoza."
    examples = load_examples(_squad(tmp_path / "a.json", ctx, "Zaragoza", ctx.index("Zaragoza")), DataConfig(instruction="Instr."))
    assert examples == [Example("q1", qa_prompt("Instr.", ctx, "¿Dónde?"), "Zaragoza", ("Zaragoza",), ctx, 21,
                                origin=f"{tmp_path / 'a.json'}: data[0].paragraphs[0].qas[0]")]


def test_wrong_answer_start_is_named(tmp_path):
    path = _squad(tmp_path / "a.json", "El río Ebro pasa por Zaragoza.", "Zaragoza", 3)
    with pytest.raises(KerasftError, match=r"a\.json: data\[0\]\.paragraphs\[0\]\.qas\[0\]\.answers\[0\] \(id q1\): .* not at answer_start 3; the text occurs at 21"):
        load_examples(path)
    path = _squad(tmp_path / "b.json", "El río Ebro.", "Madrid", 0)
    with pytest.raises(KerasftError, match="not in the context"):
        load_examples(path)


def test_malformed_inputs_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text('{"data": [\n  {"title": }\n]}')
    with pytest.raises(KerasftError, match=r"bad\.json: line 2 column \d+: invalid JSON"):
        load_examples(bad)
    lines = tmp_path / "x.jsonl"
    lines.write_text('{"prompt": "a", "response": "b"}\n{"prompt": "a"}\n')
    with pytest.raises(KerasftError, match=r"x\.jsonl: line 2: no response field; found prompt"):
        load_examples(lines)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(KerasftError, match="no examples found"):
        load_examples(empty)
    with pytest.raises(KerasftError, match="data file not found"):
        load_examples(tmp_path / "missing.json")


def test_jsonl_prompt_response(tmp_path):
    path = tmp_path / "chat.jsonl"
    path.write_text('{"id": "a", "prompt": "Hola", "response": "¡Hola!"}\n\n{"prompt": "¿Qué tal?", "response": "Bien."}\n')
    examples = load_examples(path)
    assert [(e.id, e.prompt, e.response) for e in examples] == [("a", "Hola", "¡Hola!"), ("chat-3", "¿Qué tal?", "Bien.")]


@pytest.fixture(scope="module")
def tokens(tiny_preset):
    import keras_hub

    return chat_tokens(keras_hub.tokenizers.Tokenizer.from_preset(str(tiny_preset)))


def test_template_ids_match_rendered_text(tokens):
    ids = encode_prompt(tokens, "Hola\tmundo", system="Sé breve.") + encode_response(tokens, "¡Hola!")
    text = render_chat("Hola\tmundo", "¡Hola!", system="Sé breve.")
    assert tokens.decode(ids) + "\n" == text.replace("<bos>", "", 1)
    assert ids.count(tokens.start_of_turn) == 2 and ids.count(tokens.end_of_turn) == 2
    assert ids[0] == tokens.bos


def test_loss_weights_cover_response_and_end_of_turn_only(tokens):
    ex = Example("a", "¿Capital de Aragón?", "Zaragoza", ("Zaragoza",))
    data = tokenize_examples(tokens, [ex], sequence_length=256)
    ids, weights = data.ids[0], data.weights[0]
    prompt_len = len(encode_prompt(tokens, ex.prompt))
    assert weights[:prompt_len].sum() == 0
    assert weights[prompt_len:].all()
    assert tokens.decode(ids[prompt_len:-1]) == "Zaragoza" and ids[-1] == tokens.end_of_turn
    batch = make_batch(data, [0], data.num_targets)
    n = int(weights.sum())
    # position p predicts token p + 1: the targets are exactly the weighted tokens
    assert np.array_equal(batch["target_ids"][0, :n], ids[prompt_len:])
    assert np.array_equal(batch["target_positions"][0, :n], np.arange(prompt_len - 1, len(ids) - 1))
    assert batch["target_weights"][0, n:].sum() == 0


def test_long_context_is_trimmed_around_the_answer(tokens):
    filler = " ".join(f"palabra{i}" for i in range(300))
    context = f"{filler} La respuesta es Zaragoza según el texto. {filler}"
    ex = Example("a", qa_prompt("", context, "¿Cuál?"), "Zaragoza", ("Zaragoza",), context, context.index("Zaragoza"))
    data = tokenize_examples(tokens, [ex], sequence_length=128)
    assert data.trimmed == 1 and data.dropped == 0
    assert len(data.ids[0]) <= 128
    text = tokens.decode(data.ids[0])
    assert "Zaragoza" in text.split("Pregunta")[0]


def test_too_long_without_context_is_counted_not_silent(tokens, capsys):
    ex = Example("a", "palabra " * 400, "sí", ("sí",))
    ok = Example("b", "hola", "sí", ("sí",))
    data = tokenize_examples(tokens, [ex, ok], sequence_length=64)
    assert data.dropped == 1 and len(data) == 1
    assert "1 of 2 examples are longer than sequence_length=64" in capsys.readouterr().err
    with pytest.raises(KerasftError, match="no example fits"):
        tokenize_examples(tokens, [ex], sequence_length=64)
