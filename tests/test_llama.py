"""Llama-family models (TinyLlama / Llama 2 and Llama 3) through the same code as Gemma: chat
templates chosen from the model, train / eval / export, export parity with transformers'
LlamaForCausalLM (grouped-query attention, tied and untied heads), GGUF and the Ollama Modelfile.

The tiny presets (tests/tiny_models.py): "llama" is TinyLlama-like (SentencePiece with a
dummy-prefix space, untied head), "llama3" is Llama 3.2-like (byte-level BPE, tied head, llama3
rope scaling); both have 4 query heads and 2 key/value heads.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from kerasft.config import LoraConfig, ModelConfig
from kerasft.errors import KerasftError
from kerasft.export.hf import export_hf, keras_logits, verify_hf_export
from kerasft.models.lora import LORA_TARGETS, apply_lora, lora_layers
from kerasft.models.presets import load_model

ROOT = Path(__file__).resolve().parent.parent
LLAMA_FAMILIES = ("llama", "llama3")
RANK, ALPHA = 4, 8.0
ATOL = 1e-4
# Longer than the llama3 preset's rope pretraining length (16), so the scaled frequencies matter.
TOKENS = np.array([[1, 5, 17, 40, 41, 99, 7, 3, 250, 12, 13, 14, 300, 301, 8, 9, 10, 11, 20, 21, 22, 23]], dtype=np.int32)
HISTORY = (("¿Qué río pasa por Zaragoza?", "El Ebro."),)
MESSAGES = [{"role": "system", "content": "Eres un guía."}, {"role": "user", "content": HISTORY[0][0]},
            {"role": "assistant", "content": HISTORY[0][1]}, {"role": "user", "content": "¿Y el puente?"}]


@pytest.fixture(scope="module", params=LLAMA_FAMILIES)
def exported(request, tiny_llama_presets, tmp_path_factory):
    """A family's base export, then LoRA on every projection with random non-zero A and B, its
    merged export and its PEFT adapter."""
    from kerasft.export.peft import export_peft

    family = request.param
    root = tmp_path_factory.mktemp(f"llama_export_{family}")
    loaded = load_model(ModelConfig(preset=str(tiny_llama_presets[family])))
    backbone = loaded.backbone
    base_dir = export_hf(backbone, loaded.tokenizer, root / "base")
    base_logits = keras_logits(backbone, TOKENS)
    apply_lora(backbone, LoraConfig(rank=RANK, alpha=ALPHA, targets=LORA_TARGETS))
    rng = np.random.default_rng(3)
    for layer in lora_layers(backbone):
        for variable in (layer.lora_kernel_a, layer.lora_kernel_b):
            variable.assign(rng.normal(0, 0.2, size=variable.shape).astype("float32"))
    return SimpleNamespace(
        family=family,
        loaded=loaded,
        backbone=backbone,
        base_logits=base_logits,
        lora_logits=keras_logits(backbone, TOKENS),
        base_dir=base_dir,
        merged_dir=export_hf(backbone, loaded.tokenizer, root / "merged"),
        adapter_dir=export_peft(backbone, root / "adapter", base_model_name_or_path=str(base_dir)),
    )


def _hf_model(path):
    import torch
    import transformers

    return transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _torch_logits(model):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(TOKENS.astype(np.int64))).logits.float().numpy()


def test_tiny_presets_cover_gqa_and_both_heads(exported):
    backbone = exported.backbone
    assert backbone.num_key_value_heads < backbone.num_query_heads
    assert type(backbone).__name__ == {"llama": "LlamaBackbone", "llama3": "Llama3Backbone"}[exported.family]
    assert backbone.token_embedding.tie_weights == (exported.family == "llama3")
    # every projection of both blocks got an adapter, the Dense MLP layers included
    assert len(lora_layers(backbone)) == len(LORA_TARGETS) * backbone.num_layers


def test_merged_export_matches_lora_model_in_transformers(exported):
    theirs = _torch_logits(_hf_model(exported.merged_dir))
    assert np.max(np.abs(theirs - exported.lora_logits)) < ATOL
    assert np.max(np.abs(theirs - exported.base_logits)) > 1e-2  # the adapters are really in the export
    check = verify_hf_export(exported.merged_dir, exported.backbone, TOKENS)
    assert check["ok"], check

    config = json.loads((exported.merged_dir / "config.json").read_text())
    assert (config["architectures"], config["model_type"]) == (["LlamaForCausalLM"], "llama")
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["tie_word_embeddings"] is (exported.family == "llama3")
    from safetensors.numpy import load_file

    tensors = load_file(str(exported.merged_dir / "model.safetensors"))
    assert ("lm_head.weight" in tensors) is (exported.family == "llama")
    assert tensors["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 8, 32)
    if exported.family == "llama3":
        assert config["rope_scaling"] == {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


def test_greedy_generation_matches_transformers(exported):
    """Greedy tokens from keras-hub's cached Llama decoder and from transformers' generate are the
    same ids: the export computes the same function at every decode position."""
    import torch
    import transformers

    from kerasft.evaluate.generate import causal_lm_for, generate_ids

    prompt = TOKENS[0, :6].tolist()
    stop_ids = (2, 200)
    ours, _ = generate_ids(causal_lm_for(exported.backbone), [prompt], 24, 1, stop_ids)
    with torch.no_grad():
        output = _hf_model(exported.merged_dir).generate(
            torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=list(stop_ids), pad_token_id=0,
            generation_config=transformers.GenerationConfig(do_sample=False),
        )
    theirs = output[0, len(prompt):].tolist()
    theirs = theirs[: next((i for i, t in enumerate(theirs) if t in stop_ids), len(theirs))]
    assert len(ours[0]) >= 8, ours
    assert ours[0] == theirs


def test_peft_adapter_on_the_base_export_matches_lora_model(exported):
    import peft

    model = peft.PeftModel.from_pretrained(_hf_model(exported.base_dir), str(exported.adapter_dir)).eval()
    theirs = _torch_logits(model)
    assert np.max(np.abs(theirs - exported.lora_logits)) < ATOL
    assert np.max(np.abs(theirs - exported.base_logits)) > 1e-2
    config = json.loads((exported.adapter_dir / "adapter_config.json").read_text())
    assert config["rank_pattern"]["q_proj"] == 4 * RANK and config["rank_pattern"]["k_proj"] == 2 * RANK


def test_merged_export_reloads_through_the_resolver(exported):
    """A merged Llama export is a local Hugging Face folder kerasft loads again (keras-hub's
    converter; a SentencePiece tokenizer.model makes it LlamaBackbone + LlamaTokenizer)."""
    from kerasft.data.template import chat_tokens

    reloaded = load_model(ModelConfig(preset=str(exported.merged_dir)))
    assert type(reloaded.backbone) is type(exported.backbone)
    assert np.max(np.abs(keras_logits(reloaded.backbone, TOKENS) - exported.lora_logits)) < ATOL
    assert chat_tokens(reloaded.tokenizer).template == chat_tokens(exported.loaded.tokenizer).template


def test_training_rendering_equals_transformers_chat_template(exported):
    """The exported tokenizer's chat_template renders the training text, and tokenises to the
    training ids (the Zephyr template's trailing newline after the last </s> aside)."""
    import transformers

    from kerasft.data.template import chat_tokens, encode_conversation, encode_prompt, render_chat

    tokens = chat_tokens(exported.loaded.tokenizer)
    assert tokens.template == {"llama": "zephyr", "llama3": "llama3"}[exported.family]
    hf_tok = transformers.AutoTokenizer.from_pretrained(str(exported.merged_dir))
    system, prompt, answer = MESSAGES[0]["content"], MESSAGES[-1]["content"], "El de Piedra."
    text = hf_tok.apply_chat_template(MESSAGES, tokenize=False, add_generation_prompt=True)
    assert text == render_chat(prompt, system=system, history=HISTORY, tokens=tokens)
    full = MESSAGES + [{"role": "assistant", "content": answer}]
    assert hf_tok.apply_chat_template(full, tokenize=False) == render_chat(prompt, answer, system, HISTORY, tokens=tokens)

    ids, weights = encode_conversation(tokens, prompt, answer, system, HISTORY)
    theirs = hf_tok.apply_chat_template(full, tokenize=True, return_dict=False)
    assert theirs[: len(ids)] == ids
    assert hf_tok.decode(theirs[len(ids):]).strip() == ""
    prompt_ids = encode_prompt(tokens, prompt, system, HISTORY)
    assert hf_tok.apply_chat_template(MESSAGES, tokenize=True, add_generation_prompt=True, return_dict=False) == prompt_ids
    # loss on both assistant turns and the token closing each, nothing else
    weighted = [i for i, w in zip(ids, weights) if w]
    assert weighted.count(tokens.end_of_turn) == 2 and weighted[-1] == tokens.end_of_turn
    assert tokens.decode([i for i in weighted if i not in tokens.stop_ids]).replace(" ", "") == "ElEbro.EldePiedra."
    generation = json.loads((exported.merged_dir / "generation_config.json").read_text())
    assert generation["eos_token_id"] == list(tokens.stop_ids)


def test_template_override_and_its_errors(tiny_llama_presets):
    from kerasft.config import load_config
    from kerasft.data.template import chat_tokens, encode_conversation, render_chat

    tokens = chat_tokens(load_model(ModelConfig(preset=str(tiny_llama_presets["llama3"]))).tokenizer)
    plain, _ = encode_conversation(tokens, "hola", "adiós", template="plain")
    assert plain[0] == tokens.bos and plain[-1] == tokens.eos
    assert render_chat("hola", "adiós", template="plain", tokens=tokens).startswith("<|begin_of_text|>### Instruction:")
    with pytest.raises(KerasftError, match="gemma needs the <start_of_turn> token"):
        encode_conversation(tokens, "hola", "adiós", template="gemma")
    with pytest.raises(KerasftError, match="data.template: 'chatml' is not one of auto, gemma, llama3, zephyr, plain"):
        load_config(None, ["data.template=chatml"])
    assert load_config(None, ["data.template=zephyr"]).data.template == "zephyr"


def test_train_eval_export_run(tiny_llama_presets, tmp_path):
    """`kerasft run` on each tiny Llama: trains (loss falls), evaluates and exports a merged
    checkpoint that transformers reproduces; the default trainable tokens become the family's."""
    from kerasft.cli import main
    from safetensors.numpy import load_file

    lines = [json.dumps({"prompt": f"Pregunta {i}", "response": "La respuesta es Zaragoza."}) for i in range(8)]
    (tmp_path / "few.jsonl").write_text("\n".join(lines) + "\n")
    for family in LLAMA_FAMILIES:
        argv = ["run", str(ROOT / "configs/quickstart.yaml"), f"model.preset={tiny_llama_presets[family]}",
                f"output_dir={tmp_path}", f"name={family}", f"data.train={tmp_path}/few.jsonl",
                f"data.eval={ROOT}/data/qa_es/heldout.json", "data.eval_limit=4", "data.sequence_length=256",
                "train.epochs=8", "train.batch_size=4", "train.learning_rate=1e-2", "train.warmup_ratio=0",
                "eval.max_new_tokens=8", "eval.compare_base=false", "lora.targets=[query,value,ffw_gating,ffw_linear]"]
        assert main(argv) == 0
        run = tmp_path / family
        losses = [json.loads(line)["loss"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert len(losses) == 16 and np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
        summary = json.loads((run / "summary.json").read_text())
        assert summary["export"]["verify"]["ok"], summary["export"]
        assert json.loads((run / "eval.json").read_text())["count"] == 4
        adapter = json.loads((run / "adapter/adapter_config.json").read_text())
        expected_rows = {"llama": None, "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]}[family]
        assert (adapter["trainable_tokens"] or {}).get("pieces") == expected_rows
        weights = load_file(str(run / "adapter/adapter.safetensors"))
        assert any("feedforward_gate_dense" in name for name in weights)
        config = json.loads((run / "export_hf/tokenizer_config.json").read_text())
        assert ("<|eot_id|>" if family == "llama3" else "<|assistant|>") in config["chat_template"]
