"""Generation (greedy and seeded sampling) and response log-probabilities on the tiny presets,
checked against the full-vocabulary logits of the same backbone."""

import numpy as np
import pytest

from kerasft.config import ModelConfig
from kerasft.evaluate.generate import KerasModel, Sampling, generate_ids, response_logprobs
from kerasft.export.hf import keras_logits
from kerasft.models.presets import load_model

PROMPTS = ["Hola", "¿Cuál es la capital de España?", "El río Ebro atraviesa Zaragoza.", "Responde en español"]


@pytest.fixture(scope="module")
def model(tiny_preset):
    loaded = load_model(ModelConfig(preset=str(tiny_preset)))
    return KerasModel(loaded.backbone, loaded.tokenizer)


def _log_softmax(logits):
    shifted = logits - logits.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


def _batch_logits(model, sequences):
    """Full logits of right-padded sequences in one call (causal: padding after a row cannot
    change its logits)."""
    width = max(len(s) for s in sequences)
    ids = np.zeros((len(sequences), width), dtype=np.int32)
    mask = np.zeros_like(ids, dtype=bool)
    for r, seq in enumerate(sequences):
        ids[r, : len(seq)], mask[r, : len(seq)] = seq, True
    return keras_logits(model.backbone, ids, mask).astype(np.float64)


def test_greedy_is_the_argmax_of_the_logits(model):
    prompts = [model.encode_prompt(p) for p in PROMPTS]
    outputs, timing = model.generate(prompts, max_new_tokens=6, batch_size=3)
    assert timing["generated_tokens"] == sum(len(o) for o in outputs)
    assert sorted(i for _, rows, _ in timing["batches"] for i in rows) == [0, 1, 2, 3]
    logits = _batch_logits(model, [p + o for p, o in zip(prompts, outputs)])
    for r, (prompt, new) in enumerate(zip(prompts, outputs)):
        # Each new token is the argmax after everything before it; a short answer stopped on a stop id.
        predicted = logits[r, len(prompt) - 1 : len(prompt) + len(new)].argmax(axis=-1).tolist()
        assert predicted[: len(new)] == new
        assert len(new) == 6 or predicted[len(new)] in model.stop_ids


def test_sampling_is_reproducible_with_a_seed(model):
    prompts = [model.encode_prompt(p) for p in PROMPTS]
    run = lambda sampling: model.generate(prompts, 8, 4, sampling)[0]  # noqa: E731
    hot = Sampling(temperature=3.0, top_p=0.95, seed=7)
    first = run(hot)
    assert run(hot) == first  # same seed, same tokens (the seed state is rewound)
    assert run(Sampling(temperature=3.0, top_p=0.95, seed=8)) != first
    greedy = generate_ids(model._causal_lm, prompts, 8, 4, model.stop_ids)[0]
    # top_k=1 is greedy whatever the temperature.
    assert run(Sampling(temperature=5.0, top_k=1, seed=3)) == greedy != first


def test_prompts_prefilled_together_decode_as_one_by_one(model):
    """Prompts that join together share one prefill call (3 prompts padded to 4 rows here); their
    greedy and seeded answers equal those of prompts prefilled one at a time."""
    prompts = [model.encode_prompt(p) for p in PROMPTS][:3]
    for sampling in (Sampling(), Sampling(temperature=3.0, top_p=0.95, seed=7)):
        one_by_one = model.generate(prompts, 6, 1, sampling)[0]
        assert model.generate(prompts, 6, 4, sampling)[0] == one_by_one


def test_response_logprobs_match_full_logits(model):
    prompts = [model.encode_prompt(p) for p in PROMPTS]
    responses = [model.encode(r) for r in ("Madrid.", "La capital es Madrid", "Sí", "El Ebro pasa por Zaragoza y Tudela")]
    scores = model.logprobs(prompts, responses, batch_size=3)
    logits = _batch_logits(model, [p + r for p, r in zip(prompts, responses)])
    for r, (prompt, response, (total, count)) in enumerate(zip(prompts, responses, scores)):
        assert count == len(response)
        log_probs = _log_softmax(logits[r])
        expected = sum(log_probs[len(prompt) - 1 + k, token] for k, token in enumerate(response))
        assert total == pytest.approx(expected, abs=1e-3)


def test_response_logprobs_checks_lengths():
    with pytest.raises(ValueError):
        response_logprobs(None, [[1]], [], 2)
