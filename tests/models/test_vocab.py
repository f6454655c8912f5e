"""Vocabulary expansion: pieces that encode as one token, the grown embedding, the preset it is
saved in, the Hugging Face export of it, and the `kerasft vocab` commands."""

import json
import unicodedata

import numpy as np
import pytest

from kerasft.cli import main
from kerasft.errors import KerasftError
from kerasft.models import vocab
from kerasft.testing import tiny_spm_proto

WORDS = ["cierzo", "rasmia", "maño", "zagal", "esbarizar"]


@pytest.fixture(scope="module")
def words_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("vocab") / "words.txt"
    path.write_text("# dialect words\n" + "\n".join(WORDS) + "\n\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("piece_type", vocab.PIECE_TYPES)
def test_each_word_is_one_token_alone_and_in_running_text(piece_type):
    old = vocab.processor(tiny_spm_proto())
    assert len(old.encode(" cierzo")) > 1  # the test means something only if it was split before
    proto, added = vocab.expand_proto(tiny_spm_proto(), WORDS, piece_type)
    sp = vocab.processor(proto)
    for word in WORDS:
        piece_id = sp.piece_to_id(vocab.SPACE + word)
        assert sp.encode(" " + word) == [piece_id]
    pieces = sp.encode("el cierzo sopla y el zagal esbarizar", out_type=str)
    assert "▁cierzo" in pieces and "▁zagal" in pieces and "▁esbarizar" in pieces
    assert sp.get_piece_size() == old.get_piece_size() + len(added)
    assert [a["id"] for a in added] == list(range(old.get_piece_size(), sp.get_piece_size()))
    # Text without the new words tokenises as before.
    text = "¿Cuál es la capital de España? La capital de España es Madrid."
    assert sp.encode(text) == old.encode(text)
    if piece_type == "user_defined":
        assert [a["piece"] for a in added] == [vocab.SPACE + w for w in WORDS]
    else:
        assert len(added) > len(WORDS)  # the BPE merge chains


@pytest.mark.parametrize(
    ("words", "message"),
    [
        (["capital"], "already one piece"),
        (["cier zo"], "whitespace inside"),
        ([unicodedata.normalize("NFD", "maño")], "would be normalised"),
        (["zagal", "zagal"], "listed twice"),
        ([], "empty"),
    ],
)
def test_bad_words_are_one_line_errors(words, message):
    with pytest.raises(KerasftError, match=message) as err:
        vocab.expand_proto(tiny_spm_proto(), words)
    assert "\n" not in str(err.value)


def test_word_list_errors_name_file_and_line(tmp_path):
    path = tmp_path / "w.txt"
    path.write_text("cierzo\nmaño   extra\n", encoding="utf-8")
    with pytest.raises(KerasftError, match=r"w.txt: line 2: .*whitespace inside"):
        vocab.read_word_list(path)
    path.write_text("# only a comment\n\n", encoding="utf-8")
    with pytest.raises(KerasftError, match=r"w.txt: the word list is empty"):
        vocab.read_word_list(path)
    with pytest.raises(KerasftError, match="word list not found"):
        vocab.read_word_list(tmp_path / "missing.txt")


@pytest.mark.parametrize("family", ["gemma", "gemma2", "gemma3"])
@pytest.mark.parametrize("init", vocab.INITS)
def test_add_words_grows_the_embedding_and_keeps_the_old_model(tiny_presets, words_file, tmp_path, family, init):
    import keras_hub

    src = tiny_presets[family]
    out = tmp_path / "grown"
    record = vocab.add_words(str(src), words_file, out, init=init)
    old = keras_hub.models.Backbone.from_preset(str(src))
    new = keras_hub.models.Backbone.from_preset(str(out))
    tokenizer = keras_hub.tokenizers.Tokenizer.from_preset(str(out))
    assert type(new) is type(old)
    added = len(record["added"])
    assert new.vocabulary_size == old.vocabulary_size + added == tokenizer.vocabulary_size()
    old_table = old.token_embedding.embeddings.numpy()
    new_table = new.token_embedding.embeddings.numpy()
    np.testing.assert_array_equal(new_table[: old.vocabulary_size], old_table)
    for item, row in zip(record["added"], new_table[old.vocabulary_size :]):
        if init == "mean":
            expected = old_table.mean(axis=0)
        else:
            expected = old_table[item["init_from"]].mean(axis=0)
            assert len(item["init_from"]) > 1
        np.testing.assert_allclose(row, expected, atol=1e-6)
    # Every other weight is copied: the same tokens give the same logits on the old rows.
    ids = np.array([[2, 40, 41, 300, 301, 100]], dtype=np.int32)
    inputs = {"token_ids": ids, "padding_mask": np.ones_like(ids, dtype=bool)}
    old_logits = old.token_embedding(old(inputs), reverse=True)
    new_logits = new.token_embedding(new(inputs), reverse=True)
    np.testing.assert_allclose(np.asarray(new_logits)[..., : old.vocabulary_size], np.asarray(old_logits), atol=1e-5)
    # The saved tokenizer is the expanded one, and the preset says which rows are new.
    assert tokenizer.token_to_id("▁cierzo") == next(a["id"] for a in record["added"] if a["piece"] == "▁cierzo")
    assert {vocab.SPACE + w for w in WORDS} <= set(vocab.added_pieces(out)) and record["piece_type"] == "normal"
    assert vocab.added_pieces(out) == [item["piece"] for item in record["added"]]
    assert json.loads((out / vocab.VOCAB_FILE).read_text())["init"] == init


def test_add_words_leaves_nothing_behind_on_bad_input(tiny_preset, tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_text("cierzo\ncapital\n", encoding="utf-8")
    out = tmp_path / "grown"
    with pytest.raises(KerasftError, match="'capital' is already one piece"):
        vocab.add_words(str(tiny_preset), bad, out)
    assert not out.exists() and list(tmp_path.iterdir()) == [bad]


@pytest.mark.parametrize("piece_type", vocab.PIECE_TYPES)
def test_hf_export_tokenizes_new_words_as_one_token_and_matches_keras(tiny_preset, words_file, tmp_path, piece_type):
    pytest.importorskip("transformers")
    import keras_hub
    import transformers

    from kerasft.export.hf import export_hf
    from kerasft.export.verify import verify_hf_export

    grown = tmp_path / "grown"
    vocab.add_words(str(tiny_preset), words_file, grown, init="subtokens", piece_type=piece_type)
    backbone = keras_hub.models.Backbone.from_preset(str(grown))
    tokenizer = keras_hub.tokenizers.Tokenizer.from_preset(str(grown))
    # Make the new rows distinct so a dropped or shifted row would change the logits.
    table = backbone.token_embedding.embeddings
    rows = np.random.default_rng(0).normal(0, 0.2, size=(table.shape[0] - 512, table.shape[1]))
    table.assign(np.concatenate([table.numpy()[:512], rows.astype("float32")]))
    out = export_hf(backbone, tokenizer, tmp_path / "hf")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
    sp = vocab.processor(tokenizer.proto)
    text = "el cierzo sopla y el zagal esbarizar por la rasmia del maño"
    ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids == sp.encode(text)
    for word in WORDS:
        assert hf_tokenizer(" " + word, add_special_tokens=False)["input_ids"] == [sp.piece_to_id("▁" + word)]
    check = verify_hf_export(out, backbone, np.array([[2] + ids]))
    assert check["ok"] and check["max_abs_diff"] < 1e-4


def test_vocab_check_command(tiny_preset, words_file, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("El cierzo sopla fuerte. El zagal tiene rasmia.\n\nLa capital de España es Madrid.\n",
                      encoding="utf-8")
    report_path = tmp_path / "check.json"
    assert main(["vocab", "check", str(tiny_preset), "--corpus", str(corpus), "--add", str(words_file),
                 "--json", str(report_path)]) == 0
    printed = capsys.readouterr().out
    report = json.loads(report_path.read_text())
    assert "tokens_per_word" in printed and "most fragmented before" in printed
    before, after = report["before"], report["after"]
    assert before["words"] == 14 and after["tokens"] < before["tokens"]
    assert after["tokens_per_char"] < before["tokens_per_char"]
    assert report["new_vocabulary_size"] == report["vocabulary_size"] + report["added_pieces"]
    assert report["added_pieces"] > len(WORDS) and report["piece_type"] == "normal"  # the default: BPE chains
    assert {"word": "cierzo", "tokens": 1, "pieces": ["▁cierzo"]} not in before["most_fragmented"]
    # Without --add there is no "after"; --words counts each listed word once.
    assert main(["vocab", "check", str(tiny_preset), "--words", str(words_file)]) == 0
    assert "after" not in capsys.readouterr().out.splitlines()[0]


def test_vocab_commands_fail_with_one_line(tiny_preset, words_file, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n", encoding="utf-8")
    assert main(["vocab", "add", "--preset", str(tiny_preset), "--words", str(empty), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"kerasft: error: {empty}: the word list is empty"
    assert not (tmp_path / "o").exists()
    assert main(["vocab", "check", str(tmp_path / "nope"), "--words", str(words_file)]) == 2
    assert "no such model folder" in capsys.readouterr().err


def test_continued_pretraining_trains_new_rows_then_sft_chains_on_its_export(tiny_preset, tmp_path, monkeypatch,
                                                                              capsys):
    """Route B on the tiny model: vocab add -> dialect_cpt (new rows + LoRA) -> dialect_sft on its export."""
    from pathlib import Path

    from safetensors.numpy import load_file

    root = Path(__file__).resolve().parents[2]
    monkeypatch.chdir(root)
    grown = tmp_path / "grown"
    assert main(["vocab", "add", "--preset", str(tiny_preset), "--words", "data/dialect/words.txt",
                 "--out", str(grown), "--init", "subtokens"]) == 0
    record = json.loads((grown / vocab.VOCAB_FILE).read_text())
    common = [f"output_dir={tmp_path}", "train.max_steps=2", "train.learning_rate=1e-2", "export.verify=false"]
    assert main(["run", "configs/dialect_cpt.yaml", f"model.preset={grown}", "name=cpt", *common]) == 0
    new_ids = [item["id"] for item in record["added"]]
    assert f"training the embedding rows of {len(new_ids)} added pieces" in capsys.readouterr().out
    meta = json.loads((tmp_path / "cpt/adapter/adapter_config.json").read_text())
    assert meta["trainable_tokens"]["ids"][2:] == new_ids
    rows = load_file(str(tmp_path / "cpt/adapter/adapter.safetensors"))["token_embedding/embeddings/rows"]
    assert rows.shape[0] == 2 + len(new_ids)
    # The export carries the expanded tokenizer; stage 2 starts from it.
    export = tmp_path / "cpt/export_hf"
    assert vocab.processor((export / "tokenizer.model").read_bytes()).encode(" cierzo") == [
        next(a["id"] for a in record["added"] if a["piece"] == "▁cierzo")]
    assert main(["run", "configs/dialect_sft.yaml", f"model.preset={export}", "name=sft", "data.eval_limit=2",
                 "eval.max_new_tokens=2", "eval.batch_size=2", *common]) == 0
    summary = json.loads((tmp_path / "sft/summary.json").read_text())
    assert summary["train"]["steps"] == 2 and "tuned" in summary["eval"]

    # The comparison script's measurement of a route's final model (run in-process here).
    compare = _compare_script()
    measured = compare.measure(tmp_path / "sft", max_new_tokens=3)
    assert measured["vocabulary_size"] == 512 + len(new_ids) and measured["tokens_per_dialect_word"] == 1.0
    assert measured["dialect_words_single_token"] == 1.0
    assert measured["eval_examples"] == 6 and 0 < measured["eval_nll_per_char"] < measured["eval_loss"]
    assert [g["prompt"] for g in measured["generations"]] == list(compare.PROMPTS)
    assert measured["export_mb"] > 0


def test_train_new_tokens_on_a_preset_without_added_pieces_says_so(tiny_preset, tmp_path, monkeypatch, capsys):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[2])
    assert main(["train", "configs/dialect_cpt.yaml", f"model.preset={tiny_preset}", f"output_dir={tmp_path}",
                 "name=plain", "train.max_steps=1"]) == 0
    assert "has no kerasft_vocab.json" in capsys.readouterr().out
    meta = json.loads((tmp_path / "plain/adapter/adapter_config.json").read_text())
    assert meta["trainable_tokens"]["pieces"] == ["<start_of_turn>", "<end_of_turn>"]


def _compare_script():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[2] / "scripts" / "experiments" / "compare_dialect_routes.py"
    spec = importlib.util.spec_from_file_location("compare_dialect_routes", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_compare_dialect_routes_on_the_tiny_preset(tiny_preset, tmp_path):
    """The whole comparison, each stage a `kerasft` process (minutes on a busy 2-core CPU)."""
    compare = _compare_script()
    out = tmp_path / "cmp"
    assert compare.main(["--preset", str(tiny_preset), "--out", str(out), "--max-new-tokens", "3", "train.max_steps=2",
                         "export.verify=false", "eval.compare_base=false", "data.eval_limit=2",
                         "eval.max_new_tokens=2"]) == 0
    result = json.loads((out / "comparison.json").read_text())
    a, b = result["routes"]["A"], result["routes"]["B"]
    assert a["tokens_per_dialect_word"] > 1.0 == b["tokens_per_dialect_word"]
    assert b["vocabulary_size"] >= a["vocabulary_size"] + 25 and b["parameters"] > a["parameters"]
    assert set(b["stages"]) == {"vocab_add", "cpt", "sft", "measure"} and set(a["stages"]) == {"sft", "measure"}
    assert all(r["peak_rss_mb"] > 100 and r["train_seconds"] > 0 for r in (a, b))
    table = (out / "comparison.md").read_text()
    assert "| tokens per dialect word | " in table and table.count("| ¿") >= 3
