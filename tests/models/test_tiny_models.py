"""The tiny presets load through keras-hub and behave like small Gemmas."""

import numpy as np
import pytest

from kerasft.testing import (
    BOS_ID,
    EOS_ID,
    FAMILIES,
    PAD_ID,
    UNK_ID,
    VOCABULARY_SIZE,
    tiny_spm_proto,
)

CHAT = "<start_of_turn>user\nHola<end_of_turn>\n<start_of_turn>model\n"
SAMPLES = (
    "¿Cuál es la capital de España? ¡Madrid!",
    "El niño comió piñas en Logroño el 12/03/2024.",
    "Ñandú, cigüeña, acción: á é í ó ú ü ñ Á É Í Ó Ú Ñ.",
    "  two  spaces,\ttabs\nand newlines\n\n",
    "Unseen script falls back to bytes: 日本語 🙂",
    CHAT + "Claro que sí.<end_of_turn>\n",
)

EXPECTED = {
    "gemma": dict(num_key_value_heads=2, use_sliding_window_attention=False),
    "gemma2": dict(
        num_key_value_heads=2,
        use_sliding_window_attention=True,
        sliding_window_size=8,
        attention_logit_soft_cap=50.0,
        final_logit_soft_cap=30.0,
        use_post_ffw_norm=True,
        use_post_attention_norm=True,
    ),
    "gemma3": dict(
        num_key_value_heads=1,
        use_sliding_window_attention=True,
        sliding_window_size=8,
        use_query_key_norm=True,
        attention_logit_soft_cap=None,
        final_logit_soft_cap=None,
    ),
}


def _batch(token_ids):
    token_ids = np.asarray([token_ids], dtype="int32")
    return {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}


def _ids(tokenizer, text):
    return np.asarray(tokenizer.tokenize(text)).tolist()


@pytest.fixture(scope="module")
def tokenizers(tiny_presets):
    import keras_hub

    return {
        family: keras_hub.tokenizers.Tokenizer.from_preset(str(path))
        for family, path in tiny_presets.items()
    }


@pytest.mark.parametrize("family", FAMILIES)
def test_preset_loads_with_expected_config(family, tiny_presets):
    import keras_hub

    backbone = keras_hub.models.Backbone.from_preset(str(tiny_presets[family]))
    config = backbone.get_config()
    for key, value in EXPECTED[family].items():
        assert config[key] == value, key
    assert config["hidden_dim"] == 32 and config["head_dim"] == 8
    assert config["num_query_heads"] == 4
    ffw_width = backbone.transformer_layers[0].gating_ffw.kernel.shape[-1]
    assert ffw_width == 64
    assert config["vocabulary_size"] == VOCABULARY_SIZE
    # Random norm scales: zeros would make every RMSNorm a plain normaliser.
    scales = [w for w in backbone.weights if w.path.endswith("scale")]
    assert scales and all(np.abs(np.asarray(w.numpy())).max() > 0 for w in scales)


def test_gemma3_has_local_and_global_layers(tiny_preset):
    import keras_hub

    backbone = keras_hub.models.Backbone.from_preset(str(tiny_preset))
    layers = backbone.transformer_layers
    local = [layer.use_sliding_window_attention for layer in layers]
    assert any(local) and not all(local)
    assert {layer.rope_wavelength for layer in layers} == {1e4, 1e6}


@pytest.mark.parametrize("family", FAMILIES)
def test_causal_lm_gives_finite_logits(family, tiny_presets, tokenizers):
    import keras_hub

    causal_lm = keras_hub.models.CausalLM.from_preset(
        str(tiny_presets[family]), preprocessor=None
    )
    token_ids = [BOS_ID] + _ids(tokenizers[family], CHAT + "Hola, ¿qué tal?")
    assert len(token_ids) > 8  # longer than the sliding window
    logits = np.asarray(causal_lm(_batch(token_ids)))
    assert logits.shape == (1, len(token_ids), VOCABULARY_SIZE)
    assert np.isfinite(logits).all()
    # Non-trivial weights: predictions differ between positions.
    assert logits.std() > 0.1 and not np.allclose(logits[0, 0], logits[0, -1])


def test_gemma3_loads_with_its_default_preprocessor(tiny_preset):
    import keras_hub

    causal_lm = keras_hub.models.CausalLM.from_preset(str(tiny_preset))
    assert isinstance(causal_lm.preprocessor, keras_hub.models.Gemma3CausalLMPreprocessor)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_sliding_window_is_exercised(family, tiny_presets):
    import keras_hub

    backbone = keras_hub.models.Backbone.from_preset(str(tiny_presets[family]))
    # A window wider than the input, not use_sliding_window_attention=False:
    # Gemma 3 ties the rope base to the flag, so that would change more.
    config = dict(backbone.get_config(), sliding_window_size=1024)
    global_only = type(backbone).from_config(config)
    global_only.set_weights(backbone.get_weights())
    batch = _batch(np.arange(10, 26))
    windowed, full = np.asarray(backbone(batch)), np.asarray(global_only(batch))
    # Same within the window, different once a token falls out of it.
    np.testing.assert_allclose(windowed[:, :8], full[:, :8], atol=1e-5)
    assert not np.allclose(windowed[:, 8:], full[:, 8:], atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_tokenizer_special_ids(family, tokenizers):
    tokenizer = tokenizers[family]
    assert (tokenizer.pad_token_id, tokenizer.end_token_id) == (PAD_ID, EOS_ID)
    assert tokenizer.start_token_id == BOS_ID
    assert tokenizer.token_to_id("<unk>") == UNK_ID
    assert tokenizer.vocabulary_size() == VOCABULARY_SIZE


@pytest.mark.parametrize("family", FAMILIES)
def test_turn_markers_are_single_tokens_in_running_text(family, tokenizers):
    tokenizer = tokenizers[family]
    start = tokenizer.token_to_id("<start_of_turn>")
    end = tokenizer.token_to_id("<end_of_turn>")
    ids = _ids(tokenizer, "<start_of_turn>user\nHola<end_of_turn>\n")
    assert ids[0] == start and ids.count(start) == 1 and ids.count(end) == 1
    assert tokenizer.detokenize([ids[ids.index(end)]]) == "<end_of_turn>"


def test_spanish_round_trips(tokenizers):
    tokenizer = tokenizers["gemma3"]
    for text in SAMPLES:
        assert _decode(tokenizer, _ids(tokenizer, text)) == text


def test_hf_tokenizer_gives_the_same_ids(tiny_spm, tokenizers):
    from transformers import GemmaTokenizer

    # transformers 5 has no slow GemmaTokenizer: `GemmaTokenizer(vocab_file=)`
    # silently builds a 5-token vocabulary. from_pretrained on a folder with
    # tokenizer.model converts the SentencePiece proto properly.
    hf_tokenizer = GemmaTokenizer.from_pretrained(str(tiny_spm.parent))
    assert len(hf_tokenizer) == VOCABULARY_SIZE
    assert (hf_tokenizer.pad_token_id, hf_tokenizer.eos_token_id) == (PAD_ID, EOS_ID)
    for family in FAMILIES:
        for text in SAMPLES:
            expected = _ids(tokenizers[family], text)
            assert hf_tokenizer.encode(text, add_special_tokens=False) == expected


def test_spm_is_deterministic():
    tiny_spm_proto.cache_clear()
    first = tiny_spm_proto()
    tiny_spm_proto.cache_clear()
    assert tiny_spm_proto() == first


def _decode(tokenizer, ids):
    text = tokenizer.detokenize(ids)
    return text.decode() if isinstance(text, bytes) else str(text)
