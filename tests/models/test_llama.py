"""Llama-family models (TinyLlama / Llama 2 and Llama 3) through the same code as Gemma: chat
templates chosen from the model, train / eval / export, export parity with transformers'
LlamaForCausalLM (grouped-query attention, tied and untied heads), GGUF and the Ollama Modelfile.

The tiny presets (kerasft/testing.py): "llama" is TinyLlama-like (SentencePiece with a
dummy-prefix space, untied head), "llama3" is Llama 3.2-like (byte-level BPE, tied head, llama3
rope scaling); both have 4 query heads and 2 key/value heads.
"""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from kerasft.config import ModelConfig
from kerasft.errors import KerasftError
from kerasft.export.hf import keras_logits
from kerasft.export.verify import verify_hf_export
from kerasft.models.lora import LORA_TARGETS, lora_layers
from kerasft.models.presets import load_model
from kerasft.testing import export_base_and_lora

ROOT = Path(__file__).resolve().parents[2]
LLAMA_FAMILIES = ("llama", "llama3")
RANK, ALPHA = 4, 8.0
ATOL = 1e-4
TOKENS = np.array([[1, 5, 17, 40, 41, 99, 7, 3, 250, 12, 13, 14, 300, 301, 8, 9, 10, 11, 20, 21, 22, 23]], dtype=np.int32)
HISTORY = (("¿Qué río pasa por Zaragoza?", "El Ebro."),)
MESSAGES = [{"role": "system", "content": "Eres un guía."}, {"role": "user", "content": HISTORY[0][0]},
            {"role": "assistant", "content": HISTORY[0][1]}, {"role": "user", "content": "¿Y el puente?"}]


@pytest.fixture(scope="module", params=LLAMA_FAMILIES)
def exported(request, tiny_llama_presets, tmp_path_factory):
    """A family's base export, then LoRA on every projection with random non-zero A and B, its
    merged export and its PEFT adapter."""
    family = request.param
    root = tmp_path_factory.mktemp(f"llama_export_{family}")
    exported = export_base_and_lora(tiny_llama_presets[family], root, TOKENS, RANK, ALPHA, seed=3)
    exported.family = family
    return exported


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
                                          "high_freq_factor": 4.0, "original_max_position_embeddings": 200}


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


# --- GGUF and the Ollama Modelfile -------------------------------------------------------------


def render_go_template(template: str, messages: list[dict], system: str = "") -> str:
    """A small interpreter for the Go text/template subset kerasft's Modelfile templates use
    (variables with := and =, range .Messages, if / else if / end, eq, and, .Role, .Content,
    .System), with Go's semantics: `=` inside range assigns the outer variable, `.` is the
    element inside range."""
    import re

    parts = re.split(r"({{.*?}})", template, flags=re.S)
    tree, stack = [], []
    current = tree
    for part in parts:
        if not part.startswith("{{"):
            if part:
                current.append(("text", part))
            continue
        action = part[2:-2].strip()
        if action.startswith(("range ", "if ")):
            node = ["block", action, [], []]  # kind+expr, body, else-branches [(expr, body)]
            current.append(node)
            stack.append((current, node))
            current = node[2]
        elif action.startswith("else"):
            _, node = stack[-1]
            condition = action[len("else"):].strip()
            node[3].append((condition.removeprefix("if ").strip() or "true", []))
            current = node[3][-1][1]
        elif action == "end":
            current, _ = stack.pop()
        else:
            current.append(("action", action))
    assert not stack, "unclosed block"

    def value(token, dot, scope):
        if token.startswith('"'):
            return json.loads(token)
        if token in ("true", "false"):
            return token == "true"
        if token.startswith("$"):
            return scope[token]
        if token.startswith("."):
            return dot[token[1:]]
        raise AssertionError(f"unsupported token {token}")

    def evaluate(expr, dot, scope):
        words = re.findall(r'"[^"]*"|\S+', expr)
        if words[0] == "eq":
            return value(words[1], dot, scope) == value(words[2], dot, scope)
        if words[0] == "and":
            return all(value(w, dot, scope) for w in words[1:])
        assert len(words) == 1, expr
        return value(words[0], dot, scope)

    def run(nodes, dot, scope):
        out = ""
        for node in nodes:
            if node[0] == "text":
                out += node[1]
            elif node[0] == "action":
                match = re.fullmatch(r"(\$\w+)\s*(:?=)\s*(.+)", node[1])
                if match:
                    scope[match.group(1)] = evaluate(match.group(3), dot, scope)
                else:
                    out += str(evaluate(node[1], dot, scope))
            else:
                _, action, body, branches = node
                if action.startswith("range "):
                    for item in evaluate(action[len("range "):], dot, scope):
                        out += run(body, item, scope)
                    continue
                for condition, branch in [(action[len("if "):], body), *branches]:
                    if evaluate(condition, dot, scope):
                        out += run(branch, dot, scope)
                        break
        return out

    top = {"Messages": [{"Role": m["role"], "Content": m["content"]} for m in messages], "System": system}
    return run(tree, top, {})


@pytest.fixture(scope="module", params=LLAMA_FAMILIES)
def gguf_export(request, tiny_llama_presets, tmp_path_factory):
    from kerasft.export.gguf import export_gguf

    family = request.param
    loaded = load_model(ModelConfig(preset=str(tiny_llama_presets[family])))
    out = tmp_path_factory.mktemp(f"gguf_{family}") / "gguf"
    path = export_gguf(loaded.backbone, loaded.tokenizer, out, quant="f32", system="Eres un guía.")
    return SimpleNamespace(family=family, loaded=loaded, path=path)


def test_llama_gguf_reads_back_with_llama_cpp_names(gguf_export):
    from gguf import GGUFReader

    from kerasft.data.template import hf_chat_template
    from kerasft.export.verify import verify_llama_gguf

    backbone, family = gguf_export.loaded.backbone, gguf_export.family
    reader = GGUFReader(str(gguf_export.path))
    field = lambda key: reader.get_field(key).contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert (field("llama.attention.head_count"), field("llama.attention.head_count_kv")) == (4, 2)
    assert field("llama.rope.dimension_count") == 8
    assert field("tokenizer.ggml.model") == {"llama": "llama", "llama3": "gpt2"}[family]
    assert field("tokenizer.chat_template") == hf_chat_template("auto", _tokens(gguf_export))
    shapes = {t.name: tuple(int(d) for d in reversed(t.shape)) for t in reader.tensors}  # GGUF lists ne0 first
    block = {"attn_q": (32, 32), "attn_k": (16, 32), "attn_v": (16, 32), "attn_output": (32, 32),
             "ffn_gate": (64, 32), "ffn_up": (64, 32), "ffn_down": (32, 64), "attn_norm": (32,), "ffn_norm": (32,)}
    expected = {"token_embd.weight": (384, 32), "output_norm.weight": (32,)}
    expected |= {f"blk.{i}.{name}.weight": shape for i in range(2) for name, shape in block.items()}
    if family == "llama":
        expected["output.weight"] = (384, 32)  # the untied head
        assert field("tokenizer.ggml.add_space_prefix") is True
    else:
        expected["rope_freqs.weight"] = (4,)
        assert field("tokenizer.ggml.eot_token_id") == _tokens(gguf_export).special["<|eot_id|>"]
        assert len(reader.get_field("tokenizer.ggml.merges").data) > 0
    assert shapes == expected
    check = verify_llama_gguf(gguf_export.path, backbone, TOKENS)
    assert check["ok"], check


@pytest.mark.parametrize("gguf_export", ["llama3"], indirect=True)
def test_llama3_rope_factors_match_transformers(gguf_export):
    """rope_freqs.weight holds the divisors that turn the base rotary frequencies into
    transformers' llama3-scaled ones."""
    import torch
    import transformers
    from gguf import GGUFReader
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    from kerasft.export.hf import hf_config

    reader = GGUFReader(str(gguf_export.path))
    factors = next(np.asarray(t.data) for t in reader.tensors if t.name == "rope_freqs.weight")
    config = hf_config(gguf_export.loaded.backbone, "float32", gguf_export.loaded.tokenizer)
    llama_config = transformers.LlamaConfig(**{k: v for k, v in config.items() if k not in ("architectures", "model_type")})
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](llama_config, torch.device("cpu"))
    base = 1.0 / (config["rope_theta"] ** (np.arange(0, 8, 2) / 8))
    np.testing.assert_allclose(base / scaled.numpy(), factors, rtol=1e-5)
    assert factors[0] == 1.0 and 1.0 < factors[1] < 8.0 and factors[-1] == 8.0  # kept, smoothed, scaled


def test_gguf_matches_transformers_gguf_loader(gguf_export):
    """transformers' own GGUF loader (an independent reader: it undoes llama.cpp's rotary
    permutation itself) computes the Keras model's logits; its tokenizer, built from the GGUF
    vocabulary, gives kerasft's ids. (It ignores rope_freqs, so Llama 3's scaled rope is checked
    by the test above instead.)"""
    import torch
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(
        str(gguf_export.path.parent), gguf_file=gguf_export.path.name, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(gguf_export.path.parent), gguf_file=gguf_export.path.name)
    tokens = _tokens(gguf_export)
    text = "Hola, ¿qué tal? Vivo en Logroño desde 1998."
    assert tokenizer(text)["input_ids"] == [tokens.bos] + tokens.encode_batch([text], after_special=True)[0]
    if gguf_export.family == "llama3":
        return
    with torch.no_grad():
        theirs = model(torch.from_numpy(TOKENS.astype(np.int64))).logits.numpy()
    assert np.max(np.abs(theirs - keras_logits(gguf_export.loaded.backbone, TOKENS))) < ATOL


def _tokens(gguf_export):
    from kerasft.data.template import chat_tokens

    return chat_tokens(gguf_export.loaded.tokenizer)


def _check_modelfile(folder: Path, gguf_name: str, tokens, template: str, system: str, num_ctx: int):
    from kerasft.data.template import render_chat
    from kerasft.export.gguf import read_modelfile

    fields = read_modelfile(folder / "Modelfile")
    assert set(fields) == {"FROM", "TEMPLATE", "PARAMETER", "SYSTEM"}
    assert fields["FROM"] == f"./{gguf_name}" and (folder / gguf_name).is_file()
    assert fields["SYSTEM"] == system
    stops = {"gemma": ["<end_of_turn>", "<eos>"], "llama3": ["<|eot_id|>", "<|end_of_text|>"], "zephyr": ["</s>"]}[template]
    # Greedy, as a run with the default eval config was evaluated (kerasft.export.gguf.modelfile_decoding).
    assert fields["PARAMETER"] == {"stop": stops, "temperature": ["0"], "num_ctx": [str(num_ctx)]}
    # The TEMPLATE renders what training rendered, minus the bos llama.cpp adds itself: with the
    # Modelfile's SYSTEM, with a system message instead, and for a generation prompt.
    bos = tokens.bos_text
    for messages in (MESSAGES[1:], MESSAGES):
        rendered = render_go_template(fields["TEMPLATE"], messages, system=fields["SYSTEM"])
        assert bos + rendered == render_chat(MESSAGES[-1]["content"], None, system, HISTORY, tokens=tokens)
    full = MESSAGES + [{"role": "assistant", "content": "El de Piedra."}]
    expected = render_chat(MESSAGES[-1]["content"], "El de Piedra.", system, HISTORY, tokens=tokens)
    assert bos + render_go_template(fields["TEMPLATE"], full) == expected
    no_system = render_chat(MESSAGES[-1]["content"], None, "", HISTORY, tokens=tokens)
    assert bos + render_go_template(fields["TEMPLATE"], MESSAGES[1:]) == no_system


def test_llama_modelfile_parses_back(gguf_export):
    tokens = _tokens(gguf_export)
    num_ctx = {"llama": 2048, "llama3": 4096}[gguf_export.family]  # TinyLlama's context is 2048
    _check_modelfile(gguf_export.path.parent, gguf_export.path.name, tokens, tokens.template, "Eres un guía.", num_ctx)


def test_gemma_modelfile_parses_back(tiny_preset, tmp_path):
    from kerasft.data.template import chat_tokens
    from kerasft.export.gguf import export_gguf

    loaded = load_model(ModelConfig(preset=str(tiny_preset)))
    path = export_gguf(loaded.backbone, loaded.tokenizer, tmp_path / "gguf", quant="f16", system="Eres un guía.")
    _check_modelfile(path.parent, path.name, chat_tokens(loaded.tokenizer), "gemma", "Eres un guía.", 4096)


def test_cli_gguf_export_writes_the_modelfile(tiny_llama_presets, tmp_path):
    """`kerasft export --format gguf` on a Llama preset: the GGUF file, its Modelfile and the
    read-back check."""
    from kerasft.cli import main
    from kerasft.export.gguf import read_modelfile

    out = tmp_path / "out"
    assert main(["export", str(tiny_llama_presets["llama3"]), str(out), "--format", "gguf", "--quant", "f32"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["Modelfile", "README.md", "model-f32.gguf"]
    fields = read_modelfile(out / "Modelfile")
    assert fields["FROM"] == "./model-f32.gguf" and "SYSTEM" not in fields
    assert "<|eot_id|>" in fields["PARAMETER"]["stop"]


def test_llama_model_parallel_follows_the_single_device_loss_curve(tiny_llama_presets, tmp_path):
    """runtime.mesh=model lays Llama's weights out by its own rules (kerasft.models.families) on
    8 simulated devices and trains to the single-device loss curve."""
    from test_distribution import _train_layouts

    result = _train_layouts(tiny_llama_presets["llama3"], tmp_path, ["none:auto", "model:2x4"])["model:2x4"]
    specs = [json.loads(spec) for spec in result["weight_specs"]]
    assert ["model", "batch", None] in specs  # query (hidden, heads, head_dim): hidden over model
    assert [None, None, None] in specs  # key/value kept whole
    assert ["batch", "model"] in specs  # feed-forward gate/up (hidden, width)
    assert ["model", "batch"] in specs  # feed-forward down (width, hidden)


def test_plan_inspect_and_vocab_on_llama(tiny_llama_presets, tmp_path, capsys):
    """The other commands take Llama presets too, or refuse them in one line."""
    from kerasft.cli import main

    preset = tiny_llama_presets["llama3"]
    config = str(ROOT / "configs/quickstart.yaml")
    assert main(["plan", config, f"model.preset={preset}", "data.sequence_length=64", "--target", "cpu", "--no-search"]) == 0
    assert "FITS" in capsys.readouterr().out
    assert main(["data", "inspect", config, f"model.preset={preset}", f"output_dir={tmp_path}"]) == 0
    words = tmp_path / "words.txt"
    words.write_text("Zaragoza\n")
    assert main(["vocab", "add", "--preset", str(tiny_llama_presets["llama"]), "--words", str(words),
                 "--out", str(tmp_path / "grown")]) == 2
    assert "a Llama model: kerasft vocab add supports Gemma models only" in capsys.readouterr().err


def test_server_renders_the_llama_template_and_serves_the_export(exported):
    """kerasft serve on a Llama model: chat requests are rendered with the model's own template
    (the training ids), and the merged export serves the same greedy answer as the model."""
    from kerasft.data.template import chat_tokens, encode_prompt
    from kerasft.serve import Engine, load_engine

    tokens = chat_tokens(exported.loaded.tokenizer)
    engine = Engine(exported.loaded, model_id="tiny", max_tokens_limit=8, system="Eres un guía.")
    from_export = load_engine(str(exported.merged_dir), max_tokens_limit=8)
    try:
        request = engine.chat({"messages": MESSAGES[1:], "max_tokens": 8})
        assert request["prompt_ids"] == encode_prompt(tokens, MESSAGES[-1]["content"], "Eres un guía.", HISTORY)
        assert engine.context_length == {"llama": 2048, "llama3": 131072}[exported.family]
        body = {"messages": MESSAGES, "max_tokens": 8}
        assert from_export.generate(**from_export.chat(body)) == engine.generate(**engine.chat(body))
    finally:
        engine.close()
        from_export.close()


def test_bpe_vocabulary_fills_the_reserved_ids_keras_hub_leaves_out():
    """keras-hub's Llama 3 tokenizer drops <|reserved_special_token_N|>; GGUF needs one token per
    embedding row, named as in Llama 3.1/3.2."""
    from kerasft.export.gguf import gguf_vocabulary

    vocabulary = {"a": 0, "b": 1, "<|begin_of_text|>": 2, "<|end_of_text|>": 3, "<|start_header_id|>": 6,
                  "<|end_header_id|>": 7, "<|eot_id|>": 8}
    tokenizer = SimpleNamespace(vocabulary=vocabulary, merges=["a b"], start_token="<|begin_of_text|>",
                                end_token="<|end_of_text|>")
    result = gguf_vocabulary(tokenizer, size=11)
    assert result["tokens"] == ["a", "b", "<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>",
                                "<|reserved_special_token_1|>", "<|start_header_id|>", "<|end_header_id|>",
                                "<|eot_id|>", "<|reserved_special_token_2|>", "<|reserved_special_token_3|>"]
    assert result["types"] == [1, 1] + [3] * 9
    assert (result["bos"], result["eos"], result["end_of_turn"], result["model"]) == (2, 3, 8, "gpt2")


def test_gguf_export_imports_back_through_the_resolver(gguf_export):
    """kerasft's GGUF importer reads llama files (what Ollama serves) into LlamaBackbone /
    Llama3Backbone presets: the same logits, tokenizer, chat template and rope scaling."""
    from kerasft.data.template import chat_tokens

    original = gguf_export.loaded
    imported = load_model(ModelConfig(preset=str(gguf_export.path)))
    assert type(imported.backbone) is type(original.backbone)
    assert imported.backbone.tie_word_embeddings == original.backbone.tie_word_embeddings
    assert np.max(np.abs(keras_logits(imported.backbone, TOKENS) - keras_logits(original.backbone, TOKENS))) < 1e-5
    if gguf_export.family == "llama3":
        assert (imported.backbone.rope_frequency_adjustment_factor, imported.backbone.rope_pretraining_sequence_length,
                imported.backbone.rope_low_freq_factor, imported.backbone.rope_high_freq_factor) == (8.0, 200, 1.0, 4.0)
    ours, theirs = chat_tokens(original.tokenizer), chat_tokens(imported.tokenizer)
    text = "Hola, ¿qué tal? Vivo en Logroño desde 1998."
    assert theirs.template == ours.template and theirs.stop_ids == ours.stop_ids and theirs.bos == ours.bos
    assert theirs.encode_batch([text], after_special=True) == ours.encode_batch([text], after_special=True)
