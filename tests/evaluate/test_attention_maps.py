"""Attention maps come from the model's own softmax: weights x values reproduce each attention
layer's output, rows are causal and sum to 1, sliding-window layers see only their window, and
Gemma 2's soft-capped scores are what the weights were computed from."""

import json

import numpy as np
import pytest

from kerasft.cli import main


def _capture_layer(layer):
    """Records v (the value projection) and the layer's attention output before the output
    projection, through the layer's own sublayers."""
    seen = {}
    value_call, compute = layer.value_dense.call, layer._compute_attention

    def value(*args, **kwargs):
        seen["v"] = np.asarray(value_call(*args, **kwargs))
        return seen["v"]

    def attention(*args, **kwargs):
        seen["out"] = np.asarray(compute(*args, **kwargs))
        return seen["out"]

    layer.value_dense.call, layer._compute_attention = value, attention
    return seen


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_weights_times_values_reproduce_each_layer(family, tiny_presets):
    import keras_hub

    from kerasft.evaluate.attention_maps import attention_layers, attention_weights

    backbone = keras_hub.models.Backbone.from_preset(str(tiny_presets[family]))
    from kerasft.models.attention import use_mqa_layout

    use_mqa_layout(backbone)  # as load_model does: Gemma 3's one key/value head takes kerasft's layout
    layers = attention_layers(backbone)
    ids = list(np.random.default_rng(0).integers(5, backbone.vocabulary_size, size=13))
    captured = [_capture_layer(layer) for layer in layers]
    maps = attention_weights(backbone, ids)
    assert sorted(maps) == list(range(len(layers)))
    for index, (layer, seen) in enumerate(zip(layers, captured)):
        weights = maps[index]  # (heads, query, key)
        heads = layer.num_query_heads
        assert weights.shape == (heads, 13, 13)
        np.testing.assert_allclose(weights.sum(-1), 1.0, atol=1e-5)
        assert np.all(np.triu(weights, k=1) == 0)  # causal
        if layer.use_sliding_window_attention:  # window 8 in the tiny presets: nothing older is seen
            query, key = np.indices((13, 13))
            assert np.all(weights[:, query - key >= layer.sliding_window_size] == 0)
            assert np.any(weights[:, query - key == layer.sliding_window_size - 1] > 0)
        v = seen["v"][0]  # (key, kv heads, head dim)
        groups = heads // v.shape[1]
        expected = np.einsum("nts,snh->tnh", weights, np.repeat(v, groups, axis=1))
        np.testing.assert_allclose(seen["out"][0].reshape(13, heads, -1), expected, atol=2e-5)
    # Both kinds of layer were covered: sliding and global.
    assert {layer.use_sliding_window_attention for layer in layers} == {True, False}
    if family == "gemma2":
        assert layers[0].logit_soft_cap == 50.0  # the weights above came after the soft cap


def test_soft_cap_changes_the_recorded_weights(tiny_presets):
    """Gemma 2's soft cap is inside the recorded computation: without it the same scores give
    other weights."""
    import keras_hub

    from kerasft.evaluate.attention_maps import attention_layers, attention_weights

    backbone = keras_hub.models.Backbone.from_preset(str(tiny_presets["gemma2"]))
    for layer in attention_layers(backbone):  # scale the scores up so the cap bites
        layer.query_dense.kernel.assign(layer.query_dense.kernel * 300.0)
    ids = list(range(5, 17))
    capped = attention_weights(backbone, ids, [0])[0]
    for layer in attention_layers(backbone):
        layer.logit_soft_cap = None
    uncapped = attention_weights(backbone, ids, [0])[0]
    assert np.abs(capped - uncapped).max() > 1e-3


def test_attention_command_writes_png_and_json(tiny_preset, tmp_path, capsys):
    png, out = tmp_path / "a.png", tmp_path / "a.json"
    assert main(["attention", str(tiny_preset), "¿Dónde nace el Ebro?", "--layer", "-1", "--head", "0",
                 "--png", str(png), "--json", str(out)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(capsys.readouterr().out.splitlines()[-1])
    saved = json.loads(out.read_text())
    assert summary["tokens"] == len(saved["ids"]) == len(saved["tokens"]) and saved["layer"] == summary["layer"]
    assert abs(sum(w["weight"] for w in summary["last_token_attends_to"])) <= 1.0 + 1e-6
    assert main(["attention", str(tiny_preset), "x", "--layer", "99", "--png", str(tmp_path / "b.png")]) == 2
    assert "--layer 99: the model has" in capsys.readouterr().err and not (tmp_path / "b.png").exists()
