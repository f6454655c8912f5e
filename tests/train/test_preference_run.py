"""A DPO run as a whole, on the tiny Gemma 3 preset: interrupted and resumed it ends with the same
adapter, bit for bit, as the uninterrupted run; its merged Hugging Face export reloads in
transformers with the tuned model's logits; `kerasft serve`'s engine answers from its run dir with
the tuned model (one tiny run shared by these three tests). And ORPO under gradient accumulation
normalises its NLL per micro-batch, as TRL does."""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file

from kerasft.config import load_config

ROOT = Path(__file__).resolve().parents[2]
TOKENS = np.array([[2, 5, 17, 40, 41, 9, 33]], dtype=np.int32)


class Interrupted(Exception):
    """Raised in place of the loop's N-th batch: the run stops mid-way, as a killed one."""


def _config(tmp_path, tiny_preset, name):
    words = ["the cat", "a dog", "in the park", "on the mat", "sat", "ran", "today", "the mat"]
    pairs = tmp_path / "pairs.jsonl"
    if not pairs.is_file():
        pairs.write_text("".join(json.dumps({"prompt": f"where is {words[i]}", "chosen": words[(i + 1) % 8],
                                             "rejected": f"{words[(i + 2) % 8]} and {words[(i + 3) % 8]}"}) + "\n"
                                 for i in range(5)))
    # 5 pairs in batches of 2: 3 batches an epoch, so 4 steps x 2 micro-batches cross an epoch and
    # a checkpoint (every 2 steps) lands mid-epoch.
    return load_config(ROOT / "configs/quickstart.yaml", [
        f"model.preset={tiny_preset}", f"output_dir={tmp_path}", f"name={name}", f"data.train={pairs}",
        "data.sequence_length=64", "train.objective=dpo", "train.beta=0.5", "train.max_steps=4",
        "train.batch_size=2", "train.grad_accum=2", "train.learning_rate=1e-2", "train.checkpoint_every=2",
        "train.plots=false", "lora.dropout=0.1"])


@pytest.fixture(scope="module")
def dpo_runs(tiny_preset, tmp_path_factory):
    """("whole", "cut") run dirs of the same DPO run: one uninterrupted, one stopped at its 7th
    micro-batch (inside step 4, after the step-2 checkpoint) and resumed."""
    import kerasft.train.loop as loop
    from kerasft.workflow import run

    root = tmp_path_factory.mktemp("dpo_run")
    run(_config(root, tiny_preset, "whole"), evaluate=False, export=False)

    real, calls = loop.make_batch, [0]

    def make_batch(*args, **kwargs):
        calls[0] += 1
        if calls[0] == 7:
            raise Interrupted
        return real(*args, **kwargs)

    loop.make_batch = make_batch
    try:
        with pytest.raises(Interrupted):
            run(_config(root, tiny_preset, "cut"), evaluate=False, export=False)
    finally:
        loop.make_batch = real
    cut = root / "cut"
    assert not (cut / "adapter").exists() and (cut / "FAILED").is_file()
    assert sorted(p.name for p in (cut / "checkpoints").iterdir() if p.name.isdigit()) == ["2"]
    run(_config(root, tiny_preset, "cut"), evaluate=False, export=False, resume=True)
    return root / "whole", cut


@pytest.fixture(scope="module")
def tuned(dpo_runs):
    """The uninterrupted run's model as kerasft loads a run dir: its base preset plus the adapter."""
    from kerasft.models.presets import load_source

    return load_source(str(dpo_runs[0]))[0]


def test_interrupted_dpo_run_resumes_bit_for_bit(dpo_runs):
    whole, cut = dpo_runs
    expected, got = (load_file(str(run / "adapter/adapter.safetensors")) for run in (whole, cut))
    assert expected.keys() == got.keys()
    for key in expected:
        np.testing.assert_array_equal(expected[key], got[key], err_msg=key)
    assert any(np.abs(v).max() > 0 for k, v in expected.items() if "lora_kernel_b" in k)  # it trained
    steps = [[json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()] for run in (whole, cut)]
    assert [r["step"] for r in steps[1]] == [1, 2, 3, 4]
    for key in ("loss", "reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps"):
        assert [r[key] for r in steps[1]] == [r[key] for r in steps[0]], key


def test_dpo_run_exports_merged_to_transformers(dpo_runs, tuned, tiny_preset, tmp_path):
    from kerasft.cli import main
    from kerasft.config import ModelConfig
    from kerasft.export.verify import verify_hf_export
    from kerasft.models.presets import load_model

    whole, _ = dpo_runs
    assert main(["export", str(whole), str(tmp_path / "hf")]) == 0  # checks its logits itself (strict: float32)
    check = verify_hf_export(tmp_path / "hf", tuned.backbone, TOKENS)
    assert check["ok"], check
    base = verify_hf_export(tmp_path / "hf", load_model(ModelConfig(preset=str(tiny_preset))).backbone, TOKENS)
    assert not base["ok"] and base["max_abs_diff"] > 100 * check["max_abs_diff"], (base, check)


def test_serve_answers_from_a_dpo_run_dir(dpo_runs, tuned):
    from kerasft.export.hf import keras_logits
    from kerasft.serve import load_engine

    whole, _ = dpo_runs
    engine = load_engine(str(whole), max_tokens_limit=8, max_batch=1)
    try:
        assert engine.model_id == "whole"
        np.testing.assert_allclose(keras_logits(engine.causal_lm.backbone, TOKENS), keras_logits(tuned.backbone, TOKENS),
                                   atol=1e-5)
        request = engine.chat({"messages": [{"role": "user", "content": "where is the cat"}], "max_tokens": 4})
        answer = engine.generate(request["prompt_ids"], 4, [])
        # Greedy: the first token is the tuned model's most likely next token (or it stopped on one).
        first = int(np.argmax(keras_logits(tuned.backbone, np.array([request["prompt_ids"]], np.int32))[0, -1]))
        assert answer["ids"][:1] == [first] or (not answer["ids"] and first in engine.tokens.stop_ids), (answer, first)
        assert answer["finish_reason"] in ("stop", "length")
    finally:
        engine.close()


def test_orpo_nll_is_averaged_per_micro_batch_under_accumulation(tiny_preset):
    """Under train.grad_accum, ORPO's NLL term is normalised by each micro-batch's own tokens and
    the micro-batches' gradients averaged, as TRL's trainer does (its loss / accumulation steps),
    not by the whole step's tokens as SFT's loss is (the loss_normaliser the batches carry)."""
    import jax
    import optax

    from kerasft.config import LoraConfig, ModelConfig, TrainConfig
    from kerasft.data.pipeline import make_batch, tokenize_pairs
    from kerasft.data.records import Example
    from kerasft.data.template import chat_tokens
    from kerasft.models.lora import apply_lora, lora_layers
    from kerasft.models.presets import load_model
    from kerasft.train.loop import TrainSpec, accumulation_batches, build_step
    from kerasft.train.loss import make_preference_loss_fn

    loaded = load_model(ModelConfig(preset=str(tiny_preset)))
    apply_lora(loaded.backbone, LoraConfig(rank=2, alpha=4.0, targets=("query", "value")))
    numbers = np.random.default_rng(3)
    for layer in lora_layers(loaded.backbone):
        layer.lora_kernel_b.assign(numbers.normal(0, 0.1, layer.lora_kernel_b.shape).astype("float32"))
    tokens = chat_tokens(loaded.tokenizer)
    long = "the cat sat on the mat and the dog ran in the park today"
    pairs = [Example("a", long, "the cat", (), rejected="a dog"), Example("b", long, "sat", (), rejected="ran"),
             Example("c", "where", "here", (), rejected="the mat"), Example("d", "why", "so", (), rejected="it ran")]
    data = tokenize_pairs(tokens, pairs, 64)
    micro = [make_batch(data, rows, data.num_targets, tokens.pad, width=64) for rows in ([0, 1], [2, 3])]
    cfg = TrainConfig(objective="orpo", beta=0.25, batch_size=2, grad_accum=2)
    step = build_step(loaded.backbone, TrainSpec(cfg, pad_id=tokens.pad), total_steps=4)
    trainable, opt_state, frozen = step.state(loaded.backbone)
    loss_fn = make_preference_loss_fn(loaded.backbone, cfg)

    gradient = jax.jit(lambda batch: jax.grad(lambda p: loss_fn(p, frozen, batch)[0])(trainable))

    per_micro = float(optax.global_norm(jax.tree.map(lambda a, b: (a + b) / 2, *map(gradient, micro))))
    pooled = float(optax.global_norm(gradient(make_batch(data, [0, 1, 2, 3], data.num_targets, tokens.pad, width=64))))
    for batch in accumulation_batches(micro):
        trainable, opt_state, stats = step.fn(trainable, opt_state, frozen, batch)
    assert float(stats["grad_norm"]) == pytest.approx(per_micro, rel=1e-5)
    assert abs(pooled - per_micro) > 1e-3 * per_micro  # the test can tell the two normalisers apart
