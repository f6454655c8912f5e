"""Token probabilities of `kerasft generate --json --top-k`: they come from the shared decode loop
(the server's logprobs) and must equal a softmax of the backbone's own logits, computed here by a
plain forward pass over prompt + generated prefix."""

import json

import numpy as np
import pytest

from kerasft.cli import main
from kerasft.config import ModelConfig
from kerasft.data.template import chat_tokens, encode_prompt
from kerasft.evaluate.generate import causal_lm_for, generate_ids, token_probabilities
from kerasft.export.hf import keras_logits
from kerasft.models.presets import load_model

PROMPTS = ["Hola", "¿Cuál es la capital de España?"]
NEW_TOKENS = 5
TOP_K = 5


@pytest.fixture(scope="module")
def generated(tiny_preset):
    loaded = load_model(ModelConfig(preset=str(tiny_preset)))
    tokens = chat_tokens(loaded.tokenizer)
    prompts = [encode_prompt(tokens, p, "") for p in PROMPTS]
    entries: list = []
    outputs, _ = generate_ids(causal_lm_for(loaded.backbone), prompts, NEW_TOKENS, 2, tokens.stop_ids, entries=entries)
    return loaded, tokens, prompts, outputs, entries


def _softmax(logits):
    shifted = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)


def test_probabilities_are_the_softmax_of_the_models_logits(generated):
    loaded, tokens, prompts, outputs, entries = generated
    assert any(outputs)
    for prompt, new, answer_entries in zip(prompts, outputs, entries):
        records = token_probabilities(answer_entries, tokens.decode, TOP_K)
        assert [r["id"] for r in records] == new
        sequence = np.asarray([prompt + new], np.int32)
        probs = _softmax(keras_logits(loaded.backbone, sequence)[0])
        for j, record in enumerate(records):
            row = probs[len(prompt) - 1 + j]  # position t predicts token t + 1
            assert record["prob"] == pytest.approx(row[record["id"]], abs=1e-5)
            assert record["token"] == tokens.decode([record["id"]])
            top = record["top"]
            assert len(top) == TOP_K
            assert [t["prob"] for t in top] == pytest.approx(np.sort(row)[::-1][:TOP_K], abs=1e-5)
            assert [t["prob"] for t in top] == pytest.approx([row[t["id"]] for t in top], abs=1e-5)
            # Greedy: the chosen token is the most likely one.
            assert record["prob"] == pytest.approx(top[0]["prob"], abs=1e-6)


def test_generate_cli_prints_tokens_with_alternatives(tiny_preset, generated, capsys):
    _, tokens, _, outputs, entries = generated
    assert main(["generate", str(tiny_preset), PROMPTS[0], "--max-new-tokens", str(NEW_TOKENS), "--json",
                 "--top-k", "3"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert line["response"] == tokens.decode(outputs[0])
    assert [t["id"] for t in line["tokens"]] == outputs[0]
    assert all(len(t["top"]) == 3 for t in line["tokens"])
    expected = token_probabilities(entries[0], tokens.decode, 3)
    assert [t["prob"] for t in line["tokens"]] == pytest.approx([t["prob"] for t in expected], abs=1e-6)
    assert main(["generate", str(tiny_preset), "Hola", "--top-k", "3"]) == 2  # --top-k needs --json
    assert "--top-k needs --json" in capsys.readouterr().err
