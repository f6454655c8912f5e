"""models.attention: the copy-free multi-query attention computes what keras-hub's does: the same
hidden states (padding, sliding windows and soft caps included), the same gradients, the same
cached generation."""

import jax
import numpy as np
import pytest

from kerasft.models.attention import use_mqa_layout


def _pair(family, tiny_presets):
    """Two backbones of `family` with one key/value head and the same weights; the second uses
    the copy-free attention."""
    import keras_hub

    reference = keras_hub.models.Backbone.from_preset(str(tiny_presets[family]))
    config = {**reference.get_config(), "num_key_value_heads": 1}
    backbones = [type(reference).from_config(config) for _ in range(2)]
    rng = np.random.default_rng(0)
    weights = [rng.normal(0, 0.2, w.shape).astype("float32") for w in backbones[0].weights]
    for backbone in backbones:
        backbone.set_weights(weights)
    assert use_mqa_layout(backbones[1]) == len(backbones[1].transformer_layers)
    assert use_mqa_layout(backbones[1]) == 0  # bound once
    return backbones


def _inputs():
    ids = np.random.default_rng(1).integers(4, 200, (2, 24)).astype("int32")
    mask = np.ones((2, 24), bool)
    mask[1, 17:] = False  # a padded row
    return {"token_ids": ids, "padding_mask": mask}


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
def test_same_hidden_states_and_gradients(family, tiny_presets):
    keras_hub_attention, copy_free = _pair(family, tiny_presets)
    inputs = _inputs()

    def loss(backbone):
        def of(trainable):
            hidden, _ = backbone.stateless_call(trainable, [v.value for v in backbone.non_trainable_variables], inputs)
            return (hidden * inputs["padding_mask"][..., None]).sum() * 1e-2, hidden

        return jax.value_and_grad(of, has_aux=True)([v.value for v in backbone.trainable_variables])

    (value_a, hidden_a), grads_a = loss(keras_hub_attention)
    (value_b, hidden_b), grads_b = loss(copy_free)
    np.testing.assert_allclose(hidden_b, hidden_a, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(value_b, value_a, rtol=1e-5)
    for a, b in zip(grads_a, grads_b):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_same_cached_generation(tiny_presets):
    """kerasft's generation (keras-hub's cache: one query position against the cached keys) gives
    the same continuations of prompts of different lengths."""
    from kerasft.evaluate.generate import causal_lm_for, generate_ids

    prompts = [[2, 17, 40, 33, 9, 81], [2, 55, 12, 7, 9, 61, 140, 19, 3 + 5, 99, 44, 12]]
    outputs = [generate_ids(causal_lm_for(backbone), prompts, 10, 2, stop_ids=[1])[0]
               for backbone in _pair("gemma3", tiny_presets)]
    assert sum(len(ids) for ids in outputs[0]) > 4
    assert outputs[1] == outputs[0]


def test_other_attention_layouts_are_left_to_keras_hub(tiny_presets, tiny_llama_presets):
    import keras_hub

    assert use_mqa_layout(keras_hub.models.Backbone.from_preset(str(tiny_presets["gemma"]))) == 0  # 2 key/value heads
    assert use_mqa_layout(keras_hub.models.Backbone.from_preset(str(tiny_llama_presets["llama3"]))) == 0
