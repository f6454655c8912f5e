"""Tiny random Gemma and Llama presets and their tiny tokenizers, built offline.

Tests load these through the real keras-hub path (`from_preset` on a local
directory), so nothing in the suite needs a model hub. The same functions back
`scripts/make_tiny_presets.py`, which writes the presets for inspection, and
`scripts/bench.py --smoke`. Not imported by `import kerasft` or the CLI.
"""

from __future__ import annotations

import functools
import io
import json
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from kerasft.config import LoraConfig, ModelConfig
from kerasft.data.template import LLAMA3_SPLIT
from kerasft.export.hf import export_hf, keras_logits
from kerasft.export.peft import export_peft
from kerasft.models.lora import LORA_TARGETS, apply_lora, lora_layers
from kerasft.models.presets import load_model

FAMILIES = ("gemma", "gemma2", "gemma3")
# Built on demand (fixture tiny_llama_presets): "llama" mirrors TinyLlama (SentencePiece, untied
# head), "llama3" mirrors Llama 3.2 1B (byte-level BPE, tied head, llama3 rope scaling). Both use
# grouped-query attention (4 query heads, 2 key/value heads).
LLAMA_FAMILIES = ("llama", "llama3")

# Llama 2's SentencePiece ids (no pad) and Llama 3's special tokens, appended after the BPE
# vocabulary as in the real one (ids 128000+ there).
LLAMA_UNK_ID, LLAMA_BOS_ID, LLAMA_EOS_ID = 0, 1, 2
LLAMA3_SPECIAL_TOKENS = ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                         "<|eot_id|>", "<|reserved_special_token_0|>")
LLAMA_VOCABULARY_SIZE = 384

# Ids follow the real Gemma vocabulary, which kerasft relies on (pad 0, eos 1).
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3

# Chat-turn and image markers must be single pieces, as in Gemma's real
# tokenizer. Gemma3Tokenizer looks up the three image tokens (a vocabulary
# without them would load only with has_vision_tokens=False, which the HF
# converter would then also pick), and transformers' GemmaTokenizer appends
# `<mask>` as a new id past the vocabulary unless it is already in it.
USER_DEFINED_SYMBOLS = (
    "<mask>",
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<img>",
    "<unused0>",
    "<unused1>",
)

VOCABULARY_SIZE = 512

_CORPUS = (
    "¿Cuál es la capital de España? La capital de España es Madrid.",
    "¡Hola! ¿Cómo estás? Muy bien, gracias.",
    "El niño comió una manzana y bebió agua fría.",
    "La señora Núñez vive en Logroño desde 1998.",
    "Mañana lloverá en Córdoba, según el pronóstico.",
    "El pingüino camina sobre el hielo; la cigüeña vuela alto.",
    "Responde en español: ¿cuántos días tiene una semana? Siete.",
    "El año 2024 tuvo 366 días porque fue bisiesto.",
    "Él está aquí, pero ella salió a las 9:30.",
    "Según el artículo 14, todos somos iguales ante la ley.",
    "La canción más famosa de la película dura 3 minutos y 45 segundos.",
    "Contexto: Miguel de Cervantes escribió el Quijote en 1605.",
    "Pregunta: ¿Quién escribió el Quijote? Respuesta: Miguel de Cervantes.",
    "El río Ebro atraviesa Zaragoza; el Guadalquivir, Sevilla.",
    "Compré 12 huevos, 2 kilos de azúcar y 1,5 litros de leche.",
    "Resumen: el informe analiza la economía y la educación.",
    "Traduce al inglés: «el perro duerme en el sofá».",
    "¿Por qué el cielo es azul? Por la dispersión de la luz.",
    "Hace años que no veo a mi abuela; la echo de menos.",
    "The quick brown fox jumps over the lazy dog.",
    "What is the capital of France? The capital of France is Paris.",
    "Hello, world! How are you today? I'm fine, thanks.",
    "In 1969, Apollo 11 landed on the Moon.",
    "Answer the question using the context below.",
    "Question: Who wrote Don Quixote? Answer: Miguel de Cervantes.",
    "She bought 3 apples, 4 pears and 10 grapes for $5.25.",
    "Please summarize the following text in one sentence.",
    "The weather today is sunny, with a high of 25 degrees.",
    "Translate to Spanish: \"the cat sleeps on the sofa\".",
    "It's a long way to the top (if you want to rock & roll).",
    "Machine learning models learn patterns from data.",
    "The train leaves at 10:45 from platform 7.",
    "Email me at test@example.com or call 555-0199.",
    "user\nHola, ¿puedes ayudarme?\nmodel\nClaro que sí.",
    "user\nWhat is 2 + 2?\nmodel\n2 + 2 = 4.",
    "Línea uno.\nLínea dos.\n\nOtro párrafo: á é í ó ú ü ñ Á É Í Ó Ú Ñ.",
    "    indented code: def f(x): return x * 2",
)


def _train_spm(sentences, vocab_size: int, **conventions) -> bytes:
    """Trains a tiny BPE SentencePiece model on `sentences` with the settings both families share
    (raw text in, bytes for anything unseen, no normalisation, whitespace kept as written, digits
    split) plus the family's `conventions`; returns the serialized proto."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        byte_fallback=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        split_digits=True,
        character_coverage=1.0,
        # One thread and the whole corpus keep the output byte-identical.
        num_threads=1,
        input_sentence_size=0,
        shuffle_input_sentence=False,
        minloglevel=2,
        **conventions,
    )
    return model.getvalue()


@functools.lru_cache(maxsize=1)
def tiny_spm_proto() -> bytes:
    """A tiny BPE SentencePiece model with Gemma's conventions: <pad> 0, <eos> 1, <bos> 2,
    <unk> 3, no dummy prefix (leading spaces and newlines kept as written), the chat tokens as
    user-defined symbols. Cached: training takes about a second."""
    return _train_spm(
        _CORPUS, VOCABULARY_SIZE, add_dummy_prefix=False,
        pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
        pad_piece="<pad>", eos_piece="<eos>", bos_piece="<bos>", unk_piece="<unk>",
        user_defined_symbols=list(USER_DEFINED_SYMBOLS),
    )


@functools.lru_cache(maxsize=1)
def tiny_llama_spm_proto() -> bytes:
    """A tiny BPE SentencePiece model with Llama 2 / TinyLlama's conventions: <unk> 0, <s> 1,
    </s> 2, no pad, a dummy-prefix space."""
    return _train_spm(
        _CORPUS + ("<|user|>\n¿Qué tal?</s>\n<|assistant|>\nBien.", "<|system|>\nEres útil."),
        LLAMA_VOCABULARY_SIZE, add_dummy_prefix=True,
        unk_id=LLAMA_UNK_ID, bos_id=LLAMA_BOS_ID, eos_id=LLAMA_EOS_ID, pad_id=-1,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
    )


@functools.lru_cache(maxsize=1)
def tiny_llama3_bpe() -> tuple[dict, list]:
    """A tiny byte-level BPE (vocabulary, merges) trained with Llama 3's pre-tokenizer, with
    Llama 3's special tokens at the end of the vocabulary."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(ignore_merges=True))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    trainer = trainers.BpeTrainer(
        vocab_size=LLAMA_VOCABULARY_SIZE - len(LLAMA3_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    state = json.loads(tokenizer.to_str())["model"]
    vocabulary = dict(state["vocab"])
    for token in LLAMA3_SPECIAL_TOKENS:
        vocabulary[token] = len(vocabulary)
    merges = [m if isinstance(m, str) else " ".join(m) for m in state["merges"]]
    return vocabulary, merges


def write_tiny_spm(path) -> Path:
    """Writes the tiny SentencePiece model to `path` and returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(tiny_spm_proto())
    return path


def backbone_config(family: str, vocabulary_size: int) -> dict:
    """Tiny constructor arguments mirroring the real preset of `family`.

    gemma mirrors gemma_2b_en, gemma2 mirrors gemma2_2b_en and gemma3 mirrors
    gemma3_270m (the flags keras-hub's HF converters set for those models).
    """
    common = dict(
        vocabulary_size=vocabulary_size,
        num_layers=2,
        num_query_heads=4,
        num_key_value_heads=2,
        hidden_dim=32,
        # A feed-forward width of 64 (HF intermediate_size) in every family,
        # so its kernels are not square and a missed transpose fails loudly.
        # keras-hub's Gemma 1/2 intermediate_dim is twice that width.
        intermediate_dim=2 * 64,
        head_dim=8,
        dtype="float32",
    )
    if family == "gemma":
        return common
    if family == "gemma2":
        return dict(
            common,
            # query_pre_attn_scalar == head_dim, as in gemma2_2b.
            query_head_dim_normalize=True,
            use_post_ffw_norm=True,
            use_post_attention_norm=True,
            attention_logit_soft_cap=50.0,
            final_logit_soft_cap=30.0,
            use_sliding_window_attention=True,
            sliding_window_size=8,
        )
    if family == "gemma3":
        return dict(
            common,
            image_size=None,
            # Gemma3Backbone hard-codes five local layers then one global
            # (rope 1e4 local, 1e6 global), so six layers give both kinds.
            num_layers=6,
            intermediate_dim=64,
            num_key_value_heads=1,
            query_head_dim_normalize=True,
            use_query_key_norm=True,
            use_post_ffw_norm=True,
            use_post_attention_norm=True,
            attention_logit_soft_cap=None,
            final_logit_soft_cap=None,
            use_sliding_window_attention=True,
            sliding_window_size=8,
        )
    if family in LLAMA_FAMILIES:
        config = dict(
            vocabulary_size=vocabulary_size,
            num_layers=2,
            num_query_heads=4,
            num_key_value_heads=2,
            hidden_dim=32,
            intermediate_dim=64,
            rope_max_wavelength=10000.0,
            layer_norm_epsilon=1e-5,
            tie_word_embeddings=family == "llama3",
            dtype="float32",
        )
        if family == "llama3":
            # Llama 3.1/3.2's frequency-dependent rope scaling; with head size 8 and a pretraining
            # length of 200 its four frequencies fall in all three regimes (kept, smoothed, scaled).
            config.update(rope_max_wavelength=500000.0, rope_frequency_adjustment_factor=8.0,
                          rope_low_freq_factor=1.0, rope_high_freq_factor=4.0,
                          rope_pretraining_sequence_length=200)
        return config
    raise ValueError(f"Unknown family {family!r}; expected one of {FAMILIES + LLAMA_FAMILIES}")


def _randomize(backbone, seed: int) -> None:
    """Overwrites every weight with seeded normals so no layer is trivial.

    Norm scales get std 0.1 (keras-hub's RMSNorm multiplies by 1 + scale, so
    zeros would skip them); matrices get std 1/sqrt(fan-in) to keep
    activations and logits of order one.
    """
    rng = np.random.default_rng(seed)
    hidden_dim = backbone.hidden_dim
    for variable in backbone.weights:
        if "float" not in str(variable.dtype):
            continue  # e.g. seed-generator state, should a layer add one
        shape = tuple(variable.shape)
        if len(shape) == 1 and "layernorm" in variable.path:
            # Llama's RMSNorm multiplies by the scale itself (Gemma's by 1 + scale).
            variable.assign((1.0 + rng.normal(0.0, 0.1, size=shape)).astype("float32"))
            continue
        if len(shape) == 1:
            std = 0.1
        elif "embedding" in variable.path:
            std = 1.0 / np.sqrt(hidden_dim)
        else:
            std = 1.0 / np.sqrt(shape[-2])
        variable.assign(rng.normal(0.0, std, size=shape).astype("float32"))


def build_tiny_preset(family: str, out_dir, *, seed: int = 0) -> Path:
    """Builds and saves a tiny random Gemma or Llama preset with its tokenizer.

    Args:
        family: "gemma", "gemma2", "gemma3", "llama" or "llama3".
        out_dir: Preset directory to write.
        seed: Seed of the random weights.

    Returns:
        `out_dir`, loadable with keras-hub's `from_preset(str(out_dir))`.
    """
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras_hub

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if family == "llama":
        tokenizer = keras_hub.models.LlamaTokenizer(proto=tiny_llama_spm_proto())
        preprocessor = keras_hub.models.LlamaCausalLMPreprocessor(tokenizer)
        backbone_cls = keras_hub.models.LlamaBackbone
    elif family == "llama3":
        vocabulary, merges = tiny_llama3_bpe()
        tokenizer = keras_hub.models.Llama3Tokenizer(vocabulary=vocabulary, merges=merges)
        preprocessor = keras_hub.models.Llama3CausalLMPreprocessor(tokenizer)
        backbone_cls = keras_hub.models.Llama3Backbone
    elif family == "gemma3":
        tokenizer = keras_hub.models.Gemma3Tokenizer(proto=tiny_spm_proto())
        preprocessor = keras_hub.models.Gemma3CausalLMPreprocessor(tokenizer)
        backbone_cls = keras_hub.models.Gemma3Backbone
    else:
        tokenizer = keras_hub.models.GemmaTokenizer(proto=tiny_spm_proto())
        preprocessor = keras_hub.models.GemmaCausalLMPreprocessor(tokenizer)
        backbone_cls = keras_hub.models.GemmaBackbone
    backbone = backbone_cls(**backbone_config(family, tokenizer.vocabulary_size()))
    _randomize(backbone, seed)
    backbone.save_to_preset(str(out_dir))
    if family == "llama3":
        # keras-hub 0.32's LlamaBackbone.get_config leaves tie_word_embeddings out, so a tied
        # preset would reload untied (and fail on the missing output matrix).
        config_path = out_dir / "config.json"
        saved = json.loads(config_path.read_text())
        saved["config"]["tie_word_embeddings"] = True
        config_path.write_text(json.dumps(saved, indent=4))
    # Writes tokenizer.json and the vocabulary too. preprocessor.json is what
    # the real presets ship; without it Gemma3CausalLM.from_preset(dir) with
    # its default preprocessor looks for image_converter.json and fails.
    preprocessor.save_to_preset(str(out_dir))
    return out_dir


def export_base_and_lora(preset, root, tokens, rank=4, alpha=8.0, seed=7):
    """Loads a preset, exports it, adds LoRA on every projection with random non-zero A and B
    (so the merge is really tested), and exports the merged model and its PEFT adapter.

    Returns a namespace with loaded, backbone, base/lora Keras logits on `tokens`, base_dir,
    merged_dir and adapter_dir.
    """
    loaded = load_model(ModelConfig(preset=str(preset)))
    backbone = loaded.backbone
    base_dir = export_hf(backbone, loaded.tokenizer, root / "base")
    base_logits = keras_logits(backbone, tokens)
    apply_lora(backbone, LoraConfig(rank=rank, alpha=alpha, targets=LORA_TARGETS))
    rng = np.random.default_rng(seed)
    for layer in lora_layers(backbone):
        for variable in (layer.lora_kernel_a, layer.lora_kernel_b):
            variable.assign(rng.normal(0, 0.2, size=variable.shape).astype("float32"))
    return SimpleNamespace(
        loaded=loaded,
        backbone=backbone,
        base_logits=base_logits,
        lora_logits=keras_logits(backbone, tokens),
        base_dir=base_dir,
        merged_dir=export_hf(backbone, loaded.tokenizer, root / "merged"),
        adapter_dir=export_peft(backbone, root / "adapter", base_model_name_or_path=str(base_dir)),
    )
