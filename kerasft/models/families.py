"""What differs between the model families kerasft fine-tunes, kept in one place per family.

Architectures (the keras-hub backbone class decides):
    gemma / gemma2  GemmaBackbone (Gemma 2 = post norms and soft caps)
    gemma3          Gemma3Backbone (text)
    llama           LlamaBackbone: Llama 2, TinyLlama (SentencePiece vocabulary, untied head)
    llama3          Llama3Backbone: Llama 3, 3.1, 3.2 (byte-level BPE vocabulary; 3.2 1B/3B tie
                    their embeddings)
Llama and Llama 3 are the same network (keras-hub's Llama3Backbone subclasses LlamaBackbone and
transformers writes both as LlamaForCausalLM); they differ in tokenizer and chat template.

Chat templates (kerasft.data.template renders them) are chosen from the tokenizer: Gemma's turn
markers -> "gemma", Llama 3's header tokens -> "llama3", another SentencePiece vocabulary ->
"zephyr" (TinyLlama-Chat's <|user|> ... </s> turns); `data.template` overrides the choice.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from kerasft.config import LoraConfig
from kerasft.errors import KerasftError


@dataclass(frozen=True)
class Family:
    """One architecture family and everything kerasft does differently for it."""

    name: str
    backbone_class: str  # keras-hub class names
    causal_lm_class: str
    hf_architecture: str  # transformers class of the merged export
    hf_model_type: str
    gguf_architecture: str  # llama.cpp's architecture name
    context_length: int  # of the released models: GGUF metadata, Modelfile num_ctx, serving limit
    block_prefix: str  # keras-hub decoder block layer name, without the index
    final_norm: str  # keras-hub final RMSNorm layer name
    # kerasft LoRA target name -> keras-hub layer name, where they differ (Llama's MLP is Dense).
    lora_layer_names: tuple[tuple[str, str], ...] = ()


_LLAMA_MLP = (("ffw_gating", "feedforward_gate_dense"), ("ffw_gating_2", "feedforward_intermediate_dense"),
              ("ffw_linear", "feedforward_output_dense"))

# "llama" context: TinyLlama's 2048 (Llama 2 has 4096; a server or Modelfile may raise it).
FAMILIES = {
    "gemma": Family("gemma", "GemmaBackbone", "GemmaCausalLM", "GemmaForCausalLM", "gemma", "gemma", 8192,
                    "decoder_block", "final_normalization"),
    "gemma2": Family("gemma2", "GemmaBackbone", "GemmaCausalLM", "Gemma2ForCausalLM", "gemma2", "gemma2", 8192,
                     "decoder_block", "final_normalization"),
    "gemma3": Family("gemma3", "Gemma3Backbone", "Gemma3CausalLM", "Gemma3ForCausalLM", "gemma3_text", "gemma3", 32768,
                     "decoder_block", "final_normalization"),
    "llama": Family("llama", "LlamaBackbone", "LlamaCausalLM", "LlamaForCausalLM", "llama", "llama", 2048,
                    "transformer_layer", "sequence_output_layernorm", _LLAMA_MLP),
    "llama3": Family("llama3", "Llama3Backbone", "Llama3CausalLM", "LlamaForCausalLM", "llama", "llama", 131072,
                     "transformer_layer", "sequence_output_layernorm", _LLAMA_MLP),
}

LLAMA_FAMILIES = ("llama", "llama3")

# The projections of a Llama decoder block: kerasft LoRA target, attribute path in keras-hub's
# LlamaTransformerDecoder, module under HF's model.layers.N, kernel layout (kerasft.export.hf).
# Llama's q/k/v kernels are (hidden, heads, head_dim): IN_PER_HEAD.
LLAMA_PROJECTIONS = (
    ("query", "_self_attention_layer._query_dense", "self_attn.q_proj", "in_per_head"),
    ("key", "_self_attention_layer._key_dense", "self_attn.k_proj", "in_per_head"),
    ("value", "_self_attention_layer._value_dense", "self_attn.v_proj", "in_per_head"),
    ("attention_output", "_self_attention_layer._output_dense", "self_attn.o_proj", "flat"),
    ("ffw_gating", "_feedforward_gate_dense", "mlp.gate_proj", "flat"),
    ("ffw_gating_2", "_feedforward_intermediate_dense", "mlp.up_proj", "flat"),
    ("ffw_linear", "_feedforward_output_dense", "mlp.down_proj", "flat"),
)

# (transformers module, attribute of keras-hub's decoder block) of a Llama block's RMSNorms. Both
# compute x * w, so the scales copy as they are.
LLAMA_NORMS = (("input_layernorm", "_self_attention_layernorm"), ("post_attention_layernorm", "_feedforward_layernorm"))

# Turn tokens whose embedding rows train with the adapters by default (lora.trainable_tokens),
# per chat template: a base model may never have seen them (Llama 3 base's header and eot rows
# are untrained). The Zephyr template's only special token, </s>, is trained already.
TURN_TOKENS = {
    "gemma": ("<start_of_turn>", "<end_of_turn>"),
    "llama3": ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"),
    "zephyr": (),
    "plain": (),
}


def model_family(backbone) -> str | None:
    """"gemma", "gemma2", "gemma3", "llama" or "llama3" for a keras-hub backbone, None for
    anything else."""
    name = type(backbone).__name__
    if name == "GemmaBackbone":
        # keras-hub builds Gemma 2 as GemmaBackbone with post norms and soft caps.
        return "gemma2" if getattr(backbone, "use_post_ffw_norm", False) else "gemma"
    return next((family.name for family in FAMILIES.values() if family.backbone_class == name), None)


def family_of(backbone) -> Family:
    """The Family of a backbone; a KerasftError naming the supported ones otherwise."""
    family = model_family(backbone)
    if family is None:
        raise KerasftError(
            f"{type(backbone).__name__} is not a supported model; kerasft supports Gemma 1, 2 and 3, "
            "Llama 2 / TinyLlama and Llama 3 (keras-hub GemmaBackbone, Gemma3Backbone, LlamaBackbone, Llama3Backbone)"
        )
    return FAMILIES[family]


def lora_target_name(family: str | None, layer_name: str) -> str:
    """The kerasft LoRA target name (lora.targets) of a keras-hub layer of this family."""
    for target, name in FAMILIES[family].lora_layer_names if family in FAMILIES else ():
        if name == layer_name:
            return target
    return layer_name


def ties_embeddings(backbone) -> bool:
    """Whether the output projection is the input embedding (Gemma, Llama 3.2 1B/3B) or a
    separate matrix (Llama 2, TinyLlama, Llama 3 8B)."""
    return bool(getattr(backbone.token_embedding, "tie_weights", True))


def output_head(backbone):
    """The (vocabulary, hidden) output projection: the embedding table when tied, else the
    transpose of keras-hub's separate `reverse_embeddings` (hidden, vocabulary)."""
    embedding = backbone.token_embedding
    return embedding.embeddings if ties_embeddings(backbone) else embedding.reverse_embeddings


def tokenizer_kind(tokenizer) -> str:
    """"sentencepiece" or "bpe" (byte-level, with vocabulary and merges) for a keras-hub tokenizer."""
    if getattr(tokenizer, "proto", None):
        return "sentencepiece"
    if getattr(tokenizer, "merges", None) is not None and getattr(tokenizer, "vocabulary", None) is not None:
        return "bpe"
    raise KerasftError(f"{type(tokenizer).__name__}: kerasft needs a SentencePiece or byte-level BPE tokenizer")


def trainable_turn_tokens(configured: tuple, template: str) -> tuple:
    """lora.trainable_tokens for a model whose chat template is `template`: the configured
    pieces, except that the default (Gemma's turn tokens) becomes the template's own turn tokens."""
    if tuple(configured) == LoraConfig.trainable_tokens and template != "gemma":
        return TURN_TOKENS.get(template, ())
    return tuple(configured)


def llama3_rope_factors(head_dim: int, base: float, factor: float, low: float, high: float, original: float):
    """Llama 3.1+'s per-frequency rope divisors (llama.cpp's `rope_freqs.weight`): 1 for short
    wavelengths, `factor` for long ones, smoothly between (the formula of transformers,
    keras-hub and llama.cpp's converter)."""
    low_wavelength, high_wavelength = original / low, original / high
    factors = []
    for i in range(0, head_dim, 2):
        wavelength = 2 * math.pi * base ** (i / head_dim)
        if wavelength < high_wavelength:
            factors.append(1.0)
        elif wavelength > low_wavelength:
            factors.append(float(factor))
        else:
            smooth = (original / wavelength - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


# Backbone constructor arguments of keras-hub presets, so memory plans need no download. From the
# published checkpoints' configs (HF config.json); keras-hub's Gemma 1/2 intermediate_dim is
# twice HF's intermediate_size, Gemma 3's equals it. tests/train/test_plan.py checks each against the
# parameter count in keras-hub's preset metadata.
_GEMMA2 = dict(query_head_dim_normalize=True, use_post_ffw_norm=True, use_post_attention_norm=True,
               attention_logit_soft_cap=50.0, final_logit_soft_cap=30.0, use_sliding_window_attention=True,
               sliding_window_size=4096)
_GEMMA3 = dict(query_head_dim_normalize=True, use_query_key_norm=True, use_post_ffw_norm=True,
               use_post_attention_norm=True, attention_logit_soft_cap=None, final_logit_soft_cap=None,
               use_sliding_window_attention=True, sliding_window_size=512, image_size=None)
KNOWN_ARCHITECTURES = {
    "gemma_2b_en": ("GemmaBackbone", dict(vocabulary_size=256000, num_layers=18, num_query_heads=8,
                                          num_key_value_heads=1, hidden_dim=2048, intermediate_dim=32768, head_dim=256)),
    "gemma_7b_en": ("GemmaBackbone", dict(vocabulary_size=256000, num_layers=28, num_query_heads=16,
                                          num_key_value_heads=16, hidden_dim=3072, intermediate_dim=49152, head_dim=256)),
    "gemma2_2b_en": ("GemmaBackbone", dict(vocabulary_size=256000, num_layers=26, num_query_heads=8,
                                           num_key_value_heads=4, hidden_dim=2304, intermediate_dim=18432, head_dim=256,
                                           **_GEMMA2)),
    "gemma2_9b_en": ("GemmaBackbone", dict(vocabulary_size=256000, num_layers=42, num_query_heads=16,
                                           num_key_value_heads=8, hidden_dim=3584, intermediate_dim=28672, head_dim=256,
                                           **_GEMMA2)),
    "gemma3_270m": ("Gemma3Backbone", dict(vocabulary_size=262144, num_layers=18, num_query_heads=4,
                                           num_key_value_heads=1, hidden_dim=640, intermediate_dim=2048, head_dim=256,
                                           **_GEMMA3)),
    "gemma3_1b": ("Gemma3Backbone", dict(vocabulary_size=262144, num_layers=26, num_query_heads=4,
                                         num_key_value_heads=1, hidden_dim=1152, intermediate_dim=6912, head_dim=256,
                                         **_GEMMA3)),
}

# Instruction-tuned presets share their base model's architecture.
for _name in list(KNOWN_ARCHITECTURES):
    KNOWN_ARCHITECTURES[_name.replace("_", "_instruct_", 1)] = KNOWN_ARCHITECTURES[_name]
KNOWN_ARCHITECTURES["embedded"] = KNOWN_ARCHITECTURES["gemma3_270m"]
