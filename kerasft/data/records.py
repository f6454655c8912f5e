"""The one record type every data source becomes before tokenisation, and the mapping of raw
rows (JSON objects, spreadsheet rows, dataset rows, chat transcripts) onto it.

Errors name where the bad record came from ("train.csv: row 12: response: empty"). Stdlib only.
"""

from __future__ import annotations

import difflib
import json
import string
from dataclasses import dataclass, field, replace

from kerasft.errors import KerasftError

# Default names of each field when `data.columns` does not say; the first one present wins.
PROMPT_KEYS = ("prompt", "instruction", "input")
QUESTION_KEYS = ("question", "query")
RESPONSE_KEYS = ("response", "answer", "output", "completion", "target")
CONTEXT_KEYS = ("context", "passage", "document")
ID_KEYS = ("id", "qid", "question_id")
ROLES = ("system", "user", "assistant", "model")


class RecordError(KerasftError):
    """One bad record; with `data.on_error: skip` it is counted and listed instead of raised."""


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
    rejected: for a preference pair (train.objective dpo / orpo), the rejected answer;
        `response` is then the chosen one. Empty for every other record.
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
    rejected: str = ""

    @property
    def answerable(self) -> bool:
        """False for a SQuAD v2 question with no answer in its context (its response is the
        configured no-answer text and `answers` is empty)."""
        return bool(self.answers)

    def to_json(self) -> dict:
        """The record as written to a run's split files; `example_from_row` reads it back."""
        return {
            "id": self.id,
            "prompt": self.prompt,
            "response": self.response,
            "answers": list(self.answers),
            "context": self.context,
            "answer_start": self.answer_start,
            "system": self.system,
            "history": [list(turn) for turn in self.history],
            "meta": self.meta,
            "origin": self.origin,
            **({"rejected": self.rejected} if self.rejected else {}),
        }


def qa_prompt(instruction: str, context: str, question: str) -> str:
    """The user turn for extractive QA; one function so training and evaluation agree."""
    head = f"{instruction}\n\n" if instruction else ""
    return f"{head}Texto: {context}\n\nPregunta: {question}"


def squad_example(qid: str, context: str, question: str, answers: list[tuple[str, int]], origin: str,
                  instruction: str, no_answer: str, meta: dict | None = None) -> Example:
    """A SQuAD-style record; `answers` empty means unanswerable (SQuAD v2).

    Raises RecordError when an answer is not at its answer_start.
    """
    if not question.strip():
        raise RecordError(f"{origin} (id {qid}): empty question")
    for n, (text, start) in enumerate(answers):
        if start is None or start < 0:
            start = context.find(text)
            if start < 0:
                raise RecordError(f"{origin} (id {qid}): answers[{n}] {text!r} is not in the context")
            answers[n] = (text, start)
        elif context[start : start + len(text)] != text:
            found = context.find(text)
            hint = f"; the text occurs at {found}" if found >= 0 else "; the text is not in the context"
            raise RecordError(f"{origin}.answers[{n}] (id {qid}): answer {text!r} is not at answer_start {start}{hint}")
    prompt = qa_prompt(instruction, context, question)
    if not answers:
        return Example(qid, prompt, no_answer, (), context, -1, meta=meta or {}, origin=origin)
    return Example(qid, prompt, answers[0][0], tuple(t for t, _ in answers), context, answers[0][1],
                   meta=meta or {}, origin=origin)


def example_from_row(row: dict, origin: str, cfg, fallback_id: str) -> Example:
    """Maps one record (a JSON object, a spreadsheet or dataset row) onto an Example.

    Understands, in this order: chat transcripts (`messages`), SQuAD rows (`answers` with
    texts and starts, as in SQuAD JSON and Hugging Face QA datasets), question + context rows
    (QA prompt built from `data.instruction`), and prompt + response rows. A response that is a
    JSON object or list (structured output) is written as compact JSON.

    Args:
        row: the record's fields by name.
        origin: "file:line" or "file: row N", used in every error.
        cfg: kerasft.config.DataConfig (columns, instruction, no_answer, format).
        fallback_id: the id when the record has none.
    """
    if not isinstance(row, dict):
        raise RecordError(f"{origin}: expected an object with named fields, got {type(row).__name__}")
    cols = cfg.columns
    _check_columns(row, origin, cfg)
    qid = _text(row, _pick(row, cols.id, ID_KEYS), origin, required=False) or fallback_id
    meta = {key: _meta_value(row, key, origin) for key in meta_keys(cfg)}
    system = _text(row, cols.system or "system", origin, required=False)
    if cols.rejected or "rejected" in row or "chosen" in row:
        return _pair_example(row, origin, cfg, qid, meta, system)
    if cfg.format == "chat" or ("messages" in row and not cols.prompt):
        return _chat_example(row.get("messages"), origin, qid, meta, system)

    context_key = _pick(row, cols.context, CONTEXT_KEYS)
    question_key = cols.prompt if cols.prompt and context_key else _pick(row, "", QUESTION_KEYS)
    if context_key and question_key:
        if "answers" in row and not cols.response:
            answers = _squad_answers(row["answers"], origin)
        else:
            answer = _text(row, _pick(row, cols.response, RESPONSE_KEYS), origin)
            answers = [(answer, _int_or_none(row.get("answer_start")))]
        context = _text(row, context_key, origin)
        question = _text(row, question_key, origin)
        ex = squad_example(qid, context, question, answers, origin, cfg.instruction, cfg.no_answer, meta)
        return replace(ex, system=system)

    if cfg.prompt_template:
        return _templated_example(row, origin, cfg, qid, meta, system)
    prompt_key = _pick(row, cols.prompt, PROMPT_KEYS + QUESTION_KEYS)
    response_key = _pick(row, cols.response, RESPONSE_KEYS)
    if prompt_key is None or response_key is None:
        missing = "prompt" if prompt_key is None else "response"
        raise RecordError(f"{origin}: no {missing} field; found {', '.join(map(str, row)) or 'nothing'} "
                          f"(map one with data.columns.{missing})")
    prompt = _text(row, prompt_key, origin)
    response = _response_text(row, response_key, origin, structured=cfg.format == "structured")
    answers = row.get("answers")
    answers = tuple(str(a) for a in answers) if isinstance(answers, list) and answers else (response,)
    context = _text(row, "context", origin, required=False) if prompt_key == "prompt" else ""
    start = _int_or_none(row.get("answer_start"))
    if context and start is None:
        start = context.find(response)
    history = tuple(tuple(turn) for turn in row.get("history") or ())
    if any(len(turn) != 2 or not all(isinstance(t, str) for t in turn) for turn in history):
        raise RecordError(f"{origin}: history must be a list of [user, assistant] text pairs")
    return Example(qid, prompt, response, answers, context, -1 if start is None else start, system, history,
                   meta or dict(row.get("meta") or {}), origin)


def _pair_example(row: dict, origin: str, cfg, qid: str, meta: dict, system: str) -> Example:
    """A preference pair: a prompt (`prompt`, the turns of `messages` up to the last user turn,
    or `question` + `context` built into the QA prompt with data.instruction, as for SFT) and two
    answers, `chosen` (data.columns.response) and `rejected` (data.columns.rejected). An answer
    is text, or TRL's conversational form: a list of messages whose last one is the assistant's."""
    cols = cfg.columns
    chosen_key = cols.response or ("chosen" if "chosen" in row else _pick(row, "", RESPONSE_KEYS) or "chosen")
    chosen = _pair_answer(row, chosen_key, origin)
    rejected = _pair_answer(row, cols.rejected or "rejected", origin)
    if chosen == rejected:
        raise RecordError(f"{origin}: chosen and rejected are the same text")
    context, start, history = "", -1, ()
    context_key = _pick(row, cols.context, CONTEXT_KEYS)
    question_key = cols.prompt if cols.prompt and context_key else _pick(row, "", QUESTION_KEYS)
    if "messages" in row and not cols.prompt:
        messages = row["messages"]
        if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict):
            raise RecordError(f"{origin}: messages: expected a non-empty list of {{role, content}} objects")
        # The prompt's turns end with the user's; a placeholder answer closes them for the chat parser.
        parsed = _chat_example([*messages, {"role": "assistant", "content": chosen}], origin, qid, meta, system)
        prompt, history, system = parsed.prompt, parsed.history, parsed.system
    elif context_key and question_key:
        context = _text(row, context_key, origin)
        prompt = qa_prompt(cfg.instruction, context, _text(row, question_key, origin))
        start = context.find(chosen)
    else:
        prompt_key = _pick(row, cols.prompt, PROMPT_KEYS + QUESTION_KEYS)
        if prompt_key is None:
            raise RecordError(f"{origin}: no prompt field; a preference pair needs prompt or messages, chosen and "
                              f"rejected (found {', '.join(map(str, row))})")
        prompt = _text(row, prompt_key, origin)
        history = tuple(tuple(turn) for turn in row.get("history") or ())  # a run's split file
        if any(len(turn) != 2 or not all(isinstance(t, str) for t in turn) for turn in history):
            raise RecordError(f"{origin}: history must be a list of [user, assistant] text pairs")
    return Example(qid, prompt, chosen, (chosen,), context, start, system, history, meta, origin, rejected=rejected)


def _pair_answer(row: dict, key: str, origin: str) -> str:
    value = row.get(key)
    if isinstance(value, list):  # conversational: [{"role": "assistant", "content": ...}]
        last = value[-1] if value else None
        if not isinstance(last, dict) or last.get("role") not in ("assistant", "model") or not isinstance(
                last.get("content"), str):
            raise RecordError(f"{origin}: {key}: expected text or a list of messages ending with the assistant's")
        value = last["content"]
    if value is None:
        raise RecordError(f"{origin}: {key}: missing (a preference pair needs chosen and rejected)")
    return _text({key: value}, key, origin)


def _templated_example(row: dict, origin: str, cfg, qid: str, meta: dict, system: str) -> Example:
    """A prompt built from several columns with data.prompt_template; integer labels in the
    response column become texts through data.labels (classification sets such as PAWS-X)."""
    fields = {name for _, name, _, _ in string.Formatter().parse(cfg.prompt_template) if name}
    for name in sorted(fields):
        if name not in row:
            close = difflib.get_close_matches(name, [str(k) for k in row], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; columns are {', '.join(map(str, row))}"
            raise RecordError(f"{origin}: data.prompt_template uses {{{name}}} but the record has no such column{hint}")
    prompt = cfg.prompt_template.format(**{name: _text(row, name, origin) for name in fields})
    response_key = _pick(row, cfg.columns.response, RESPONSE_KEYS + ("label",))
    if response_key is None:
        raise RecordError(f"{origin}: no response field; found {', '.join(map(str, row))} (map one with data.columns.response)")
    response = _text(row, response_key, origin)
    if cfg.labels:
        label = _int_or_none(response)
        if label is None or not 0 <= label < len(cfg.labels):
            raise RecordError(f"{origin}: {response_key}: label {response!r} is not an index into data.labels "
                              f"(0..{len(cfg.labels) - 1})")
        response = cfg.labels[label]
    return Example(qid, prompt, response, (response,), system=system, meta=meta, origin=origin)


def _chat_example(messages, origin: str, qid: str, meta: dict, system: str) -> Example:
    """A chat transcript: optional system turn, then alternating user / assistant turns ending
    with an assistant turn. Every assistant turn is a training target."""
    if not isinstance(messages, list) or not messages:
        raise RecordError(f"{origin}: messages: expected a non-empty list of {{role, content}} objects")
    turns = []
    for n, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise RecordError(f"{origin}: messages[{n}]: expected an object with role and content")
        role, content = message["role"], message["content"]
        if role not in ROLES:
            close = difflib.get_close_matches(str(role), ROLES, n=1)
            hint = f"; did you mean {close[0]}?" if close else f"; use one of {', '.join(ROLES)}"
            raise RecordError(f"{origin}: messages[{n}].role: unknown role {role!r}{hint}")
        if not isinstance(content, str):
            raise RecordError(f"{origin}: messages[{n}].content: expected text, got {type(content).__name__}")
        turns.append(("assistant" if role == "model" else role, content))
    if turns[0][0] == "system":
        system = turns.pop(0)[1]
    if len(turns) < 2 or len(turns) % 2:
        raise RecordError(f"{origin}: messages: expected user/assistant pairs after the system turn, got {len(turns)} turns")
    for n, (role, content) in enumerate(turns):
        expected = "user" if n % 2 == 0 else "assistant"
        if role != expected:
            raise RecordError(f"{origin}: messages: turn {n + 1} is {role!r}, expected {expected!r} (turns alternate user, assistant)")
        if not content.strip():
            raise RecordError(f"{origin}: messages: turn {n + 1} ({role}) is empty")
    pairs = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns), 2)]
    (prompt, response), history = pairs[-1], tuple(pairs[:-1])
    return Example(qid, prompt, response, (response,), system=system, history=history, meta=meta, origin=origin)


def meta_keys(cfg) -> tuple[str, ...]:
    """The metadata columns to keep: data.columns.meta plus the stratification column."""
    stratify = cfg.split.stratify
    return cfg.columns.meta + ((stratify,) if stratify and stratify not in cfg.columns.meta else ())


def _check_columns(row: dict, origin: str, cfg) -> None:
    """Every column named in data.columns must exist (with the closest real name suggested)."""
    cols = cfg.columns
    for name in (cols.id, cols.prompt, cols.response, cols.rejected, cols.context, cols.system, *meta_keys(cfg)):
        if name and name not in row:
            close = difflib.get_close_matches(name, [str(k) for k in row], n=1)
            hint = f"; did you mean {close[0]!r}?" if close else f"; columns are {', '.join(map(str, row))}"
            raise RecordError(f"{origin}: no column {name!r}{hint}")


def _pick(row: dict, configured: str, defaults: tuple[str, ...]) -> str | None:
    if configured:
        return configured
    return next((key for key in defaults if key in row), None)


def _text(row: dict, key: str | None, origin: str, required: bool = True) -> str:
    value = row.get(key) if key is not None else None
    if value is None or (isinstance(value, float) and value != value):  # missing or NaN (empty cell)
        if required:
            raise RecordError(f"{origin}: {key}: missing")
        return ""
    if isinstance(value, bool) or isinstance(value, (dict, list)):
        raise RecordError(f"{origin}: {key}: expected text, got {type(value).__name__}")
    text = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)
    if required and not text.strip():
        raise RecordError(f"{origin}: {key}: empty")
    return text


def _response_text(row: dict, key: str, origin: str, structured: bool) -> str:
    value = row.get(key)
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False)
    text = _text(row, key, origin)
    if structured:
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as err:
            raise RecordError(f"{origin}: {key}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(parsed, (dict, list)):
            raise RecordError(f"{origin}: {key}: expected a JSON object or list")
        return json.dumps(parsed, ensure_ascii=False)
    return text


def _squad_answers(answers, origin: str) -> list[tuple[str, int | None]]:
    """SQuAD answers as a list of {text, answer_start} or a dict of parallel lists (HF, TFDS)."""
    if isinstance(answers, dict):
        texts, starts = answers.get("text", []), answers.get("answer_start", [])
        texts = [t.decode() if isinstance(t, bytes) else str(t) for t in list(texts)]
        starts = [int(s) for s in list(starts)]
        if len(starts) != len(texts):
            raise RecordError(f"{origin}: answers: {len(texts)} texts but {len(starts)} answer_start values")
        return list(zip(texts, starts))
    out = []
    for n, answer in enumerate(answers):
        if not isinstance(answer, dict) or not isinstance(answer.get("text"), str):
            raise RecordError(f"{origin}: answers[{n}]: expected an object with text and answer_start")
        start = answer.get("answer_start")
        if start is not None and (isinstance(start, bool) or not isinstance(start, int)):
            raise RecordError(f"{origin}: answers[{n}].answer_start: expected int, got {type(start).__name__}")
        out.append((answer["text"], start))
    return out


def _meta_value(row: dict, key: str, origin: str) -> str:
    value = row.get(key)
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _int_or_none(value):
    if value is None or isinstance(value, bool):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
