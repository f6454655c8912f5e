"""Every data source becomes a list of `Example` records before tokenisation.

Sources here: SQuAD v1.1 JSON and JSONL (prompt/response, or context/question/answer). Errors
name the file and the line or key path of the bad record. Stdlib only.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from kerasft.errors import KerasftError


@dataclass(frozen=True)
class Example:
    """One training or evaluation example.

    prompt: the user turn's text (for QA: instruction, context and question).
    response: the target text (for QA: the first gold answer).
    answers: every gold answer, for scoring.
    context: for QA, the passage as it appears inside `prompt`, so the pipeline can trim it
        around the answer when the example is too long.
    answer_start: character offset of `response` inside `context` (-1 when unknown).
    system: this example's system prompt; empty means the config's `data.system`.
    history: earlier (user, assistant) exchanges of a multi-turn chat; every assistant turn in
        it carries loss weight like `response` does.
    meta: metadata columns (category, difficulty, ...) for stratified splits and per-group
        metrics; values are strings.
    origin: where the record came from ("file.jsonl:12"), for error messages and reports.
    """

    id: str
    prompt: str
    response: str
    answers: tuple[str, ...] = ()
    context: str = ""
    answer_start: int = -1
    system: str = ""
    history: tuple[tuple[str, str], ...] = ()
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    origin: str = ""

    @property
    def answerable(self) -> bool:
        """False for a SQuAD v2 question with no answer in its context (its response is the
        configured no-answer text and `answers` is empty)."""
        return bool(self.answers)


def qa_prompt(instruction: str, context: str, question: str) -> str:
    """The user turn for extractive QA; one function so training and evaluation agree."""
    head = f"{instruction}\n\n" if instruction else ""
    return f"{head}Texto: {context}\n\nPregunta: {question}"


def load_examples(path: str | Path, instruction: str = "") -> list[Example]:
    """Reads SQuAD v1.1 JSON (.json) or JSONL (.jsonl) into examples; raises on any bad record."""
    path = Path(path)
    if not path.is_file():
        raise KerasftError(f"{path}: data file not found")
    suffix = path.suffix.lower()
    if suffix == ".json":
        examples = _load_squad(path, instruction)
    elif suffix == ".jsonl":
        examples = _load_jsonl(path, instruction)
    else:
        raise KerasftError(f"{path}: unsupported data format {suffix or '(no extension)'}; use .json (SQuAD v1.1) or .jsonl")
    if not examples:
        raise KerasftError(f"{path}: no examples found")
    seen = set()
    for ex in examples:
        if ex.id in seen:
            raise KerasftError(f"{path}: duplicate example id {ex.id!r}")
        seen.add(ex.id)
    return examples


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise KerasftError(f"{path}: not UTF-8 text (byte {err.start})") from None


def _load_squad(path: Path, instruction: str) -> list[Example]:
    try:
        doc = json.loads(_read_text(path))
    except json.JSONDecodeError as err:
        raise KerasftError(f"{path}: line {err.lineno} column {err.colno}: invalid JSON: {err.msg}") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("data"), list):
        raise KerasftError(f"{path}: not SQuAD v1.1 JSON (expected an object with a 'data' list)")
    examples = []
    for i, article in enumerate(doc["data"]):
        for j, paragraph in enumerate(_field(article, "paragraphs", list, path, f"data[{i}]")):
            where = f"data[{i}].paragraphs[{j}]"
            context = _field(paragraph, "context", str, path, where)
            for k, qa in enumerate(_field(paragraph, "qas", list, path, where)):
                examples.append(_squad_example(qa, context, path, f"{where}.qas[{k}]", instruction))
    return examples


def _squad_example(qa, context: str, path: Path, where: str, instruction: str) -> Example:
    qid = str(_field(qa, "id", (str, int), path, where))
    question = _field(qa, "question", str, path, where)
    answers = _field(qa, "answers", list, path, where)
    if not answers:
        raise KerasftError(f"{path}: {where} (id {qid}): no answers")
    texts = []
    for n, answer in enumerate(answers):
        text = _field(answer, "text", str, path, f"{where}.answers[{n}]")
        start = _field(answer, "answer_start", int, path, f"{where}.answers[{n}]")
        if context[start : start + len(text)] != text:
            found = context.find(text)
            hint = f"; the text occurs at {found}" if found >= 0 else "; the text is not in the context"
            raise KerasftError(
                f"{path}: {where}.answers[{n}] (id {qid}): answer {text!r} is not at answer_start {start}{hint}"
            )
        texts.append(text)
    first = answers[0]
    return Example(
        id=qid,
        prompt=qa_prompt(instruction, context, question),
        response=texts[0],
        answers=tuple(texts),
        context=context,
        answer_start=first["answer_start"],
    )


def _load_jsonl(path: Path, instruction: str) -> list[Example]:
    examples = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise KerasftError(f"{path}: line {lineno}: invalid JSON: {err.msg}") from None
        where = f"line {lineno}"
        if not isinstance(record, dict):
            raise KerasftError(f"{path}: {where}: expected a JSON object")
        qid = str(record.get("id", f"{path.stem}-{lineno}"))
        if "context" in record or "question" in record:
            context = _field(record, "context", str, path, where)
            question = _field(record, "question", str, path, where)
            answer = _field(record, "answer", str, path, where)
            start = context.find(answer)
            if start < 0:
                raise KerasftError(f"{path}: {where}: answer {answer!r} is not in the context")
            examples.append(
                Example(qid, qa_prompt(instruction, context, question), answer, (answer,), context, start)
            )
        else:
            prompt = _field(record, "prompt", str, path, where)
            response = _field(record, "response", str, path, where)
            if not prompt.strip() or not response.strip():
                raise KerasftError(f"{path}: {where}: empty prompt or response")
            answers = tuple(record.get("answers") or (response,))
            examples.append(Example(qid, prompt, response, answers))
    return examples


def _field(record, key: str, kind, path: Path, where: str):
    if not isinstance(record, dict):
        raise KerasftError(f"{path}: {where}: expected a JSON object")
    if key not in record:
        raise KerasftError(f"{path}: {where}: missing {key!r}")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise KerasftError(f"{path}: {where}.{key}: expected {names}, got {type(value).__name__}")
    return value
