"""GGUF import: parity with transformers on tiny llama.cpp-style files, errors, and the real 270M.

transformers loading the same GGUF file is the reference: it has its own GGUF reader, name
mapping and tokenizer builder, so agreement checks the importer's layout, norm offset, attention
settings and SentencePiece rebuild, not just that it runs.
"""

import re
import time

import numpy as np
import pytest

import gguf_fixtures as fixtures
from kerasft.errors import KerasftError
from kerasft.models.gguf import assemble_embedded_gguf, import_gguf, read_gguf_header, read_tensor

TOKENIZER_STRINGS = [
    "hola world, the que la ción",
    "¿Qué año es? ¡Él está en Logroño con el pingüino!",
    "línea uno\nlínea dos\n\n\tcon tabulador\t\ty fin",
    "emoji 😀👍🏽 y 日本語 — «comillas»",
    "<start_of_turn>user\nhola<end_of_turn>\n<start_of_turn>model\n",
    "a  b   c    d     e",
    "  empieza con espacios y termina con ellos  ",
]


def _keras_logits(preset, token_ids):
    import keras_hub

    backbone = keras_hub.models.Backbone.from_preset(str(preset))
    inputs = {"token_ids": token_ids, "padding_mask": np.ones_like(token_ids)}
    return np.asarray(backbone.token_embedding(backbone(inputs), reverse=True))


def _transformers_model(gguf_path, arch):
    """transformers' own GGUF load of the file, or for Gemma 1 (which it cannot load from GGUF)
    GemmaForCausalLM built from the tensors as gguf's GGUFReader dequantizes them."""
    import torch
    import transformers

    if arch != "gemma":
        # transformers' GGUF config mapping leaves query_pre_attn_scalar at its default 256
        # (right for the real 270M, whose head size is 256); llama.cpp scales queries by the
        # head size, 16 here.
        return transformers.AutoModelForCausalLM.from_pretrained(
            gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
            attn_implementation="eager", query_pre_attn_scalar=fixtures.HEAD_DIM).eval()
    weights = fixtures.reference_weights(gguf_path)
    config = transformers.GemmaConfig(
        vocab_size=weights["token_embd.weight"].shape[0], hidden_size=fixtures.HIDDEN,
        intermediate_size=fixtures.FFW, num_hidden_layers=fixtures.LAYERS["gemma"],
        num_attention_heads=fixtures.HEADS, num_key_value_heads=fixtures.KV_HEADS,
        head_dim=fixtures.HEAD_DIM, rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh",
        tie_word_embeddings=True)
    model = transformers.GemmaForCausalLM(config).to(torch.float32).eval()
    names = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
             "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
             "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
             "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    state = {"model.embed_tokens.weight": weights["token_embd.weight"],
             "model.norm.weight": weights["output_norm.weight"] - 1}
    for name, value in weights.items():
        if name.startswith("blk."):
            _, layer, kind, _ = name.split(".")
            state[f"model.layers.{layer}.{names[kind]}.weight"] = (
                value - 1 if kind.endswith("norm") else value)
    state = {key: torch.from_numpy(value) for key, value in state.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    model.tie_weights()
    return model


def _transformers_logits(model, token_ids):
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(token_ids.astype(np.int64))).logits.numpy()


@pytest.fixture(scope="module", params=["gemma3", "gemma2", "gemma"])
def tiny_import(request, tmp_path_factory):
    """(arch, gguf path, preset folder) for a tiny file imported once per architecture."""
    arch = request.param
    root = tmp_path_factory.mktemp(f"gguf-{arch}")
    gguf_path = fixtures.write_tiny_gguf(root / f"tiny-{arch}.gguf", arch)
    preset = import_gguf(gguf_path, root / "preset")
    return arch, gguf_path, preset


def test_header_matches_gguf_reader(tmp_path):
    import gguf

    path = fixtures.write_tiny_gguf(tmp_path / "tiny.gguf", "gemma3")
    header = read_gguf_header(path)
    reader = gguf.GGUFReader(str(path))
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        expected, found = field.contents(), header.metadata[key]
        if isinstance(found, np.ndarray):
            found = found.tolist()
        assert found == (pytest.approx(expected) if isinstance(expected, float) else expected)
    assert set(header.metadata) == {key for key in reader.fields if not key.startswith("GGUF.")}
    for tensor in reader.tensors:
        info = header.tensors[tensor.name]
        assert (info.ggml_type, info.dims, info.offset) == (
            tensor.tensor_type, tuple(tensor.shape.tolist()), tensor.data_offset)
        expected = gguf.quants.dequantize(tensor.data, tensor.tensor_type).reshape(
            tuple(reversed(tensor.shape.tolist())))
        np.testing.assert_array_equal(read_tensor(header, tensor.name), expected)


def test_logits_match_transformers(tiny_import):
    arch, gguf_path, preset = tiny_import
    rng = np.random.default_rng(1)
    vocabulary_size = len(fixtures.tiny_vocabulary()[0])
    # Longer than the sliding window (4), so local and global layers differ.
    token_ids = np.concatenate(
        [np.full((2, 1), fixtures.BOS_ID), rng.integers(4, vocabulary_size, (2, 15))], axis=1)
    token_ids = token_ids.astype("int32")
    expected = _transformers_logits(_transformers_model(gguf_path, arch), token_ids)
    found = _keras_logits(preset, token_ids)
    assert found.shape == expected.shape
    assert np.abs(expected).max() > 1.0  # a real comparison, not of near-zero logits
    np.testing.assert_allclose(found, expected, rtol=0, atol=1e-4)


def test_tokenizer_matches_transformers(tiny_import):
    import keras_hub
    import transformers

    arch, gguf_path, preset = tiny_import
    tokenizer = keras_hub.tokenizers.Tokenizer.from_preset(str(preset))
    if arch == "gemma":  # transformers refuses Gemma 1 GGUF files; the vocabulary is the same
        gguf_path = fixtures.write_tiny_gguf(preset.parent / "tiny-as-gemma2.gguf", "gemma2")
    reference = transformers.AutoTokenizer.from_pretrained(gguf_path.parent,
                                                           gguf_file=gguf_path.name)
    for text in TOKENIZER_STRINGS:
        expected = reference(text, add_special_tokens=False)["input_ids"]
        assert np.asarray(tokenizer(text)).tolist() == expected, text
        assert tokenizer.detokenize(expected) == text
    # The chat markers are single tokens inside running text.
    turn = np.asarray(tokenizer("x<start_of_turn>y<end_of_turn>")).tolist()
    assert fixtures.START_OF_TURN_ID in turn and fixtures.END_OF_TURN_ID in turn


def test_preset_loads_as_causal_lm(tiny_import):
    import keras_hub

    arch, _, preset = tiny_import
    models = keras_hub.models
    task_cls = models.Gemma3CausalLM if arch == "gemma3" else models.GemmaCausalLM
    causal_lm = task_cls.from_preset(str(preset))
    assert causal_lm.backbone.num_layers == fixtures.LAYERS[arch]
    assert causal_lm.preprocessor.tokenizer.end_token_id == fixtures.EOS_ID


def _about(path, problem):
    """Pattern of a KerasftError message: the file named first, then the problem."""
    return re.escape(f"{path}: ") + problem


def _leftovers(folder):
    return sorted(path.name for path in folder.iterdir() if ".building-" in path.name
                  or ".old-" in path.name)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"this is not a gguf file at all")
    with pytest.raises(KerasftError, match=_about(path, "not a GGUF file")):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    path.write_bytes(b"")
    with pytest.raises(KerasftError, match=_about(path, "not a GGUF file")):
        import_gguf(path, tmp_path / "out")
    with pytest.raises(KerasftError, match=_about(tmp_path / "missing.gguf", "no such file")):
        import_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_truncated_file(tmp_path):
    path = fixtures.write_tiny_gguf(tmp_path / "tiny.gguf")
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(KerasftError, match=_about(path, "tensor .* runs past the end of the file")):
        import_gguf(path, tmp_path / "out")
    path.write_bytes(path.read_bytes()[:2000])  # cut inside the vocabulary
    with pytest.raises(KerasftError, match=_about(path, "truncated or corrupt GGUF header")):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_architecture(tmp_path):
    path = fixtures.write_metadata_only_gguf(tmp_path / "qwen2.gguf", "qwen2")
    with pytest.raises(KerasftError, match=_about(path, "unsupported GGUF architecture 'qwen2'")):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_tensor_leaves_nothing(tmp_path):
    path = fixtures.write_tiny_gguf(tmp_path / "tiny.gguf", drop=("blk.1.ffn_up.weight",))
    with pytest.raises(KerasftError, match=_about(path, "missing tensor 'blk.1.ffn_up.weight'")):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []


def test_unsupported_tensor_type(tmp_path):
    from gguf import GGMLQuantizationType

    path = fixtures.write_tiny_gguf(
        tmp_path / "tiny.gguf", override_types={"blk.0.ffn_up.weight": GGMLQuantizationType.Q8_1})
    problem = "tensor 'blk.0.ffn_up.weight' has type Q8_1"
    with pytest.raises(KerasftError, match=_about(path, problem)):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert _leftovers(tmp_path) == []


@pytest.mark.parametrize("arch, layers", [("gemma2", 46), ("gemma3", 62)])
def test_27b_query_scaling_refused(tmp_path, arch, layers):
    # llama.cpp scales 27B queries by hidden / heads, which keras-hub 0.32 ignores.
    path = fixtures.write_tiny_gguf(tmp_path / "tiny.gguf", arch, block_count=layers)
    with pytest.raises(KerasftError, match=_about(path, "queries scaled by 1/sqrt")):
        import_gguf(path, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_out_dir(tmp_path):
    path = fixtures.write_tiny_gguf(tmp_path / "tiny.gguf")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(KerasftError, match=_about(out, "already exists")):
        import_gguf(path, out)
    assert (out / "keep.txt").read_text() == "mine"
    assert _leftovers(tmp_path) == []
    assert import_gguf(path, out, overwrite=True) == out
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert _leftovers(tmp_path) == []


def test_embedded_gguf_is_assembled_under_a_private_name_then_renamed(tmp_path):
    """A process killed mid-write, or two sharing the cache, never leave a partial file under the
    real name; a complete file is reused, a corrupt one is named."""
    gguf_path = assemble_embedded_gguf(tmp_path)
    assert [p.name for p in tmp_path.iterdir()] == [gguf_path.name]
    assert assemble_embedded_gguf(tmp_path) == gguf_path
    with gguf_path.open("r+b") as handle:
        handle.truncate(1000)
    with pytest.raises(KerasftError, match=r"its sha256 differs\); delete it"):
        assemble_embedded_gguf(tmp_path)


@pytest.mark.slow
def test_embedded_270m_matches_transformers(tmp_path):
    """The real Gemma 3 270M (Q4_K_M): logits and token ids equal to transformers' load."""
    import torch
    import transformers

    gguf_path = assemble_embedded_gguf(tmp_path)
    assert assemble_embedded_gguf(tmp_path) == gguf_path  # reused, not rewritten
    start = time.perf_counter()
    preset = import_gguf(gguf_path, tmp_path / "preset")
    print(f"\nimport_gguf: {time.perf_counter() - start:.1f} s")

    import keras_hub

    tokenizer = keras_hub.tokenizers.Tokenizer.from_preset(str(preset))
    reference_tokenizer = transformers.AutoTokenizer.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name)
    texts = ["El niño comió una manzana en la cocina de su abuela y después salió al jardín.",
             "The quick brown fox jumps over the lazy dog while the children watch."]
    for text in texts + TOKENIZER_STRINGS + [
            "¿Cuántos años tiene Begoña?\n\tTreinta y cinco.\r\n¡Qué bien! 🎉",
            "Naïve café owners in Zürich — 3½ kinds of crème brûlée 🍮\n\n\n    indented"]:
        expected = reference_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert np.asarray(tokenizer(text)).tolist() == expected, text

    model = transformers.AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32,
        attn_implementation="eager").eval()
    backbone = keras_hub.models.Backbone.from_preset(str(preset))
    batches = [np.array([[fixtures.BOS_ID, *np.asarray(tokenizer(text)).tolist()]], "int32")
               for text in texts]
    found = [np.asarray(backbone.token_embedding(
        backbone({"token_ids": ids, "padding_mask": np.ones_like(ids)}), reverse=True))
        for ids in batches]
    expected32 = [_transformers_logits(model, ids) for ids in batches]
    # float32 rounding alone moves logits of size ~30 by ~1e-4 over 18 layers (transformers in
    # float32 and float64 differ by as much), so the 1e-4 bound is held against float64.
    model.double()  # transformers refuses .float() on a GGUF model, so float32 runs first
    expected64 = [_transformers_logits(model, ids) for ids in batches]
    for text, keras, hf32, hf64 in zip(texts, found, expected32, expected64):
        print(f"{text[:24]!r}: max |logit| {np.abs(hf64).max():.1f}; max abs diff vs "
              f"transformers float64 {np.abs(keras - hf64).max():.2e}, vs float32 "
              f"{np.abs(keras - hf32).max():.2e}; transformers float32 vs float64 "
              f"{np.abs(hf32 - hf64).max():.2e}")
    for keras, hf32, hf64 in zip(found, expected32, expected64):
        np.testing.assert_allclose(keras, hf64, rtol=0, atol=1e-4)
        np.testing.assert_allclose(keras, hf32, rtol=0, atol=2e-4)
