"""Every data source users bring, mapped onto one record type; bad input named precisely."""

import json
from dataclasses import replace

import pytest

from kerasft.config import CleanConfig, ColumnsConfig, DataConfig, load_config
from kerasft.data.prepare import build_datasets, split_examples, write_splits
from kerasft.data.records import qa_prompt
from kerasft.data.sources import load_examples, read_source
from kerasft.errors import KerasftError

CONTEXT = "El río Ebro pasa por Zaragoza y desemboca en el Mediterráneo."


def _write(path, text, encoding="utf-8"):
    path.write_text(text, encoding=encoding)
    return path


def test_csv_with_column_mapping_and_metadata(tmp_path):
    path = _write(tmp_path / "faq.csv", "pregunta,respuesta,nivel\n¿Horario?,De 9 a 17.,fácil\n\"¿Dónde, exactamente?\",En Huesca.,difícil\n")
    cfg = DataConfig(columns=ColumnsConfig(prompt="pregunta", response="respuesta", meta=("nivel",)))
    examples = load_examples(path, cfg)
    assert [(e.id, e.prompt, e.response, e.meta) for e in examples] == [
        ("faq-2", "¿Horario?", "De 9 a 17.", {"nivel": "fácil"}),
        ("faq-3", "¿Dónde, exactamente?", "En Huesca.", {"nivel": "difícil"}),
    ]
    assert examples[0].origin.endswith("faq.csv: row 2")


def test_tsv_and_custom_delimiter(tmp_path):
    tsv = _write(tmp_path / "a.tsv", "prompt\tresponse\nHola\t¡Hola!\n")
    assert load_examples(tsv)[0].response == "¡Hola!"
    semi = _write(tmp_path / "b.csv", "prompt;response\nHola;Adiós\n")
    assert load_examples(semi, DataConfig(delimiter=";"))[0].response == "Adiós"


def test_csv_qa_columns_build_the_qa_prompt(tmp_path):
    path = tmp_path / "qa.csv"
    with path.open("w", encoding="utf-8", newline="") as handle:
        import csv

        csv.writer(handle).writerows([["texto", "q", "a"], [CONTEXT, "¿Por dónde pasa?", "Zaragoza"]])
    cfg = DataConfig(instruction="Responde.", columns=ColumnsConfig(context="texto", prompt="q", response="a"))
    (ex,) = load_examples(path, cfg)
    assert ex.prompt == qa_prompt("Responde.", CONTEXT, "¿Por dónde pasa?")
    assert ex.context == CONTEXT and ex.answer_start == CONTEXT.index("Zaragoza")


def test_unknown_column_suggests_the_closest(tmp_path):
    path = _write(tmp_path / "faq.csv", "pregunta,respuesta\na,b\n")
    cfg = DataConfig(columns=ColumnsConfig(prompt="pregunt", response="respuesta"))
    with pytest.raises(KerasftError, match=r"faq\.csv: row 2: no column 'pregunt'; did you mean 'pregunta'\?"):
        load_examples(path, cfg)


def test_csv_row_with_wrong_field_count_is_named(tmp_path):
    path = _write(tmp_path / "faq.csv", "prompt,response\na,b\nc,d,e\n")
    with pytest.raises(KerasftError, match=r"faq\.csv: row 3: 3 fields but the header has 2"):
        load_examples(path)


def test_empty_cell_is_named(tmp_path):
    path = _write(tmp_path / "faq.csv", "prompt,response\na,b\nc,\n")
    with pytest.raises(KerasftError, match=r"faq\.csv: row 3: response: missing"):
        load_examples(path)


def test_excel_sheet(tmp_path):
    openpyxl = pytest.importorskip("openpyxl")
    book = openpyxl.Workbook()
    sheet = book.active
    sheet.title = "datos"
    sheet.append(["question", "answer", "categoria"])
    sheet.append(["¿Cuánto cuesta?", "Diez euros.", "precios"])
    sheet.append([None, None, None])
    sheet.append(["¿Abren en agosto?", 12, "horario"])
    book.save(tmp_path / "faq.xlsx")
    cfg = DataConfig(sheet="datos", columns=ColumnsConfig(meta=("categoria",)))
    examples = load_examples(tmp_path / "faq.xlsx", cfg)
    assert [(e.id, e.prompt, e.response, e.meta["categoria"]) for e in examples] == [
        ("faq-2", "¿Cuánto cuesta?", "Diez euros.", "precios"),
        ("faq-4", "¿Abren en agosto?", "12", "horario"),
    ]
    with pytest.raises(KerasftError, match=r"faq\.xlsx: .*nope"):
        load_examples(tmp_path / "faq.xlsx", replace(cfg, sheet="nope"))


def test_text_files_by_line_paragraph_and_separator(tmp_path):
    lines = _write(tmp_path / "pairs.txt", "Hola\t¡Hola!\n\nAdiós\tHasta luego.\n")
    assert [(e.prompt, e.response) for e in load_examples(lines)] == [("Hola", "¡Hola!"), ("Adiós", "Hasta luego.")]
    corpus = _write(tmp_path / "corpus.txt", "Primer párrafo,\nen dos líneas.\n\n\nSegundo párrafo.\n")
    docs = load_examples(corpus, DataConfig(task="pretrain", text_unit="paragraph"))
    assert [d.response for d in docs] == ["Primer párrafo,\nen dos líneas.", "Segundo párrafo."]
    assert docs[1].origin.endswith("corpus.txt: line 5")
    sep = _write(tmp_path / "sep.txt", "uno\n===\ndos\n===\n")
    cfg = DataConfig(task="pretrain", text_unit="separator", separator="\\n===\\n")
    assert [d.response for d in load_examples(sep, cfg)] == ["uno", "dos"]
    with pytest.raises(KerasftError, match=r"pairs2\.txt: line 1: expected 'prompt<TAB>response'"):
        load_examples(_write(tmp_path / "pairs2.txt", "sin tabulador\n"))


def test_chat_messages_multi_turn(tmp_path):
    record = {"messages": [
        {"role": "system", "content": "Eres un guía de Zaragoza."},
        {"role": "user", "content": "¿Qué río pasa?"},
        {"role": "assistant", "content": "El Ebro."},
        {"role": "user", "content": "¿Y qué puente es famoso?"},
        {"role": "assistant", "content": "El Puente de Piedra."},
    ]}
    path = _write(tmp_path / "chat.jsonl", json.dumps(record, ensure_ascii=False) + "\n")
    (ex,) = load_examples(path)
    assert ex.system == "Eres un guía de Zaragoza."
    assert ex.history == (("¿Qué río pasa?", "El Ebro."),)
    assert (ex.prompt, ex.response) == ("¿Y qué puente es famoso?", "El Puente de Piedra.")


@pytest.mark.parametrize("messages, message", [
    ([{"role": "usr", "content": "a"}, {"role": "assistant", "content": "b"}], r"messages\[0\]\.role: unknown role 'usr'; did you mean user\?"),
    ([{"role": "user", "content": "a"}], r"messages: expected user/assistant pairs"),
    ([{"role": "assistant", "content": "a"}, {"role": "user", "content": "b"}], r"messages: turn 1 is 'assistant', expected 'user'"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": 3}], r"messages\[1\]\.content: expected text"),
])
def test_bad_chat_records_are_named(tmp_path, messages, message):
    path = _write(tmp_path / "chat.jsonl", json.dumps({"messages": messages}) + "\n")
    with pytest.raises(KerasftError, match=r"chat\.jsonl: line 1: " + message):
        load_examples(path)


def test_structured_output_records(tmp_path):
    rows = [{"query": "vuelos a Bilbao mañana", "output": {"intent": "buscar_vuelo", "destino": "Bilbao"}},
            {"query": "cancela mi reserva", "output": '{"intent": "cancelar"}'}]
    path = _write(tmp_path / "q.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    examples = load_examples(path, DataConfig(format="structured"))
    assert [json.loads(e.response) for e in examples] == [rows[0]["output"], {"intent": "cancelar"}]
    assert examples[0].response == '{"intent": "buscar_vuelo", "destino": "Bilbao"}'
    bad = _write(tmp_path / "bad.jsonl", json.dumps({"query": "x", "output": "{intent: 1}"}))
    with pytest.raises(KerasftError, match=r"bad\.jsonl: line 1: output: not valid JSON"):
        load_examples(bad, DataConfig(format="structured"))


def test_squad_v2_unanswerable_gets_the_no_answer_response(tmp_path):
    doc = {"version": "v2.0", "data": [{"title": "t", "paragraphs": [{"context": CONTEXT, "qas": [
        {"id": "a", "question": "¿Por dónde pasa?", "answers": [{"text": "Zaragoza", "answer_start": 21}]},
        {"id": "b", "question": "¿Cuántos puentes tiene?", "answers": [], "is_impossible": True},
    ]}]}]}
    path = _write(tmp_path / "v2.json", json.dumps(doc, ensure_ascii=False))
    a, b = load_examples(path, DataConfig(no_answer="No consta."))
    assert a.answerable and a.response == "Zaragoza"
    assert not b.answerable and b.response == "No consta." and b.answers == ()


def test_hf_dataset_folder_in_hub_layout(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "mlqa"
    (folder / "mlqa.es.es").mkdir(parents=True)
    (folder / "README.md").write_text(
        "---\nconfigs:\n- config_name: mlqa.es.es\n  data_files:\n  - split: test\n    path: mlqa.es.es/test.jsonl\n---\n")
    rows = [{"id": "x1", "title": "Ebro", "context": CONTEXT, "question": "¿Por dónde pasa?",
             "answers": {"text": ["Zaragoza"], "answer_start": [21]}},
            {"id": "x2", "title": "Ebro", "context": CONTEXT, "question": "¿Dónde desemboca?",
             "answers": {"text": ["en el Mediterráneo"], "answer_start": [CONTEXT.index("en el Med")]}}]
    (folder / "mlqa.es.es" / "test.jsonl").write_text("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    examples = load_examples(f"hf:{folder}:mlqa.es.es@test", DataConfig(instruction="I."))
    assert [(e.id, e.response, e.answer_start) for e in examples] == [("x1", "Zaragoza", 21), ("x2", "en el Mediterráneo", CONTEXT.index("en el Med"))]
    assert examples[0].prompt == qa_prompt("I.", CONTEXT, "¿Por dónde pasa?")
    with pytest.raises(KerasftError, match="cannot load dataset"):
        load_examples(f"hf:{folder}:mlqa.xx@test")


def test_parquet_goes_through_datasets(tmp_path):
    pd = pytest.importorskip("pandas")
    pytest.importorskip("pyarrow")
    pd.DataFrame({"prompt": ["Hola"], "response": ["¡Hola!"]}).to_parquet(tmp_path / "d.parquet")
    assert load_examples(tmp_path / "d.parquet")[0].response == "¡Hola!"


def test_tfds_rows_are_decoded_and_mapped(monkeypatch):
    tfds = pytest.importorskip("tensorflow_datasets")
    import numpy as np

    rows = [{"id": b"q1", "context": CONTEXT.encode(), "question": "¿Por dónde pasa?".encode(),
             "answers": {"text": np.array([b"Zaragoza"]), "answer_start": np.array([21])}}]
    calls = []
    monkeypatch.setattr(tfds, "load", lambda name, split, download: calls.append((name, split)) or rows)
    monkeypatch.setattr(tfds, "as_numpy", lambda dataset: iter(dataset))
    (ex,) = load_examples("tfds:xquad/es@test")
    assert calls == [("xquad/es", "test")]
    assert (ex.id, ex.response, ex.context) == ("q1", "Zaragoza", CONTEXT)


def test_on_error_skip_counts_and_lists_bad_records(tmp_path):
    path = _write(tmp_path / "mix.jsonl", '{"prompt": "a", "response": "b"}\n{not json}\n{"prompt": "c"}\n'
                                          '{"prompt": "d", "response": "e"}\n')
    with pytest.raises(KerasftError, match=r"mix\.jsonl: line 2: invalid JSON"):
        load_examples(path)
    result = read_source(str(path), DataConfig(on_error="skip"))
    assert [e.prompt for e in result.examples] == ["a", "d"]
    assert [s["error"].split(": ", 1)[1] for s in result.skipped] == [
        "line 2: invalid JSON: Expecting property name enclosed in double quotes",
        "line 3: no response field; found prompt (map one with data.columns.response)",
    ]


def test_encoding_empty_and_unknown_format_messages(tmp_path):
    latin = _write(tmp_path / "latin.csv", "prompt,response\n¿Qué?,Sí\n", encoding="latin-1")
    with pytest.raises(KerasftError, match=r"latin\.csv: line 2: not valid utf-8 .*set data\.encoding"):
        load_examples(latin)
    assert load_examples(latin, DataConfig(encoding="latin-1"))[0].response == "Sí"
    with pytest.raises(KerasftError, match=r"empty\.csv: file is empty"):
        load_examples(_write(tmp_path / "empty.csv", ""))
    with pytest.raises(KerasftError, match=r"data\.pdf: unsupported data format \.pdf"):
        load_examples(_write(tmp_path / "data.pdf", "x"))
    with pytest.raises(KerasftError, match=r"dup\.jsonl: line 2: duplicate example id 'a'"):
        load_examples(_write(tmp_path / "dup.jsonl", '{"id": "a", "prompt": "x", "response": "y"}\n'
                                                      '{"id": "a", "prompt": "z", "response": "w"}\n'))


def test_config_rejects_bad_data_choices(tmp_path):
    with pytest.raises(KerasftError, match="data.template: 'chatml' is not one of auto, gemma, llama3, zephyr, plain"):
        load_config(None, ["data.template=chatml"])
    with pytest.raises(KerasftError, match=r"data.split.ratios: \[0.5, 0.2\] must be 2 or 3"):
        load_config(None, ["data.split.ratios=[0.5,0.2]"])
    with pytest.raises(KerasftError, match="unknown key data.columns.promt; did you mean data.columns.prompt"):
        load_config(None, ["data.columns.promt=q"])


def _faq_rows(n_per_level=(20, 10, 10)):
    rows = []
    for level, n in zip(("fácil", "media", "difícil"), n_per_level):
        rows += [{"prompt": f"Pregunta {level} número {i}", "response": f"Respuesta {i}", "nivel": level} for i in range(n)]
    return rows


def test_stratified_split_is_seeded_disjoint_and_keeps_proportions(tmp_path):
    path = _write(tmp_path / "faq.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in _faq_rows()))
    cfg = load_config(None, [f"data.train={path}", "data.split.ratios=[0.7,0.2,0.1]", "data.split.stratify=nivel"]).data
    splits = build_datasets(cfg)
    assert [len(splits.train), len(splits.validation), len(splits.test)] == [28, 8, 4]
    for name, expected in (("train", (14, 7, 7)), ("validation", (4, 2, 2)), ("test", (2, 1, 1))):
        levels = [ex.meta["nivel"] for ex in getattr(splits, name)]
        assert (levels.count("fácil"), levels.count("media"), levels.count("difícil")) == expected
    ids = [ex.id for name in ("train", "validation", "test") for ex in getattr(splits, name)]
    assert len(set(ids)) == 40
    again = build_datasets(cfg)
    assert [e.id for e in again.test] == [e.id for e in splits.test]
    other = build_datasets(replace(cfg, split=replace(cfg.split, seed=1)))
    assert [e.id for e in other.test] != [e.id for e in splits.test]


def test_eval_split_picks_the_held_out_examples(tmp_path):
    path = _write(tmp_path / "faq.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in _faq_rows()))
    splits = build_datasets(load_config(None, [f"data.train={path}", "data.split.ratios=[0.7,0.2,0.1]"]).data)
    assert splits.held_out("") == splits.test == splits.held_out("test")
    assert splits.held_out("validation") == splits.validation and splits.validation != splits.test
    two = build_datasets(load_config(None, [f"data.train={path}", "data.split.ratios=[0.8,0.2]"]).data)
    assert two.held_out("") == two.validation
    with pytest.raises(KerasftError, match="eval.split: test: this data has no test split"):
        two.held_out("test")
    with pytest.raises(KerasftError, match="eval.split: 'dev' is not one of test, validation"):
        load_config(None, ["eval.split=dev"])


def test_stratify_column_must_exist(tmp_path):
    path = _write(tmp_path / "faq.jsonl", '{"prompt": "a", "response": "b"}\n')
    cfg = load_config(None, [f"data.train={path}", "data.split.ratios=[0.5,0.5]", "data.split.stratify=nivel"]).data
    with pytest.raises(KerasftError, match="faq.jsonl: line 1: no column 'nivel'"):
        build_datasets(cfg, need_eval=False)


def test_splits_written_to_the_run_dir_read_back_identically(tmp_path):
    doc = {"data": [{"title": "t", "paragraphs": [{"context": CONTEXT, "qas": [
        {"id": f"q{i}", "question": f"¿Pregunta {i}?", "answers": [{"text": "Zaragoza", "answer_start": 21}]}
        for i in range(10)]}]}]}
    path = _write(tmp_path / "qa.json", json.dumps(doc, ensure_ascii=False))
    cfg = load_config(None, [f"data.train={path}", "data.split.ratios=[0.8,0.2]", "data.system=Sé breve."]).data
    splits = build_datasets(cfg, need_eval=False)
    write_splits(splits, tmp_path / "run" / "data")
    again = load_examples(tmp_path / "run" / "data" / "train.jsonl", cfg)
    assert [replace(e, origin="") for e in again] == [replace(e, origin="") for e in splits.train]
    assert json.loads((tmp_path / "run" / "data" / "report.json").read_text())["counts"] == {"train": 8, "validation": 2, "test": 0}


def test_cleaning_and_dedup(tmp_path):
    rows = [{"prompt": "<p>¿Qué  hora   es?</p>", "response": "Las  tres."},
            {"prompt": "¿que hora es", "response": "las tres"},
            {"prompt": "¿Qué hora es?", "response": "Las tres."},
            {"prompt": "Cafe\u0301", "response": "sí"}]
    path = _write(tmp_path / "d.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    base = DataConfig(train=str(path), clean=CleanConfig(strip_html=True, whitespace=True, dedup="exact"))
    splits = build_datasets(base, need_eval=False)
    assert [e.prompt for e in splits.train] == ["¿Qué hora es?", "¿que hora es", "Café"]
    assert splits.train[0].response == "Las tres."
    assert [d["id"] for d in splits.report["duplicates_removed"]] == ["d-3"]
    normalized = build_datasets(replace(base, clean=replace(base.clean, dedup="normalized")), need_eval=False)
    assert [e.id for e in normalized.train] == ["d-1", "d-4"]


def test_cleaning_relocates_the_answer_in_its_context(tmp_path):
    context = "<b>El   Ebro</b> pasa por   Zaragoza."
    doc = {"data": [{"title": "t", "paragraphs": [{"context": context, "qas": [
        {"id": "q", "question": "¿Dónde?", "answers": [{"text": "Zaragoza", "answer_start": context.index("Zaragoza")}]}]}]}]}
    path = _write(tmp_path / "qa.json", json.dumps(doc))
    cfg = DataConfig(train=str(path), clean=CleanConfig(strip_html=True, whitespace=True))
    (ex,) = build_datasets(cfg, need_eval=False).train
    assert ex.context == "El Ebro pasa por Zaragoza." and ex.context[ex.answer_start:].startswith("Zaragoza")
    assert ex.context in ex.prompt


def test_augmentation_is_seeded_and_keeps_context_and_answer(tmp_path):
    doc = {"data": [{"title": "t", "paragraphs": [{"context": CONTEXT, "qas": [
        {"id": "q", "question": "¿Por qué ciudad grande pasa el río?", "answers": [{"text": "Zaragoza", "answer_start": 21}]}]}]}]}
    path = _write(tmp_path / "qa.json", json.dumps(doc, ensure_ascii=False))
    synonyms = _write(tmp_path / "syn.tsv", "ciudad\tpoblación, urbe\n")
    overrides = [f"data.train={path}", "data.augment.enabled=true", "data.augment.copies=3", f"data.augment.synonyms={synonyms}"]
    cfg = load_config(None, overrides).data
    first = build_datasets(cfg, need_eval=False)
    assert first.report["augmented"] == len(first.train) - 1 > 0
    for ex in first.train[1:]:
        assert ex.id.startswith("q-aug") and ex.response == "Zaragoza"
        assert ex.prompt.startswith(first.train[0].prompt.split("Pregunta: ")[0] + "Pregunta: ")
        assert ex.prompt != first.train[0].prompt
    assert [e.prompt for e in build_datasets(cfg, need_eval=False).train] == [e.prompt for e in first.train]
    only_synonyms = load_config(None, overrides + ["data.augment.ops=[synonym]"]).data
    variants = build_datasets(only_synonyms, need_eval=False).train[1:]
    assert variants and all(("población" in e.prompt) or ("urbe" in e.prompt) for e in variants)


def test_split_examples_rounds_every_example_into_one_split():
    from kerasft.data.records import Example

    examples = [Example(str(i), "p", "r", meta={"c": "ab"[i % 2]}) for i in range(7)]
    parts = split_examples(examples, (0.5, 0.25, 0.25), "c", seed=3)
    assert sorted(e.id for part in parts for e in part) == sorted(e.id for e in examples)


def test_prompt_template_and_labels_for_classification_sets(tmp_path):
    """PAWS-X style rows: two sentences and an integer label."""
    rows = [{"id": "p1", "sentence1": "Llueve en Huesca.", "sentence2": "En Huesca está lloviendo.", "label": 1},
            {"id": "p2", "sentence1": "El tren sale a las ocho.", "sentence2": "El tren llega a las ocho.", "label": 0}]
    path = _write(tmp_path / "pawsx.jsonl", "\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    cfg = DataConfig(prompt_template="¿Dicen lo mismo?\n1: {sentence1}\n2: {sentence2}", labels=("no", "sí"))
    a, b = load_examples(path, cfg)
    assert a.prompt == "¿Dicen lo mismo?\n1: Llueve en Huesca.\n2: En Huesca está lloviendo." and a.response == "sí"
    assert b.response == "no"
    with pytest.raises(KerasftError, match=r"line 1: data.prompt_template uses \{sentense1\} .*did you mean 'sentence1'"):
        load_examples(path, replace(cfg, prompt_template="{sentense1}"))
    bad = _write(tmp_path / "bad.jsonl", json.dumps({"sentence1": "a", "sentence2": "b", "label": 2}))
    with pytest.raises(KerasftError, match=r"bad\.jsonl: line 1: label: label '2' is not an index into data.labels \(0..1\)"):
        load_examples(bad, cfg)
