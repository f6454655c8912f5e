"""The Hugging Face export carries what vLLM reads to serve it (vLLM cannot run on this CPU
machine; docs/SERVING.md has the command). Fields from vLLM's model_executor/models/gemma3.py
and llama.py (through transformers' Gemma3TextConfig / LlamaConfig) and its tokenizer and
generation-config loading: the architecture name its registry maps, the shapes, attention and
rope settings, tied embeddings (vLLM's Gemma3ForCausalLM asserts them), the tokenizer files with
the chat template, and the stop ids (vLLM stops on generation_config.json's eos_token_id list)."""

import json

import pytest

from kerasft.config import ModelConfig
from kerasft.export.hf import export_hf
from kerasft.models.presets import load_model

COMMON = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
          "num_key_value_heads", "head_dim", "rms_norm_eps", "attention_bias", "max_position_embeddings",
          "rope_theta", "tie_word_embeddings", "bos_token_id", "eos_token_id", "torch_dtype"}
VLLM_FIELDS = {
    "gemma3": ("Gemma3ForCausalLM", "gemma3_text", COMMON | {
        "hidden_activation", "query_pre_attn_scalar", "sliding_window", "layer_types", "rope_local_base_freq",
        "rope_scaling", "final_logit_softcapping", "attn_logit_softcapping"}),
    "llama3": ("LlamaForCausalLM", "llama", COMMON | {"hidden_act", "rope_scaling", "mlp_bias"}),
}


@pytest.mark.parametrize("family", ["gemma3", "llama3"])
def test_hf_export_has_what_vllm_reads(family, request, tmp_path):
    from kerasft.data.template import chat_tokens

    preset = request.getfixturevalue("tiny_presets" if family == "gemma3" else "tiny_llama_presets")[family]
    loaded = load_model(ModelConfig(preset=str(preset)))
    out = export_hf(loaded.backbone, loaded.tokenizer, tmp_path / "hf")
    config = json.loads((out / "config.json").read_text())
    architecture, model_type, fields = VLLM_FIELDS[family]
    assert config["architectures"] == [architecture] and config["model_type"] == model_type
    assert fields <= set(config), sorted(fields - set(config))
    if family == "gemma3":
        assert config["tie_word_embeddings"] is True and config["hidden_activation"] == "gelu_pytorch_tanh"
        assert len(config["layer_types"]) == config["num_hidden_layers"]
        assert set(config["layer_types"]) <= {"sliding_attention", "full_attention"}
    else:
        assert config["hidden_act"] == "silu"
    tokens = chat_tokens(loaded.tokenizer)
    tokenizer_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tokenizer_config["chat_template"]
    assert (out / "tokenizer.model").is_file() or (out / "tokenizer.json").is_file()
    generation = json.loads((out / "generation_config.json").read_text())
    assert set(tokens.stop_ids) <= set(generation["eos_token_id"])  # <end_of_turn> / <|eot_id|> stop vLLM too
    # The export's tokenizer, as vLLM loads it (transformers' AutoTokenizer), gives the training ids.
    import transformers

    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    text = "Hola, ¿qué tal? Vivo en Logroño."
    assert hf_tokenizer(text, add_special_tokens=False)["input_ids"] == tokens.encode(text)
