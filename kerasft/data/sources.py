"""Readers for every data source users bring; each yields Examples through records.py.

A source is a string:
    path/to/file.{json,jsonl,csv,tsv,xlsx,xls,txt,parquet}   local files
    hf:NAME[:CONFIG][@SPLIT]   Hugging Face `datasets`: a hub name (facebook/mlqa:mlqa.es.es@test)
                               or a local dataset folder in the same layout
    tfds:NAME[@SPLIT]          TensorFlow Datasets (xquad/es@test), when installed

Bad records raise a one-line error naming the file, line or row and field, or with
`data.on_error: skip` are collected in `SourceResult.skipped`. Nothing is dropped silently.
"""

from __future__ import annotations

import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import csv

from kerasft.config import DataConfig
from kerasft.data.records import Example, example_from_row, meta_keys, RecordError, squad_example
from kerasft.errors import KerasftError

EXTENSIONS = {
    ".json": "squad", ".jsonl": "jsonl", ".csv": "csv", ".tsv": "tsv", ".xlsx": "excel", ".xls": "excel",
    ".txt": "text", ".text": "text", ".md": "text", ".parquet": "parquet",
}


@dataclass
class SourceResult:
    """Examples read from one source, and the records skipped under `on_error: skip`."""

    examples: list[Example] = field(default_factory=list)
    skipped: list[dict] = field(default_factory=list)


def read_source(spec: str, cfg) -> SourceResult:
    """Reads one source (see the module doc) with the settings of `cfg` (a DataConfig)."""
    return _collect(iter_source(spec, cfg), cfg, spec)


def iter_source(spec: str, cfg):
    """Streams one source as Examples, and RecordErrors for records that do not map (the caller
    applies data.on_error). Files are read record by record, so a text corpus larger than
    memory can be tokenised in one pass."""
    spec = str(spec)
    if spec.startswith("hf:"):
        return _rows_to_examples(_hf_rows(spec[3:]), cfg, spec)
    if spec.startswith("tfds:"):
        return _rows_to_examples(_tfds_rows(spec[5:]), cfg, spec)
    path = Path(spec)
    if not path.is_file():
        raise KerasftError(f"{path}: data file not found")
    if path.stat().st_size == 0:
        raise KerasftError(f"{path}: file is empty")
    kind = _file_kind(path, cfg)
    if kind == "squad":
        return _squad_file(path, cfg)
    if kind == "text":
        return _text_examples(path, cfg)
    rows = {"jsonl": jsonl_rows, "csv": csv_rows, "tsv": csv_rows, "excel": excel_rows,
            "parquet": _parquet_rows}[kind](path, cfg)
    return _rows_to_examples(rows, cfg, str(path))


def source_identity(spec: str) -> str:
    """What a cache key needs to know about a source without reading it: a file's resolved
    path, size and modification time; a dataset's name, config and split."""
    path = Path(str(spec))
    if path.is_file():
        stat = path.stat()
        return f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return str(spec)


def load_examples(spec, cfg=None) -> list[Example]:
    """All examples of one source; raises on the first bad record (or skips, per cfg.on_error).

    Args:
        spec: a source string (see the module doc).
        cfg: a DataConfig; None means the defaults.
    """
    result = read_source(spec, cfg or DataConfig())
    _report_skipped(result, spec)
    return result.examples


def _report_skipped(result: SourceResult, spec) -> None:
    if result.skipped:
        print(f"warning: {spec}: skipped {len(result.skipped)} bad records (data.on_error=skip), "
              f"first: {result.skipped[0]['error']}", file=sys.stderr)


def _collect(items, cfg, label) -> SourceResult:
    """Drains Examples and RecordErrors, applying on_error to the errors; checks ids are unique."""
    result = SourceResult()
    seen: dict[str, str] = {}
    for item in items:
        if isinstance(item, RecordError):
            if cfg.on_error != "skip":
                raise item
            result.skipped.append({"error": str(item)})
            continue
        if item.id in seen:
            error = RecordError(f"{item.origin}: duplicate example id {item.id!r} (first at {seen[item.id]})")
            if cfg.on_error != "skip":
                raise error
            result.skipped.append({"error": str(error)})
            continue
        seen[item.id] = item.origin
        result.examples.append(item)
    if not result.examples:
        detail = f"; all {len(result.skipped)} records were bad, first: {result.skipped[0]['error']}" if result.skipped else ""
        raise KerasftError(f"{label}: no examples found{detail}")
    return result


def _rows_to_examples(rows, cfg, label):
    """(origin, row) pairs -> Examples, or the RecordError of a row that does not map."""
    stem = Path(label.split("@")[0]).name.split(".")[0] or "row"
    for origin, row in rows:
        try:
            if isinstance(row, _Invalid):
                raise RecordError(row.message)
            # "file: line 12" -> id "file-12": stable when other records are added or removed
            yield example_from_row(row, origin, cfg, fallback_id=f"{stem}-{origin.rsplit(' ', 1)[-1]}")
        except RecordError as err:
            yield err


def _file_kind(path: Path, cfg) -> str:
    if cfg.format in ("csv", "tsv", "excel", "text"):
        return cfg.format
    suffix = path.suffix.lower()
    if suffix in EXTENSIONS:
        return EXTENSIONS[suffix]
    if cfg.format in ("jsonl", "chat", "structured"):
        return "jsonl"
    raise KerasftError(f"{path}: unsupported data format {suffix or '(no extension)'}; use one of "
                       f"{', '.join(sorted(EXTENSIONS))} or set data.format")


def read_text(path: Path, encoding: str = "utf-8") -> str:
    """A text file's content; a wrong encoding names the line and suggests data.encoding."""
    raw = path.read_bytes()
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        raise KerasftError(f"{path}: line {line}: not valid {encoding} (byte 0x{raw[err.start]:02x}); "
                           f"set data.encoding (e.g. latin-1, cp1252)") from None
    except LookupError:
        raise KerasftError(f"data.encoding: unknown encoding {encoding!r}") from None
    return text.lstrip("\ufeff")


def _squad_file(path: Path, cfg):
    """SQuAD v1.1 / v2 JSON: data[].paragraphs[].qas[]; v2's is_impossible -> no-answer example.
    A .json file holding a list of objects is read like JSONL."""
    try:
        doc = json.loads(read_text(path, cfg.encoding))
    except json.JSONDecodeError as err:
        raise KerasftError(f"{path}: line {err.lineno} column {err.colno}: invalid JSON: {err.msg}") from None
    if isinstance(doc, list):
        yield from _rows_to_examples(((f"{path}: item {n}", row) for n, row in enumerate(doc)), cfg, str(path))
        return
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise KerasftError(f"{path}: not SQuAD JSON (expected an object with a 'data' list, or a list of records)")
    for i, article in enumerate(doc["data"]):
        for j, paragraph in enumerate(_field(article, "paragraphs", list, path, f"data[{i}]")):
            where = f"data[{i}].paragraphs[{j}]"
            context = _field(paragraph, "context", str, path, where)
            for k, qa in enumerate(_field(paragraph, "qas", list, path, where)):
                try:
                    yield _squad_qa(qa, context, f"{path}: {where}.qas[{k}]", cfg)
                except RecordError as err:
                    yield err


def _squad_qa(qa, context: str, origin: str, cfg) -> Example:
    if not isinstance(qa, dict):
        raise RecordError(f"{origin}: expected an object")
    qid, question, answers = qa.get("id"), qa.get("question"), qa.get("answers")
    if not isinstance(qid, (str, int)) or isinstance(qid, bool):
        raise RecordError(f"{origin}.id: expected str/int, got {type(qid).__name__}")
    if not isinstance(question, str):
        raise RecordError(f"{origin} (id {qid}).question: expected str, got {type(question).__name__}")
    if not isinstance(answers, list):
        raise RecordError(f"{origin} (id {qid}).answers: expected a list")
    if qa.get("is_impossible"):
        answers = []
    elif not answers:
        raise RecordError(f"{origin} (id {qid}): no answers (set is_impossible for SQuAD v2)")
    parsed = []
    for n, answer in enumerate(answers):
        if not isinstance(answer, dict) or not isinstance(answer.get("text"), str):
            raise RecordError(f"{origin}.answers[{n}] (id {qid}): expected an object with text")
        start = answer.get("answer_start")
        if not isinstance(start, int) or isinstance(start, bool):
            raise RecordError(f"{origin}.answers[{n}].answer_start (id {qid}): expected int, got {type(start).__name__}")
        parsed.append((answer["text"], start))
    meta = {key: str(qa.get(key, "")) for key in meta_keys(cfg)}
    return squad_example(str(qid), context, question, parsed, origin, cfg.instruction, cfg.no_answer, meta)


def _field(record, key: str, kind, path: Path, where: str):
    if not isinstance(record, dict) or key not in record:
        raise KerasftError(f"{path}: {where}: missing {key!r}")
    if not isinstance(record[key], kind):
        raise KerasftError(f"{path}: {where}.{key}: expected {kind.__name__}, got {type(record[key]).__name__}")
    return record[key]


def jsonl_rows(path: Path, cfg):
    """One JSON object per line (blank lines ignored); streamed, never read whole."""
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode(cfg.encoding)
            except UnicodeDecodeError:
                raise KerasftError(f"{path}: line {lineno}: not valid {cfg.encoding}; set data.encoding") from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                if cfg.on_error == "skip":
                    yield f"{path}: line {lineno}", _Invalid(f"{path}: line {lineno}: invalid JSON: {err.msg}")
                    continue
                raise KerasftError(f"{path}: line {lineno}: invalid JSON: {err.msg}") from None
            yield f"{path}: line {lineno}", row


class _Invalid(dict):
    """A row that could not be parsed; mapping it raises its RecordError (so `skip` can count it)."""

    def __init__(self, message: str):
        super().__init__()
        self.message = message


def csv_rows(path: Path, cfg):
    delimiter = cfg.delimiter or ("\t" if path.suffix.lower() == ".tsv" or cfg.format == "tsv" else ",")
    delimiter = delimiter.replace("\\t", "\t")
    reader = csv.reader(io.StringIO(read_text(path, cfg.encoding), newline=""), delimiter=delimiter)
    header = next(reader, None)
    if not header or not any(h.strip() for h in header):
        raise KerasftError(f"{path}: no header row (the first row must name the columns)")
    header = [h.strip() for h in header]
    for n, values in enumerate(reader, start=2):
        if not any(v.strip() for v in values):
            continue
        if len(values) != len(header):
            yield f"{path}: row {n}", _Invalid(f"{path}: row {n}: {len(values)} fields but the header has "
                                               f"{len(header)} (delimiter {delimiter!r}; set data.delimiter?)")
            continue
        yield f"{path}: row {n}", {h: (v if v.strip() else None) for h, v in zip(header, values)}


def excel_rows(path: Path, cfg):
    try:
        import pandas
    except ImportError:
        raise KerasftError("reading spreadsheets needs pandas and openpyxl/xlrd: pip install 'kerasft[data]'") from None
    engine = "xlrd" if path.suffix.lower() == ".xls" else "openpyxl"
    try:
        frame = pandas.read_excel(path, sheet_name=cfg.sheet or 0, dtype=object, engine=engine)
    except ImportError as err:
        raise KerasftError(f"{path}: {err.name or engine} is needed for this spreadsheet: pip install 'kerasft[data]'") from None
    except ValueError as err:  # unknown sheet name
        raise KerasftError(f"{path}: {err}") from None
    except Exception as err:  # corrupt or not a spreadsheet
        raise KerasftError(f"{path}: cannot read spreadsheet: {err}") from None
    frame.columns = [str(c).strip() for c in frame.columns]
    for n, row in enumerate(frame.to_dict(orient="records"), start=2):  # row 1 is the header
        if all(v is None or (isinstance(v, float) and v != v) for v in row.values()):
            continue
        yield f"{path}: row {n}", row


def _parquet_rows(path: Path, cfg):
    yield from _dataset_rows(_load_hf("parquet", data_files=str(path), split="train"), str(path))


def _hf_rows(spec: str):
    """hf:NAME[:CONFIG][@SPLIT] through datasets.load_dataset (hub name or local folder)."""
    name, _, split = spec.partition("@")
    name, _, config = name.partition(":")
    if not name:
        raise KerasftError(f"hf:{spec}: expected hf:NAME[:CONFIG][@SPLIT], e.g. hf:facebook/mlqa:mlqa.es.es@test")
    dataset = _load_hf(name, name=config or None, split=split or "train")
    yield from _dataset_rows(dataset, f"hf:{spec}")


def _load_hf(path: str, **kwargs):
    try:
        import datasets
    except ImportError:
        raise KerasftError("Hugging Face datasets are read with the `datasets` package: pip install 'kerasft[data]'") from None
    try:
        return datasets.load_dataset(path, **kwargs)
    except (FileNotFoundError, ValueError) as err:
        raise KerasftError(f"{path}: cannot load dataset: {str(err).splitlines()[0]}") from None
    except Exception as err:  # ConnectionError, hub errors: one line, not a traceback
        kind = type(err).__name__
        raise KerasftError(f"{path}: cannot load dataset ({kind}: {str(err).splitlines()[0] if str(err) else ''}); "
                           f"hub datasets need network access") from None


def _dataset_rows(dataset, label: str):
    for n, row in enumerate(dataset):
        yield f"{label}: row {n}", row


def _tfds_rows(spec: str):
    """tfds:NAME[@SPLIT]; features decoded from bytes to text."""
    name, _, split = spec.partition("@")
    try:
        import tensorflow_datasets as tfds
    except ImportError:
        raise KerasftError(f"tfds:{spec}: TensorFlow Datasets is not installed: pip install tensorflow-datasets") from None
    try:
        dataset = tfds.load(name, split=split or "train", download=True)
    except Exception as err:
        raise KerasftError(f"tfds:{spec}: cannot load ({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''})") from None
    for n, row in enumerate(tfds.as_numpy(dataset)):
        yield f"tfds:{spec}: row {n}", _decode(row)


def _decode(value):
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, dict):
        return {k: _decode(v) for k, v in value.items()}
    if hasattr(value, "tolist"):
        return _decode(value.tolist())
    if isinstance(value, list):
        return [_decode(v) for v in value]
    return value


def text_units(path: Path, cfg):
    """(origin, text) for each unit of a text file: a line, a paragraph (blank-line separated)
    or a piece between separators, per data.text_unit. Empty units are skipped. Streams the
    file line by line (a separator piece is held in memory until its end)."""
    sep = cfg.separator.replace("\\n", "\n").replace("\\t", "\t")
    unit: list[str] = []
    start = 1
    with path.open("rb") as handle:
        pending = ""
        for lineno, raw in enumerate(handle, start=1):
            try:
                line = raw.decode(cfg.encoding)
            except UnicodeDecodeError:
                raise KerasftError(f"{path}: line {lineno}: not valid {cfg.encoding}; set data.encoding") from None
            if lineno == 1:
                line = line.lstrip("\ufeff")
            line = line.replace("\r\n", "\n")
            if cfg.text_unit == "line":
                if line.strip():
                    yield f"{path}: line {lineno}", line.rstrip("\n")
            elif cfg.text_unit == "paragraph":
                if line.strip():
                    if not unit:
                        start = lineno
                    unit.append(line)
                elif unit:
                    yield f"{path}: line {start}", "".join(unit).strip("\n")
                    unit = []
            else:
                if not pending:
                    start = lineno
                pending += line
                while sep in pending:
                    piece, pending = pending.split(sep, 1)
                    if piece.strip():
                        yield f"{path}: line {start}", piece.strip("\n")
                    start = lineno
        if unit:
            yield f"{path}: line {start}", "".join(unit).strip("\n")
        if cfg.text_unit == "separator" and pending.strip():
            yield f"{path}: line {start}", pending.strip("\n")


def _text_examples(path: Path, cfg):
    """Text files: for task=pretrain each unit is a document (response only, no prompt); for
    sft each unit is `prompt<TAB>response`."""
    for n, (origin, unit) in enumerate(text_units(path, cfg), start=1):
        if cfg.task == "pretrain":
            yield Example(f"{path.stem}-{n}", "", unit, origin=origin)
            continue
        prompt, tab, response = unit.partition("\t")
        if not tab or not prompt.strip() or not response.strip():
            yield RecordError(f"{origin}: expected 'prompt<TAB>response' (for raw text set data.task=pretrain)")
            continue
        yield Example(f"{path.stem}-{n}", prompt, response, (response,), origin=origin)
