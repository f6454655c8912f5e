"""Preference pairs as data: every source format becomes Examples with `rejected`, bad records are
named, and pairs tokenise with SFT's template and loss mask into chosen/rejected rows."""

import json

import numpy as np
import pytest

from kerasft.config import ColumnsConfig, DataConfig
from kerasft.data.pipeline import epoch_batches, make_batch, tokenize_cached, tokenize_examples, tokenize_pairs
from kerasft.data.prepare import build_datasets, write_splits
from kerasft.data.records import Example
from kerasft.data.sources import load_examples
from kerasft.data.template import chat_tokens
from kerasft.errors import KerasftError

ROWS = [
    {"prompt": "¿Dónde vive el gato?", "chosen": "en la casa", "rejected": "el gato vive en la casa grande"},
    {"messages": [{"role": "system", "content": "Sé breve."}, {"role": "user", "content": "hola"},
                  {"role": "assistant", "content": "hola"}, {"role": "user", "content": "¿qué tal?"}],
     "chosen": [{"role": "assistant", "content": "bien"}], "rejected": "no sé"},
    {"question": "¿Qué come?", "context": "El gato come pescado.", "chosen": "pescado", "rejected": "El gato"},
]


@pytest.fixture(scope="module")
def tokens(tiny_preset):
    import keras_hub

    return chat_tokens(keras_hub.tokenizers.Tokenizer.from_preset(str(tiny_preset)))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def test_jsonl_pairs_with_prompt_messages_or_qa_fields(tmp_path):
    pairs = load_examples(str(_jsonl(tmp_path / "pairs.jsonl", ROWS)), DataConfig())
    assert [(p.response, p.rejected) for p in pairs] == [("en la casa", "el gato vive en la casa grande"),
                                                           ("bien", "no sé"), ("pescado", "El gato")]
    assert pairs[1].system == "Sé breve." and pairs[1].history == (("hola", "hola"),) and pairs[1].prompt == "¿qué tal?"
    assert pairs[2].prompt.endswith("Pregunta: ¿Qué come?") and DataConfig().instruction in pairs[2].prompt
    # A run's split files read back as the same pairs.
    splits = build_datasets(DataConfig(train=str(tmp_path / "pairs.jsonl")), need_eval=False)
    write_splits(splits, tmp_path / "data")
    again = load_examples(str(tmp_path / "data" / "train.jsonl"), DataConfig())
    assert [(p.prompt, p.response, p.rejected, p.history) for p in again] == [
        (p.prompt, p.response, p.rejected, p.history) for p in pairs]


def test_csv_and_xlsx_pairs_with_a_column_mapping(tmp_path):
    import pandas

    frame = pandas.DataFrame({"pregunta": ["¿uno?", "¿dos?"], "buena": ["uno", "dos"], "mala": ["1", "2"]})
    frame.to_csv(tmp_path / "pairs.csv", index=False)
    frame.to_excel(tmp_path / "pairs.xlsx", index=False)
    cfg = DataConfig(columns=ColumnsConfig(prompt="pregunta", response="buena", rejected="mala"))
    for name in ("pairs.csv", "pairs.xlsx"):
        pairs = load_examples(str(tmp_path / name), cfg)
        assert [(p.prompt, p.response, p.rejected) for p in pairs] == [("¿uno?", "uno", "1"), ("¿dos?", "dos", "2")]
    with pytest.raises(KerasftError, match=r"pairs.csv: row 2: no column 'malo'; did you mean 'mala'"):
        load_examples(str(tmp_path / "pairs.csv"), DataConfig(columns=ColumnsConfig(rejected="malo")))


def test_hf_dataset_pairs(tmp_path):
    folder = tmp_path / "ds"
    (folder / "data").mkdir(parents=True)
    _jsonl(folder / "data" / "train.jsonl", ROWS[:1])
    (pair,) = load_examples(f"hf:{folder}@train", DataConfig())
    assert (pair.response, pair.rejected) == ("en la casa", "el gato vive en la casa grande")


@pytest.mark.parametrize("bad, message", [
    ({"prompt": "p", "chosen": "a"}, "line 2: rejected: missing"),
    ({"prompt": "p", "chosen": "a", "rejected": " "}, "line 2: rejected: empty"),
    ({"prompt": "p", "chosen": "a", "rejected": "a"}, "line 2: chosen and rejected are the same text"),
    ({"chosen": "a", "rejected": "b"}, "line 2: no prompt field"),
    ({"prompt": "p", "chosen": [{"role": "user", "content": "x"}], "rejected": "b"}, "line 2: chosen: expected text"),
])
def test_a_bad_pair_is_named_by_file_and_line(tmp_path, bad, message):
    path = _jsonl(tmp_path / "pairs.jsonl", [ROWS[0], bad])
    with pytest.raises(KerasftError, match=f"pairs.jsonl: {message}"):
        load_examples(str(path), DataConfig())


def test_pairs_tokenise_with_the_sft_template_and_mask(tokens, tmp_path):
    pairs = [Example("a", "hola", "sí", ("sí",), rejected="no, nunca"),
             Example("b", "¿qué?", "esto es largo", ("esto es largo",), system="S", rejected="eso")]
    data = tokenize_pairs(tokens, pairs, 64)
    as_sft = tokenize_examples(tokens, [Example(p.id, p.prompt, answer, system=p.system) for p in pairs
                                        for answer in (p.response, p.rejected)], 64)
    assert data.pairs and data.num_examples == 2 and len(data) == 4
    for row in range(4):  # chosen at 2i, rejected at 2i + 1: SFT's own ids and loss weights
        assert list(data.ids[row]) == list(as_sft.ids[row]) and list(data.weights[row]) == list(as_sft.weights[row])
    batch = make_batch(data, [1, 0], data.num_targets)
    assert len(batch["token_ids"]) == 4  # chosen rows of pairs 1, 0, then their rejected rows
    assert list(batch["token_ids"][0][: data.lengths[2]]) == list(data.ids[2])
    assert list(batch["token_ids"][2][: data.lengths[3]]) == list(data.ids[3])
    assert sorted(i for b in epoch_batches(data, 1, 0, 0) for i in b) == [0, 1]
    with pytest.raises(KerasftError, match="x.jsonl: line 3: no rejected answer"):
        tokenize_pairs(tokens, [Example("c", "p", "r", origin="x.jsonl: line 3")], 64)
    # Cached like SFT tokens, under their own key.
    cfg = DataConfig(sequence_length=64)
    first, hit = tokenize_cached(tokens, pairs, cfg, tmp_path, pairs=True)
    again, hit_again = tokenize_cached(tokens, pairs, cfg, tmp_path, pairs=True)
    assert not hit and hit_again and again.pairs and list(again.ids[3]) == list(first.ids[3])
    assert first.cache_key and first.cache_key != tokenize_cached(tokens, pairs, cfg, tmp_path)[0].cache_key


def test_a_long_qa_pair_is_trimmed_around_the_chosen_span_with_one_window(tokens):
    context = " ".join(["el gato come pescado en la casa."] * 12 + ["El perro duerme en el jardín."] + ["la luna sale."] * 12)
    row = {"question": "¿Dónde duerme el perro?", "context": context, "chosen": "en el jardín", "rejected": "la luna sale."}
    pair = load_examples_from_rows([row])
    full = tokenize_pairs(tokens, pair, 1024)
    data = tokenize_pairs(tokens, pair, 128)
    assert data.trimmed == 1 and max(data.lengths) <= 128 < max(full.lengths)
    chosen, rejected = list(data.ids[0]), list(data.ids[1])
    prompt = len(chosen) - int(np.count_nonzero(data.weights[0]))  # the shared prompt: the same tokens
    assert chosen[:prompt] == rejected[:prompt]
    kept = tokens.decode(chosen[:prompt])
    assert "El perro duerme en el jardín." in kept and kept.count("la luna sale.") < 12


def load_examples_from_rows(rows):
    from kerasft.data.records import example_from_row

    return [example_from_row(row, f"rows: line {n}", DataConfig(), f"r{n}") for n, row in enumerate(rows, 1)]
