"""Preference tuning (train.objective dpo / orpo): the losses and their gradients equal those of
TRL's own trainers on the same batch (the tiny Gemma 3 and Llama presets exported to transformers
with the same LoRA as a PEFT adapter), pairs data, the pair batches, and a short run end to end."""

import json
from pathlib import Path
from types import SimpleNamespace

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kerasft.config import LORA_TARGETS, LoraConfig, ModelConfig, TrainConfig
from kerasft.data.pipeline import make_batch, tokenize_pairs
from kerasft.data.records import Example
from kerasft.data.template import chat_tokens
from kerasft.errors import KerasftError
from kerasft.export import hf
from kerasft.export.hf import IN_PER_HEAD, PER_HEAD, export_hf
from kerasft.export.peft import export_peft
from kerasft.models.lora import apply_lora, lora_layers
from kerasft.models.presets import load_model
from kerasft.train.loss import make_preference_loss_fn

ROOT = Path(__file__).resolve().parents[2]
RANK, ALPHA = 4, 8.0
PAIRS = [
    Example("a", "the cat sat on the mat", "the cat", ("the cat",), rejected="a dog ran in the park today"),
    Example("b", "where is the dog", "in the park", ("in the park",), rejected="the mat"),
    Example("c", "what did the cat do", "sat", ("sat",), rejected="it ran and ran"),
]
TOLERANCE = 1e-5
GRADIENT_TOLERANCE = {"llama": 3e-4}  # see _compare_grads


def _peft_layout_vjp(grad_a, grad_b, kernel_a, kernel_b, layout):
    """Gradients with respect to keras' LoRA factors from those with respect to PEFT's (lora_A,
    lora_B): the adjoint of kerasft.export.peft.peft_factors (the same reshapes, in jax)."""
    rank = kernel_b.shape[0]

    def factors(a, b):
        if layout == PER_HEAD:
            heads, hidden = a.shape[:2]
            return a.transpose(0, 2, 1).reshape(heads * rank, hidden), jnp.kron(jnp.eye(heads), b.T)
        if layout == IN_PER_HEAD:
            hidden, heads = a.shape[:2]
            return a.transpose(1, 2, 0).reshape(heads * rank, hidden), jnp.kron(jnp.eye(heads), b.T)
        return a.reshape(-1, rank).T, b.T

    _, vjp = jax.vjp(factors, jnp.asarray(kernel_a), jnp.asarray(kernel_b))
    return vjp((jnp.asarray(grad_a), jnp.asarray(grad_b)))


# Under the slow marker: on the loaded 2-core machine the Gemma 3 case took 8.5 min (3.5 of them to export),
# most of it transformers, PEFT and TRL starting up; CI runs `-m slow`.
@pytest.fixture(scope="module", params=[pytest.param("gemma3", marks=pytest.mark.slow),
                                        pytest.param("llama", marks=pytest.mark.slow)])
def setup(request, tiny_presets, tiny_llama_presets, tmp_path_factory):
    """A tiny preset exported to transformers, then random non-zero LoRA on every projection
    exported as a PEFT adapter for it, and a batch of three preference pairs tokenised by
    kerasft's pipeline."""
    family = request.param
    preset = tiny_presets[family] if family in tiny_presets else tiny_llama_presets[family]
    root = tmp_path_factory.mktemp(f"pref_{family}")
    loaded = load_model(ModelConfig(preset=str(preset)))
    backbone = loaded.backbone
    base_dir = export_hf(backbone, loaded.tokenizer, root / "base")
    apply_lora(backbone, LoraConfig(rank=RANK, alpha=ALPHA, targets=LORA_TARGETS))
    numbers = np.random.default_rng(5)
    for layer in lora_layers(backbone):
        for variable in (layer.lora_kernel_a, layer.lora_kernel_b):
            variable.assign(numbers.normal(0, 0.2, size=variable.shape).astype("float32"))
    exported = SimpleNamespace(backbone=backbone, base_dir=base_dir, family=family,
                               adapter_dir=export_peft(backbone, root / "adapter", base_model_name_or_path=str(base_dir)))
    tokens = chat_tokens(loaded.tokenizer)
    data = tokenize_pairs(tokens, PAIRS, 64)
    batch = make_batch(data, range(len(PAIRS)), data.num_targets, tokens.pad)
    params = {"lora": [v.value for v in backbone.trainable_variables]}
    frozen = [v.value for v in backbone.non_trainable_variables]
    return exported, batch, params, frozen


def _kerasft(setup, **train):
    exported, batch, params, frozen = setup
    loss_fn = make_preference_loss_fn(exported.backbone, TrainConfig(**train))
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, frozen, batch)
    return float(loss), stats, grads["lora"]


def _peft_model(exported):
    import peft
    import torch
    import transformers

    base = transformers.AutoModelForCausalLM.from_pretrained(str(exported.base_dir), dtype=torch.float32,
                                                             attn_implementation="eager")
    return peft.PeftModel.from_pretrained(base, str(exported.adapter_dir), is_trainable=True)


def _torch_batch(batch):
    """kerasft's pair batch as TRL's DPO collator lays it out: input_ids, attention_mask and
    completion_mask (1 on the response tokens the loss counts), chosen rows first."""
    import torch

    ids = batch["token_ids"].astype(np.int64)
    completion = np.zeros_like(ids)
    for row in range(len(ids)):
        positions = batch["target_positions"][row][batch["target_weights"][row] > 0]
        completion[row, positions + 1] = 1
    return {"input_ids": torch.from_numpy(ids), "attention_mask": torch.from_numpy(batch["padding_mask"].astype(np.int64)),
            "completion_mask": torch.from_numpy(completion)}


def _compare_grads(exported, model, keras_grads):
    """Every LoRA factor's gradient from PEFT (mapped to keras' layout) against kerasft's."""
    index = {id(v): i for i, v in enumerate(exported.backbone.trainable_variables)}
    named = dict(model.named_parameters())
    worst, scale, checked = 0.0, 0.0, 0
    for i in range(exported.backbone.num_layers):
        block = hf.decoder_block(exported.backbone, i)
        for _, attribute, module, layout in hf.projections(exported.backbone):
            layer = hf.projection(block, attribute)
            key = f"base_model.model.model.layers.{i}.{module}"
            grad_a = named[f"{key}.lora_A.default.weight"].grad.double().numpy()
            grad_b = named[f"{key}.lora_B.default.weight"].grad.double().numpy()
            theirs = _peft_layout_vjp(grad_a, grad_b, np.asarray(layer.lora_kernel_a), np.asarray(layer.lora_kernel_b),
                                      layout)
            ours = (keras_grads[index[id(layer.lora_kernel_a)]], keras_grads[index[id(layer.lora_kernel_b)]])
            for t, o in zip(theirs, ours):
                worst = max(worst, float(np.max(np.abs(np.asarray(t) - np.asarray(o)))))
                scale = max(scale, float(np.max(np.abs(np.asarray(o)))))
                checked += 1
    assert checked >= 2 * exported.backbone.num_layers
    assert scale > 1e-3, "gradients are too small to compare"
    # Llama's DPO gradients miss 1e-5 in float32 (2026-12-07: max 6.3e-5 at a largest gradient of 2.45; losses
    # within 1e-5). Float32 round-off, not a mapping bug (2026-12-07, jax_enable_x64 + torch .double(), this
    # batch): with both sides in float64 as shipped, grads still differ by 2.9e-5, because both libraries keep
    # float32 islands; with the islands lifted by patches (keras-hub's RMSNorm/SiLU/rope casts, jax's fused
    # attention, keras' result_type turning float64 into float32 in the LoRA merge and in ops.mean;
    # transformers' RMSNorm, rope and softmax casts) the base logits agree to 3.3e-14, the LoRA model's to
    # 9.6e-14, and the DPO grads to 1.6e-6 (loss 1.9e-8), the rest from TRL's fused LM-head kernel, which
    # computes log-probs in float32 (trl/kernels/chunked_logprob.py). A float64 test would need all those
    # patches of library internals, so the float32 comparison stays for Llama, at 3e-4: in CI's fresh venv of
    # 2026-12-07 22:00 (torch 2.13.0, transformers 5.25.0, peft 0.22.0, trl 1.16.0, jax 0.10.2) this test measured
    # 1.93e-4 at the same largest gradient 2.45, against 6.3e-5 in the earlier venv; why it moved is not known
    # (no kerasft code on this path changed). A mapping bug shows as an error of the gradients' own size.
    tolerance = GRADIENT_TOLERANCE.get(exported.family, TOLERANCE)
    assert worst < tolerance, f"max |gradient difference| {worst:.2e} (largest gradient {scale:.2e})"


def test_dpo_and_ipo_losses_and_gradients_equal_trl(setup, tmp_path):
    import datasets
    import transformers
    from trl import DPOConfig, DPOTrainer

    exported, batch, _, _ = setup
    beta = 0.5
    model = _peft_model(exported)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(exported.base_dir))
    args = DPOConfig(output_dir=str(tmp_path), beta=beta, report_to="none", use_cpu=True,
                     per_device_train_batch_size=len(PAIRS))
    pairs = datasets.Dataset.from_dict({"prompt": ["x"], "chosen": ["y"], "rejected": ["z"]})
    trainer = DPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
    # Given a PEFT model, TRL keeps a copy of its adapter ("ref") as the reference, as for
    # re-training an adapter; kerasft trains a new LoRA, whose reference is the base: TRL's case
    # of a new adapter (no "ref": adapters disabled).
    trainer.model.delete_adapter("ref")
    trainer.model.train()
    for loss_type in ("sigmoid", "ipo"):
        loss, stats, grads = _kerasft(setup, objective="dpo", beta=beta, dpo_loss=loss_type)
        trainer.loss_types = [loss_type]
        trainer.model.zero_grad()
        theirs = trainer._compute_loss(trainer.model, _torch_batch(batch), False)
        theirs.backward()
        assert abs(theirs.item() - loss) < TOLERANCE, (loss_type, theirs.item(), loss)
        metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
        assert metrics["rewards/accuracies"] == pytest.approx(float(stats["reward_accuracy"]), abs=1e-6)
        assert abs(metrics["rewards/margins"] - float(stats["reward_margin"])) < TOLERANCE
        assert abs(metrics["logps/chosen"] - float(stats["chosen_logps"])) < 1e-4  # summed log-probs: larger scale
        _compare_grads(exported, trainer.model, grads)


def test_orpo_loss_and_gradients_equal_trl(setup, tmp_path):
    import datasets
    import transformers
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    exported, batch, _, _ = setup
    beta = 0.25
    loss, stats, grads = _kerasft(setup, objective="orpo", beta=beta)
    model = _peft_model(exported)
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(exported.base_dir))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    args = ORPOConfig(output_dir=str(tmp_path), beta=beta, report_to="none", use_cpu=True,
                      per_device_train_batch_size=len(PAIRS))
    pairs = datasets.Dataset.from_dict({"prompt": ["x"], "chosen": ["y"], "rejected": ["z"]})
    trainer = ORPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer)
    trainer.model.train()
    inputs = _torch_batch(batch)
    n = len(PAIRS)
    labels = inputs["input_ids"].masked_fill(inputs["completion_mask"] == 0, -100)
    orpo_batch = {"chosen_input_ids": inputs["input_ids"][:n], "chosen_attention_mask": inputs["attention_mask"][:n],
                  "chosen_labels": labels[:n], "rejected_input_ids": inputs["input_ids"][n:],
                  "rejected_attention_mask": inputs["attention_mask"][n:], "rejected_labels": labels[n:]}
    theirs, metrics = trainer.get_batch_loss_metrics(trainer.model, orpo_batch)
    theirs.backward()
    assert abs(theirs.item() - loss) < TOLERANCE, (theirs.item(), loss)
    assert abs(metrics["rewards/margins"] - float(stats["reward_margin"])) < TOLERANCE
    assert abs(metrics["logps/chosen"] - float(stats["chosen_logps"])) < TOLERANCE
    _compare_grads(exported, trainer.model, grads)


def _pairs_file(path, count, offset=0):
    words = ["the cat", "a dog", "in the park", "on the mat", "sat", "ran", "today", "the mat"]
    rows = [{"id": f"p{offset + i}", "prompt": f"where is {words[i % 8]}",
             "chosen": words[(i + 1) % 8], "rejected": f"{words[(i + 2) % 8]} and {words[(i + 3) % 8]}"}
            for i in range(count)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_orpo_run_logs_pair_metrics_and_reports_the_held_out_pairs(tiny_preset, tmp_path, capsys):
    from kerasft.config import load_config
    from kerasft.workflow import run

    train, held_out = _pairs_file(tmp_path / "train.jsonl", 6), _pairs_file(tmp_path / "val.jsonl", 3, offset=6)
    overrides = [f"model.preset={tiny_preset}", f"data.train={train}", f"data.validation={held_out}",
                 f"data.eval={held_out}", "data.sequence_length=64", "train.max_steps=2", "train.batch_size=2",
                 "train.eval_every=2", f"output_dir={tmp_path}", "eval.batch_size=4", "eval.max_new_tokens=3",
                 "export.enabled=false"]
    cfg = load_config(ROOT / "configs/quickstart.yaml", [*overrides, "name=orpo", "train.objective=orpo", "train.beta=0.2"])
    run(cfg)
    records = [json.loads(line) for line in (tmp_path / "orpo" / "metrics.jsonl").read_text().splitlines()]
    for key in ("reward_accuracy", "reward_margin", "chosen_logps", "rejected_logps", "chosen_reward"):
        assert all(np.isfinite(r[key]) for r in records), key
    assert "eval_reward_accuracy" in records[-1] and "eval_loss" in records[-1]
    out = capsys.readouterr().out
    assert "acc " in out and "margin " in out  # the progress line
    assert (tmp_path / "orpo" / "preference_curves.png").is_file()
    report = (tmp_path / "orpo" / "report.md").read_text()
    assert "## Held-out preference pairs (3 pairs)" in report
    base, tuned = (json.loads((tmp_path / "orpo" / f).read_text())["preference"] for f in ("eval_base.json", "eval.json"))
    assert base["pairs"] == tuned["pairs"] == 3 and base["chosen_logps"] != tuned["chosen_logps"]

    # SFT data under a preference objective stops before the run dir is written, naming the record.
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n")
    bad = load_config(ROOT / "configs/quickstart.yaml", [*overrides, "name=bad", "train.objective=dpo", f"data.train={sft}"])
    with pytest.raises(KerasftError, match="sft.jsonl: line 1: no rejected answer"):
        run(bad)
    assert not (tmp_path / "bad").exists()


def test_memory_plan_lowers_the_preference_step(tiny_preset):
    from kerasft.config import load_config
    from kerasft.train.plan import plan_step

    def planned(*overrides):
        cfg = load_config(ROOT / "configs/quickstart.yaml", [f"model.preset={tiny_preset}", "data.sequence_length=128",
                                                              "train.batch_size=4", *overrides])
        return plan_step(cfg, "cpu", search=False).step

    sft, dpo = planned(), planned("train.objective=dpo")
    assert dpo.arguments > sft.arguments  # a pair is two rows: twice the batch
    assert dpo.peak > sft.peak


def test_studio_training_tab_offers_the_objective_and_a_pair_upload(tmp_path):
    from kerasft.ui.app import build_app

    app = build_app(tmp_path / "ws")
    ids = {c.get("props", {}).get("elem_id") for c in app.config["components"]}
    assert {"objective", "beta", "pair_upload", "col_rejected"} <= ids
    objective = next(c for c in app.config["components"] if c.get("props", {}).get("elem_id") == "objective")
    assert [choice[0] if isinstance(choice, (list, tuple)) else choice
            for choice in objective["props"]["choices"]] == ["sft", "dpo", "orpo"]
