"""Token ids and loss weights for every kind of example; packing, caching, length-grouped batches,
and one rendering of the system prompt for training, evaluation and inference."""

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from kerasft.config import DataConfig, load_config
from kerasft.data.pipeline import (
    TokenizedSet,
    epoch_batches,
    make_batch,
    padding_fraction,
    private_tmp,
    tokenize_cached,
    tokenize_documents,
    tokenize_examples,
)
from kerasft.data.prepare import Corpus, build_datasets
from kerasft.data.records import Example
from kerasft.data.template import (chat_tokens, encode_conversation, encode_prompt, example_prompt_ids,
                                   hf_chat_template, render_chat)
from kerasft.errors import KerasftError

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def tokens(tiny_preset):
    import keras_hub

    return chat_tokens(keras_hub.tokenizers.Tokenizer.from_preset(str(tiny_preset)))


def _weighted_text(tokens, ids, weights):
    """The decoded runs of weighted tokens, in order."""
    runs, current = [], []
    for token, weight in zip(ids, weights):
        if weight:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tokens.decode([t for t in run if t not in tokens.stop_ids]) for run in runs]


def test_multi_turn_loss_on_every_assistant_turn_only(tokens):
    ex = Example("c", "¿Y el puente?", "El de Piedra.", history=(("¿Qué río?", "El Ebro."),), system="Guía.")
    data = tokenize_examples(tokens, [ex], sequence_length=256)
    ids, weights = data.ids[0], data.weights[0]
    assert _weighted_text(tokens, ids, weights) == ["El Ebro.", "El de Piedra."]
    # each weighted run ends with <end_of_turn>, so every assistant turn learns to stop
    ends = [i for i in range(len(ids) - 1) if weights[i] and not weights[i + 1]] + [len(ids) - 1]
    assert all(ids[i] == tokens.end_of_turn for i in ends)
    text = render_chat("¿Y el puente?", "El de Piedra.", system="Guía.", history=ex.history)
    assert tokens.decode(ids) + "\n" == text.replace("<bos>", "", 1)


def test_plain_template_ends_with_eos(tokens):
    ex = Example("p", "Traduce: hola", "hello")
    data = tokenize_examples(tokens, [ex], sequence_length=128, template="plain")
    ids, weights = data.ids[0], data.weights[0]
    assert ids[-1] == tokens.eos and weights[-1] == 1
    assert _weighted_text(tokens, ids, weights) == ["hello"]
    assert tokens.decode(ids[: int(np.argmax(weights))]) == "### Instruction:\nTraduce: hola\n\n### Response:\n"
    assert render_chat("Traduce: hola", "hello", template="plain") == "<bos>### Instruction:\nTraduce: hola\n\n### Response:\nhello<eos>"


def test_batched_encoding_equals_one_by_one(tokens):
    examples = [Example(str(i), f"pregunta {i} " * (i + 1), f"respuesta {i}", system="S." if i % 2 else "") for i in range(12)]
    data = tokenize_examples(tokens, examples, sequence_length=512)

    for i, ex in enumerate(examples):
        ids, weights = encode_conversation(tokens, ex.prompt, ex.response, ex.system, ex.history)
        assert data.ids[i].tolist() == ids and data.weights[i].tolist() == weights


def test_structured_output_system_prompt_renders_identically_in_train_eval_and_inference(tokens, tiny_preset, tmp_path):
    """The system prompt lives once in the config; training rows, evaluation prompts and
    `kerasft generate` on the run dir all start with the same ids."""

    rows = [{"query": "vuelos a Bilbao", "output": {"intent": "buscar_vuelo", "destino": "Bilbao"}}]
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    cfg = load_config(None, [f"data.train={path}", f"data.eval={path}", "data.format=structured",
                             "data.system=Devuelve solo JSON con las claves intent y destino."])
    splits = build_datasets(cfg.data)
    train_row = tokenize_examples(tokens, splits.train, 256, cfg.data.system)
    prompt_len = int(np.argmax(train_row.weights[0]))
    training = train_row.ids[0][:prompt_len].tolist()
    evaluation = example_prompt_ids(tokens, splits.eval[0], cfg.data)
    inference = encode_prompt(tokens, "vuelos a Bilbao", cfg.data.system)
    assert training == evaluation == inference
    assert "Devuelve solo JSON" in tokens.decode(training)


def test_packing_keeps_every_weighted_token(tokens):
    examples = [Example(str(i), f"hola {i}", f"adiós {i}") for i in range(20)]
    plain = tokenize_examples(tokens, examples, sequence_length=128)
    packed = tokenize_examples(tokens, examples, sequence_length=128, packing=True)
    assert len(packed) < len(plain)
    assert max(packed.lengths) <= 128
    assert int(packed.loss_mask.sum()) == int(plain.loss_mask.sum())
    assert sorted(packed.tokens.tolist()) == sorted(plain.tokens.tolist())
    assert padding_fraction(packed, 2) < padding_fraction(plain, 2)


def test_pretrain_documents_weight_every_token_but_row_starts_and_bos(tokens):
    docs = [Example(str(i), "", "El cierzo sopla en el valle del Ebro. " * (i + 1)) for i in range(5)]
    data = tokenize_documents(tokens, docs, sequence_length=32)
    assert all(length <= 32 for length in data.lengths)
    for ids, weights in zip(data.ids, data.weights):
        assert weights[0] == 0
        assert all(w == (0 if (i == 0 or t == tokens.bos) else 1) for i, (t, w) in enumerate(zip(ids, weights)))
    total = sum(len(tokens.encode(d.response)) + 2 for d in docs)
    assert int(data.lengths.sum()) == total
    batch = make_batch(data, [0, 1], data.num_targets)
    assert (batch["target_positions"] >= 0).all()


def test_token_cache_hits_and_is_memory_mapped(tokens, tmp_path):
    examples = [Example(str(i), f"p {i}", f"r {i}") for i in range(6)]
    cfg = DataConfig(sequence_length=64, batching="length")
    first, hit = tokenize_cached(tokens, examples, cfg, tmp_path)
    second, hit2 = tokenize_cached(tokens, examples, cfg, tmp_path)
    assert (hit, hit2) == (False, True)
    assert isinstance(second.tokens, np.memmap)
    assert np.array_equal(first.tokens, second.tokens) and np.array_equal(first.offsets, second.offsets)
    assert second.group_by_length
    _, hit3 = tokenize_cached(tokens, examples, replace(cfg, system="otro"), tmp_path)
    _, hit4 = tokenize_cached(tokens, examples[:-1], cfg, tmp_path)
    assert not hit3 and not hit4


def test_token_cache_keeps_the_first_save_when_processes_race(tokens, tmp_path):
    """Processes sharing a cache write into their own temporary folders; the one that finishes
    second keeps the first's copy, and a dead process's leftover folder is cleared."""
    import os
    import socket

    examples = [Example(str(i), f"p {i}", f"r {i}") for i in range(4)]
    cfg = DataConfig(sequence_length=64)
    first, _ = tokenize_cached(tokens, examples, cfg, tmp_path)
    (folder,) = (tmp_path / "tokens").iterdir()
    first.save(folder)  # what a second process does after the first renamed its copy into place
    assert [p.name for p in (tmp_path / "tokens").iterdir()] == [folder.name]
    assert np.array_equal(TokenizedSet.load(folder).tokens, first.tokens)

    host = socket.gethostname()
    dead = folder.with_name(f"{folder.name}.{host}-{_finished_pid()}.tmp")
    alive = folder.with_name(f"{folder.name}.{host}-{os.getppid()}.tmp")
    for leftover in (dead, alive):
        leftover.mkdir()
    assert private_tmp(folder) == folder.with_name(f"{folder.name}.{host}-{os.getpid()}.tmp")
    assert not dead.exists() and alive.exists()


def _finished_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_length_grouped_batches_cut_padding_and_cover_every_example():
    rng = np.random.default_rng(0)
    rows = [([1] * int(n), [0] * (int(n) - 1) + [1]) for n in rng.integers(8, 300, size=400)]
    data = TokenizedSet.from_rows(rows, sequence_length=320)
    random_padding = padding_fraction(data, 4)
    data.group_by_length = True
    grouped = padding_fraction(data, 4)
    assert grouped < random_padding / 2
    for epoch in (0, 1):
        seen = np.concatenate(epoch_batches(data, 4, 0, epoch))
        assert sorted(seen.tolist()) == list(range(400))
    assert not all(np.array_equal(a, b) for a, b in zip(epoch_batches(data, 4, 0, 0), epoch_batches(data, 4, 0, 1)))


def test_too_long_examples_are_named(tokens, capsys):
    long = Example("largo", "palabra " * 400, "sí", origin="faq.csv: row 7")
    data = tokenize_examples(tokens, [long, Example("b", "hola", "sí")], sequence_length=64)
    assert data.dropped_origins and data.dropped_origins[0].startswith("faq.csv: row 7 (")
    assert "faq.csv: row 7" in capsys.readouterr().err


def test_data_inspect_cli_reports_errors_apart_from_warnings(tiny_preset, tmp_path):
    train = tmp_path / "train.jsonl"
    lines = [{"prompt": "hola", "response": "adiós", "nivel": "a"}, {"prompt": "hola", "response": "adiós", "nivel": "b"},
             {"prompt": "x " * 300, "response": "y", "nivel": "a"}]
    train.write_text("\n".join(json.dumps(r) for r in lines) + '\n{"prompt": "sin respuesta", "nivel": "a"}\n')
    out = tmp_path / "report"
    cmd = [sys.executable, "-m", "kerasft", "data", "inspect", str(ROOT / "configs" / "quickstart.yaml"), "--out", str(out),
           f"model.preset={tiny_preset}", f"data.train={train}", f"data.eval={train}", "data.sequence_length=128",
           "data.columns.meta=[nivel]"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr
    report = json.loads((out / "inspect.json").read_text())
    assert len(report["errors"]) == 2  # the record without a response, in train and in eval
    assert "line 4: no response field" in report["errors"][0]
    assert report["splits"]["train"]["longer_than_sequence_length"] == 1
    assert report["splits"]["train"]["duplicates_exact"] == 1
    assert report["splits"]["train"]["categories"] == {"nivel": {"a": 2, "b": 1}}
    assert any("longer than sequence_length=128" in w for w in report["warnings"])
    assert "errors (2):" in proc.stdout and "warnings (" in proc.stdout
    if report["plot"]:
        assert (out / "token_lengths.png").stat().st_size > 1000


def test_pretrain_corpus_streams_into_the_cache(tokens, tmp_path):
    """A raw-text corpus is read lazily and tokenised chunk by chunk straight into cache files;
    the result equals the in-memory tokenisation and is memory-mapped."""

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join(f"Párrafo {i}: el cierzo sopla fuerte en el valle." for i in range(50)) + "\n")
    cfg = load_config(None, [f"data.train={corpus}", "data.task=pretrain", "data.text_unit=paragraph",
                             "data.sequence_length=32"]).data
    splits = build_datasets(cfg, need_eval=False)
    assert isinstance(splits.train, Corpus)
    streamed, hit = tokenize_cached(tokens, splits.train, cfg, tmp_path / "cache")
    assert not hit and isinstance(streamed.tokens, np.memmap) and splits.train.count == 50
    in_memory = tokenize_documents(tokens, list(splits.train), 32, chunk=7)
    assert np.array_equal(streamed.tokens[: streamed.offsets[-1]], in_memory.tokens)
    assert np.array_equal(streamed.loss_mask[: streamed.offsets[-1]], in_memory.loss_mask)
    assert np.array_equal(streamed.offsets, in_memory.offsets)
    again, hit = tokenize_cached(tokens, build_datasets(cfg, need_eval=False).train, cfg, tmp_path / "cache")
    assert hit and np.array_equal(again.offsets, streamed.offsets)
    corpus.write_text(corpus.read_text() + "\nOtro párrafo más.\n")  # a changed file is a new key
    _, hit = tokenize_cached(tokens, build_datasets(cfg, need_eval=False).train, cfg, tmp_path / "cache")
    assert not hit
    with pytest.raises(Exception, match="not available for task=pretrain"):
        build_datasets(replace(cfg, clean=replace(cfg.clean, dedup="exact")), need_eval=False)


@pytest.mark.parametrize("template", ["gemma", "plain"])
def test_exported_chat_template_renders_like_training(template, tiny_spm):
    """The jinja template written into exported tokenizers (HF, GGUF) is the training template."""
    import transformers

    hf_tok = transformers.AutoTokenizer.from_pretrained(str(tiny_spm.parent))
    hf_tok.chat_template = hf_chat_template(template)
    history = (("¿Qué río?", "El Ebro."),)
    messages = [{"role": "system", "content": "Guía."}, {"role": "user", "content": "¿Qué río?"},
                {"role": "assistant", "content": "El Ebro."}, {"role": "user", "content": "¿Y el puente?"}]
    text = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == render_chat("¿Y el puente?", system="Guía.", history=history, template=template)
    full = hf_tok.apply_chat_template(messages + [{"role": "assistant", "content": "El de Piedra."}], tokenize=False)
    expected = render_chat("¿Y el puente?", "El de Piedra.", system="Guía.", history=history, template=template)
    assert full == expected


def test_batches_pad_to_the_bucket_grid_within_the_sets_sequence_length(tokens, tmp_path):
    """make_batch needs no sequence_length from its caller: the set knows its own (kept in the
    cache too), and a caller may ask for one fixed width instead."""
    rows = [([5] * n, [0] * (n - 1) + [1]) for n in (10, 70, 90)]
    data = TokenizedSet.from_rows(rows, sequence_length=100)
    assert make_batch(data, [0], data.num_targets)["token_ids"].shape == (1, 64)
    assert make_batch(data, [0, 1], data.num_targets)["token_ids"].shape == (2, 100)  # 128 capped at 100
    fixed = make_batch(data, [0], data.num_targets, pad_id=3, width=100)
    assert fixed["token_ids"].shape == (1, 100) and (fixed["token_ids"][0, 10:] == 3).all()
    assert fixed["padding_mask"][0].sum() == 10
    with pytest.raises(KerasftError, match="a row of 90 tokens does not fit a batch 64 wide"):
        make_batch(data, [2], data.num_targets, width=64)

    cfg = DataConfig(sequence_length=72)
    examples = [Example(str(i), f"p {i}", f"r {i}") for i in range(3)]
    made, _ = tokenize_cached(tokens, examples, cfg, tmp_path)
    cached, hit = tokenize_cached(tokens, examples, cfg, tmp_path)
    assert hit and made.sequence_length == cached.sequence_length == 72
    assert tokenize_documents(tokens, examples, sequence_length=40).sequence_length == 40
