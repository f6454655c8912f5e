"""GGUF export: gguf's own GGUFReader reads the file, and our importer (kerasft.models.gguf) turns
it back into a keras-hub model whose logits and tokenizer match the exported LoRA model."""

import numpy as np
import pytest

from kerasft.config import LoraConfig, ModelConfig
from kerasft.errors import KerasftError
from kerasft.export.gguf import export_gguf
from kerasft.export.hf import keras_logits
from kerasft.models.gguf import import_gguf
from kerasft.models.lora import apply_lora, lora_layers
from kerasft.models.presets import load_model

TOKENS = np.array([[2, 5, 17, 40, 41, 99, 7, 3, 250, 12, 13, 14, 300, 301, 8, 9, 10, 11]], dtype=np.int32)
# Max |logit diff| after the GGUF round trip, as a fraction of the largest |logit|. Measured on
# the tiny random models (logit scale about 4): f32 exactly 0; f16 6e-4 to 1.7e-3 of the scale
# (11 mantissa bits per weight); q8_0 1.3e-2 to 7e-2 (8-bit blocks of 32 weights sharing an f16
# scale, compounded over 2-6 random layers whose rows are a single block). A layout or norm
# mistake moves logits by the order of the scale itself, and so does dropping LoRA.
TOLERANCE = {"f32": ("abs", 1e-4), "f16": ("rel", 3e-3), "q8_0": ("rel", 0.1)}
TEXTS = ["¿Cuál es la capital de España?", "Hello, world! 2024\n\n  indented", "<start_of_turn>user\nhola<end_of_turn>\n"]


@pytest.fixture(scope="module", params=["gemma", "gemma2", "gemma3"])
def lora_model(request, tiny_presets):
    loaded = load_model(ModelConfig(preset=str(tiny_presets[request.param])))
    base_logits = keras_logits(loaded.backbone, TOKENS)
    apply_lora(loaded.backbone, LoraConfig(rank=4, alpha=8.0, targets=("query", "value", "ffw_gating")))
    rng = np.random.default_rng(5)
    for layer in lora_layers(loaded.backbone):
        for variable in (layer.lora_kernel_a, layer.lora_kernel_b):
            variable.assign(rng.normal(0, 0.2, size=variable.shape).astype("float32"))
    return request.param, loaded, base_logits, keras_logits(loaded.backbone, TOKENS)


@pytest.mark.parametrize("quant", ["f32", "f16", "q8_0"])
def test_gguf_round_trip_matches_the_lora_model(lora_model, quant, tmp_path):
    import gguf
    import keras_hub

    family, loaded, base_logits, lora_logits = lora_model
    path = export_gguf(loaded.backbone, loaded.tokenizer, tmp_path / "gguf", quant=quant)
    assert sorted(p.name for p in path.parent.iterdir()) == ["Modelfile", "README.md", f"model-{quant}.gguf"]

    reader = gguf.GGUFReader(str(path))
    assert reader.fields["general.architecture"].contents() == family
    assert reader.fields["tokenizer.ggml.bos_token_id"].contents() == 2
    assert "<start_of_turn>" in reader.fields["tokenizer.chat_template"].contents()
    types = {t.name: t.tensor_type.name for t in reader.tensors}
    assert types["blk.0.attn_norm.weight"] == "F32"
    assert types["blk.0.attn_q.weight"] == {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[quant]
    norm = next(t for t in reader.tensors if t.name == "output_norm.weight")
    expected_norm = np.asarray(loaded.backbone.get_layer("final_normalization").scale) + 1.0
    np.testing.assert_allclose(np.asarray(norm.data), expected_norm, rtol=1e-6)  # stored as 1 + w

    preset = import_gguf(path, tmp_path / "preset")
    reimported = keras_hub.models.Backbone.from_preset(str(preset))
    found = keras_logits(reimported, TOKENS)
    diff, scale = np.abs(found - lora_logits).max(), np.abs(lora_logits).max()
    lora_effect = np.abs(lora_logits - base_logits).max()
    print(f"\n{family} {quant}: max |logit diff| {diff:.2e} at logit scale {scale:.2f} (LoRA moves logits by {lora_effect:.2f})")
    kind, bound = TOLERANCE[quant]
    assert diff <= (bound if kind == "abs" else bound * scale)
    assert diff < 0.25 * lora_effect  # LoRA was merged into the file

    tokenizer = keras_hub.tokenizers.Tokenizer.from_preset(str(preset))
    for text in TEXTS:
        assert np.asarray(tokenizer(text)).tolist() == np.asarray(loaded.tokenizer(text)).tolist(), text


def test_gguf_export_refuses_bad_quant_and_existing_dir(lora_model, tmp_path):
    _, loaded, _, _ = lora_model
    with pytest.raises(KerasftError, match="must be one of f32, f16, q8_0"):
        export_gguf(loaded.backbone, loaded.tokenizer, tmp_path / "g", quant="q4_k")
    (tmp_path / "g").mkdir()
    with pytest.raises(KerasftError, match="already exists"):
        export_gguf(loaded.backbone, loaded.tokenizer, tmp_path / "g")
    assert [p.name for p in tmp_path.iterdir()] == ["g"] and not list((tmp_path / "g").iterdir())


@pytest.mark.parametrize("lora_model", ["gemma2", "gemma3"], indirect=True)  # transformers reads no Gemma 1 GGUF
def test_transformers_reads_the_gguf_file(lora_model, tmp_path):
    """transformers' own GGUF reader (its name mapping, norm offset and tokenizer rebuild) is an
    independent consumer: it must compute the exported LoRA model too."""
    import torch
    import transformers

    family, loaded, _, lora_logits = lora_model
    path = export_gguf(loaded.backbone, loaded.tokenizer, tmp_path / "gguf", quant="f32")
    # transformers' GGUF config mapping leaves query_pre_attn_scalar at its default (256);
    # llama.cpp and keras-hub scale queries by the head size.
    model = transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager",
        query_pre_attn_scalar=loaded.backbone.head_dim).eval()
    with torch.no_grad():
        theirs = model(torch.from_numpy(TOKENS.astype(np.int64))).logits.numpy()
    assert np.abs(theirs - lora_logits).max() < 1e-4
    tokenizer = transformers.AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)
    for text in TEXTS:
        assert tokenizer(text, add_special_tokens=False)["input_ids"] == np.asarray(loaded.tokenizer(text)).tolist(), text


@pytest.mark.slow
@pytest.mark.parametrize("quant, bound", [("f16", 0.02), ("q8_0", 0.05)])
def test_embedded_270m_gguf_round_trip(quant, bound, tmp_path):
    """The real Gemma 3 270M through export_gguf and back: logits within the format's precision
    (bound: max |diff| as a fraction of the largest |logit|) and the same greedy next tokens.

    Measured 2026-11-22 (`pytest -m slow -s -k embedded_270m tests/export/test_gguf_export.py`), logit
    scale 40.9: f16 (543 MB) 0.0217, q8_0 (292 MB) 0.86; greedy tokens agree at 22 of 22 positions.
    """
    import keras_hub

    loaded = load_model(ModelConfig(preset="embedded"))
    text = "El río Ebro atraviesa Zaragoza y desemboca en el mar Mediterráneo, cerca de Tortosa."
    tokens = np.array([[2, *np.asarray(loaded.tokenizer(text)).tolist()]], dtype=np.int32)
    expected = keras_logits(loaded.backbone, tokens)
    path = export_gguf(loaded.backbone, loaded.tokenizer, tmp_path / "gguf", quant=quant)
    reimported = keras_hub.models.Backbone.from_preset(str(import_gguf(path, tmp_path / "preset")))
    found = keras_logits(reimported, tokens)
    diff, scale = np.abs(found - expected).max(), np.abs(expected).max()
    agree = (found.argmax(-1) == expected.argmax(-1)).mean()
    print(f"\n270M {quant}: {path.stat().st_size / 1e6:.0f} MB; max |logit diff| {diff:.3g} at logit scale {scale:.1f}; "
          f"greedy next token agrees at {agree:.0%} of {tokens.shape[1]} positions")
    assert diff <= bound * scale
    assert agree >= 0.9


def test_turn_tokens_are_control_and_the_modelfile_decodes_as_evaluated(tiny_preset, tmp_path):
    """Token types as llama.cpp's converter writes them for Gemma (the turn markers CONTROL, so
    llama.cpp stops on <end_of_turn> and never prints <start_of_turn>; other user-defined pieces
    stay USER_DEFINED with spaces for U+2581), and the Modelfile's decoding is the run's eval
    decoding: greedy by default, the sampled settings otherwise; the card says which."""
    import gguf

    from kerasft.config import EvalConfig
    from kerasft.export.gguf import read_modelfile

    loaded = load_model(ModelConfig(preset=str(tiny_preset)))
    path = export_gguf(loaded.backbone, loaded.tokenizer, tmp_path / "greedy", quant="f32")
    reader = gguf.GGUFReader(str(path))
    field = reader.fields["tokenizer.ggml.token_type"]
    types = [int(field.parts[i][0]) for i in field.data]
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    by_token = dict(zip(tokens, types))
    assert by_token["<start_of_turn>"] == by_token["<end_of_turn>"] == 3  # CONTROL, not USER_DEFINED (4)
    assert by_token["<bos>"] == by_token["<eos>"] == by_token["<pad>"] == 3 and by_token["<unk>"] == 3
    assert set(types) <= {1, 3, 4, 5, 6}
    assert read_modelfile(path.parent / "Modelfile")["PARAMETER"]["temperature"] == ["0"]
    assert "top_p" not in read_modelfile(path.parent / "Modelfile")["PARAMETER"]
    assert "Decoding: greedy" in (path.parent / "README.md").read_text()

    sampled = EvalConfig(temperature=0.8, top_p=0.9, top_k=40, seed=3)
    path = export_gguf(loaded.backbone, loaded.tokenizer, tmp_path / "sampled", quant="f32", decoding=sampled)
    parameters = read_modelfile(path.parent / "Modelfile")["PARAMETER"]
    assert (parameters["temperature"], parameters["top_k"], parameters["top_p"], parameters["seed"]) == (
        ["0.8"], ["40"], ["0.9"], ["3"])
    assert "Decoding: sampled (temperature 0.8, top_k 40, top_p 0.9, seed 3" in (path.parent / "README.md").read_text()


@pytest.mark.slow
def test_embedded_token_types_equal_llama_cpps_converter():
    """The embedded Gemma 3 270M's vocabulary as export_gguf types it equals the token-type table
    of the GGUF file it came from, which llama.cpp's convert_hf_to_gguf.py wrote, id for id."""
    import gguf
    import keras_hub
    from kerasft.export.gguf import gguf_vocabulary
    from kerasft.models.gguf import assemble_embedded_gguf
    from kerasft.models.presets import cache_dir, resolve_preset

    preset = resolve_preset("embedded", cache_dir())
    tokenizer = keras_hub.tokenizers.Tokenizer.from_preset(preset)
    ours = gguf_vocabulary(tokenizer)
    original = assemble_embedded_gguf(cache_dir() / "gguf")  # the file the embedded preset was converted from
    reader = gguf.GGUFReader(str(original))
    field = reader.fields["tokenizer.ggml.token_type"]
    theirs = [int(field.parts[i][0]) for i in field.data]
    assert len(ours["types"]) == len(theirs)
    differ = [i for i, (a, b) in enumerate(zip(ours["types"], theirs)) if a != b]
    assert not differ, f"{len(differ)} ids differ, first {differ[:5]}"
    assert theirs[105] == theirs[106] == 3
