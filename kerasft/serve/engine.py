"""The serving engine: request validation, sampling options, adapters, and the decode loop.

One worker thread owns the model. It holds a KV cache of `max_batch` rows (kerasft.evaluate.
generate.DecodeFunctions, the decode loop `kerasft generate` and evaluation use) and loops:
requests waiting in the queue are prefilled into free rows, all of them in one call (their first
token is emitted right away), then one jitted step decodes one token for every row and hands each new token to its
request. A request that arrives while others are decoding joins at the next step boundary; a row
whose answer ends is free for the next request at once.

Several adapters share one base: their LoRA matrices are stacked, and each row of the step
reads its own adapter's (rows of different adapters share a step).
"""

from __future__ import annotations

import queue
import secrets
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kerasft.data.template import chat_tokens, encode_prompt
from kerasft.errors import KerasftError
from kerasft.evaluate.generate import TOP_LOGPROBS, DecodeFunctions, causal_lm_for, token_entry
from kerasft.models.families import FAMILIES, model_family

COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
DEFAULT_MAX_SEQ_LEN = 1024
MIN_CACHE_LENGTH = 128
MAX_N = 8
MAX_STOP = 4
ROLES = ("system", "user", "assistant")


class RequestError(Exception):
    """A client error, sent as OpenAI's {"error": {...}} body with a 4xx status."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.param, self.code = status, param, code

    def body(self) -> dict:
        kind = "invalid_request_error" if self.status < 500 else "server_error"
        return {"error": {"message": str(self), "type": kind, "param": self.param, "code": self.code}}


@dataclass
class Job:
    """One choice of one request in the decode loop. The worker calls `sink(event)` for each new
    piece of text ({"text", "token", "logprob", "top"}) and once at the end ({"finish_reason"} or
    {"error"})."""

    prompt_ids: list[int]
    max_tokens: int
    stop: list[str]
    sampling: tuple  # (temperature, top_k, top_p, seed, choice index)
    adapter: int
    sink: object
    ids: list[int] = field(default_factory=list)
    emitted: int = 0  # characters of the answer already handed out
    text: str = ""
    cancelled: bool = False
    pending: list = field(default_factory=list)  # logprob entries of tokens whose text is incomplete UTF-8
    held: list = field(default_factory=list)  # entries whose text is held back (it may start a stop string)


class Engine:
    """The model, its chat template, its adapters and the decode worker.

    Args:
        loaded: kerasft.models.presets.LoadedModel (the base; with LoRA on for a run dir).
        model_id: the name /v1/models reports for the model as loaded.
        template / system: the chat template and default system prompt (a run's data config).
        max_batch: rows of the KV cache: the most answers decoded together.
        max_tokens_limit: the largest max_tokens a request may ask for.
        context_length: the model's context (defaults to the family's).
        max_seq_len: cache length per row: prompt + max_tokens of one request (default
            min(context, 1024)).
        max_prompt_tokens: the longest prompt accepted (default max_seq_len - 1).
        adapters: {name: adapter dir} served over the same base; requests pick one by `model`.
        default_temperature: the temperature of a request that sends none (0: greedy).
    """

    def __init__(self, loaded, *, model_id: str, template: str = "auto", system: str = "", max_batch: int = 8,
                 max_tokens_limit: int = 512, context_length: int | None = None, max_seq_len: int | None = None,
                 max_prompt_tokens: int | None = None, adapters: dict | None = None,
                 default_temperature: float = 0.0):
        if max_batch < 1 or max_tokens_limit < 1:
            raise KerasftError("serve: --max-batch and --max-tokens must be at least 1")
        self.model_id, self.template, self.system = model_id, template, system
        self.tokens = chat_tokens(loaded.tokenizer)
        self.causal_lm = causal_lm_for(loaded.backbone)
        self.context_length = context_length or FAMILIES[model_family(loaded.backbone)].context_length
        self.max_seq_len = min(max_seq_len or DEFAULT_MAX_SEQ_LEN, self.context_length)
        self.max_prompt_tokens = min(max_prompt_tokens or self.max_seq_len - 1, self.max_seq_len - 1)
        if self.max_seq_len < 2:
            raise KerasftError(f"serve: --max-seq-len must be at least 2, got {self.max_seq_len}")
        self.max_batch, self.max_tokens_limit = max_batch, max_tokens_limit
        self.default_temperature = float(default_temperature)
        self.created = int(time.time())
        self.model_ids, lora_variables, self._lora_table = _stack_adapters(loaded.backbone, model_id, adapters or {})
        self._functions = DecodeFunctions(self.causal_lm, lora_variables)
        # batches: decode steps run; batch_sizes: the rows in use at each step.
        self.stats = {"requests": 0, "batches": 0, "batch_sizes": []}
        self._queue: queue.Queue = queue.Queue()
        self._closed = False
        self._worker = threading.Thread(target=self._run, name="kerasft-decode", daemon=True)
        self._worker.start()

    # Request side -------------------------------------------------------------------------------

    def completion(self, body: dict) -> dict:
        """Validates a /v1/completions body; returns the job options (prompt_ids, max_tokens, ...)."""
        prompt = body.get("prompt")
        if prompt is None:
            raise RequestError("you must provide a prompt", param="prompt", code="missing_required_parameter")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError("prompt must be a string (one prompt per request)", param="prompt")
        prompt_ids = [self.tokens.bos] + self.tokens.encode_batch([prompt], after_special=True)[0]
        return self._options(body, prompt_ids, COMPLETIONS_DEFAULT_MAX_TOKENS, chat=False)

    def chat(self, body: dict) -> dict:
        """Validates a /v1/chat/completions body and renders it with the training template."""
        messages = body.get("messages")
        if messages is None:
            raise RequestError("you must provide messages", param="messages", code="missing_required_parameter")
        if not isinstance(messages, list) or not messages:
            raise RequestError("messages must be a non-empty list", param="messages")
        turns = []
        for index, message in enumerate(messages):
            where = f"messages[{index}]"
            if not isinstance(message, dict):
                raise RequestError(f"{where} must be an object with role and content", param=where)
            role = message.get("role")
            if role not in ROLES:
                raise RequestError(f"{where}.role: {role!r} is not one of {', '.join(ROLES)}", param=f"{where}.role")
            turns.append((role, _message_text(message.get("content"), f"{where}.content")))
        system = self.system
        if turns[0][0] == "system":
            system = turns.pop(0)[1]
        roles = [role for role, _ in turns]
        expected = ["user" if i % 2 == 0 else "assistant" for i in range(len(turns))]
        if roles != expected or not turns or roles[-1] != "user":
            raise RequestError(
                "messages must be an optional system message, then user and assistant turns alternating, "
                "starting and ending with user", param="messages")
        history = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns) - 1, 2)]
        prompt_ids = encode_prompt(self.tokens, turns[-1][1], system, history, self.template)
        return self._options(body, prompt_ids, None, chat=True)

    def adapter_index(self, model) -> int:
        """The row of the adapter table a request's `model` names (any name when only one model
        is served, as OpenAI clients must send some name)."""
        if len(self.model_ids) == 1:
            return 0
        if model not in self.model_ids:
            raise RequestError(f"model {model!r} is not served here; models: {', '.join(self.model_ids)}",
                               status=404, param="model", code="model_not_found")
        return self.model_ids.index(model)

    def _options(self, body: dict, prompt_ids: list[int], default_max_tokens: int | None, chat: bool) -> dict:
        for name, allowed in (("best_of", (None, 1)), ("echo", (None, False)), ("suffix", (None,))):
            if body.get(name) not in allowed:
                raise RequestError(f"{name}={body.get(name)!r} is not supported by this server", param=name)
        where = "messages" if chat else "prompt"
        if len(prompt_ids) > self.max_prompt_tokens:
            limit = ("this model's context is" if self.max_prompt_tokens >= self.context_length - 1
                     else "this server accepts prompts of at most")
            raise RequestError(f"the prompt is {len(prompt_ids)} tokens; {limit} {self.max_prompt_tokens + 1 if limit.startswith('this model') else self.max_prompt_tokens} tokens",
                               param=where, code="context_length_exceeded")
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        room = self.max_seq_len - len(prompt_ids)
        max_tokens = body.get(key)
        if max_tokens is None:
            max_tokens = default_max_tokens or min(self.max_tokens_limit, room)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise RequestError(f"{key} must be a positive integer, got {max_tokens!r}", param=key)
        if max_tokens > self.max_tokens_limit:
            raise RequestError(f"{key}={max_tokens} is more than this server allows ({self.max_tokens_limit})",
                               param=key)
        if max_tokens > room:
            raise RequestError(
                f"the prompt ({len(prompt_ids)} tokens) plus {key} ({max_tokens}) exceeds this server's "
                f"{self.max_seq_len} tokens per request", param=key, code="context_length_exceeded")
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop
        if stop is not None and (not isinstance(stop, list) or len(stop) > MAX_STOP
                                 or not all(isinstance(s, str) and s for s in stop)):
            raise RequestError(f"stop must be a non-empty string or a list of up to {MAX_STOP} of them", param="stop")
        n = _integer(body, "n", 1, 1, MAX_N)
        temperature = _number(body, "temperature", self.default_temperature, 0.0, 2.0)
        top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
        if top_p == 0:
            raise RequestError("top_p must be above 0", param="top_p")
        top_k = _integer(body, "top_k", 0, 0, None)
        seed = body.get("seed")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
            raise RequestError(f"seed must be an integer, got {seed!r}", param="seed")
        if chat:
            want = body.get("logprobs")
            if want not in (None, True, False):
                raise RequestError("logprobs must be true or false", param="logprobs")
            top = _integer(body, "top_logprobs", 0, 0, TOP_LOGPROBS)
            if top and not want:
                raise RequestError("top_logprobs needs logprobs: true", param="top_logprobs")
            logprobs = top if want else None
        else:
            logprobs = _integer(body, "logprobs", None, 0, 5)
        return {"prompt_ids": prompt_ids, "max_tokens": max_tokens, "stop": stop or [], "n": n,
                "temperature": temperature, "top_p": top_p, "top_k": top_k,
                "seed": seed if seed is not None else secrets.randbits(31), "logprobs": logprobs,
                "adapter": self.adapter_index(body.get("model"))}

    def submit(self, options: dict, sink) -> list[Job]:
        """Queues the request's n choices; `sink(index, event)` gets each choice's events."""
        if self._closed:
            raise RequestError("the server is shutting down", status=503, code="unavailable")
        jobs = []
        for index in range(options["n"]):
            jobs.append(Job(options["prompt_ids"], options["max_tokens"], options["stop"],
                            (options["temperature"], options["top_k"], options["top_p"], options["seed"] & 0x7FFFFFFF,
                             index), options["adapter"], (lambda event, _i=index: sink(_i, event))))
        for job in jobs:
            self._queue.put(job)
        self.stats["requests"] += 1
        return jobs

    def generate(self, prompt_ids: list[int], max_tokens: int, stop: list[str], **options) -> dict:
        """One answer, blocking (choice 0; greedy unless options say otherwise).

        Returns:
            {"ids", "pieces": the text each emitted event added, "text", "finish_reason"}.
        """
        events: queue.Queue = queue.Queue()
        full = {"prompt_ids": prompt_ids, "max_tokens": max_tokens, "stop": stop, "n": 1, "temperature": 0.0,
                "top_p": 1.0, "top_k": 0, "seed": 0, "logprobs": None, "adapter": 0, **options}
        self.submit(full, lambda _index, event: events.put(event))
        ids, pieces = [], []
        while True:
            event = events.get()
            if "error" in event:
                raise event["error"]
            if "finish_reason" in event:
                return {"ids": ids, "pieces": pieces, "text": "".join(pieces), "finish_reason": event["finish_reason"]}
            ids.extend(event["tokens"])
            pieces.append(event["text"])

    def warm_up(self, prompts: list[list[int]] = ()) -> float:
        """Compiles the step and the prefill of each prompt's length bucket (32 tokens; other
        buckets compile on first use); returns the seconds."""
        started = time.perf_counter()
        for prompt_ids in {-(-len(ids) // 32): ids for ids in [*prompts, [self.tokens.bos]]}.values():
            self.generate(prompt_ids, 2, [])
        return time.perf_counter() - started

    def close(self) -> None:
        self._closed = True
        self._queue.put(None)
        self._worker.join(timeout=60)

    # Worker side --------------------------------------------------------------------------------

    def _run(self) -> None:
        rows = self.max_batch
        cache, width = None, 0
        slots: list[Job | None] = [None] * rows
        tokens = np.zeros(rows, np.int32)
        positions = np.zeros(rows, np.int32)
        stopping = False
        while True:
            if not stopping and None in slots:
                joining, stopping = self._waiting(slots.count(None), block=not any(slots))
                # The requests that arrived are prefilled together, one call per adapter among them.
                for adapter in dict.fromkeys(job.adapter for job in joining):
                    group = [job for job in joining if job.adapter == adapter]
                    free = [s for s, job in enumerate(slots) if job is None][: len(group)]
                    try:
                        need = max(len(j.prompt_ids) + j.max_tokens for j in [*group, *filter(None, slots)])
                        if cache is None or need > width:
                            # The cache is as long as the longest request in it needs, on a grid of
                            # powers of two: attention and cache traffic grow with its length.
                            width = min(self.max_seq_len, max(MIN_CACHE_LENGTH, 1 << (need - 1).bit_length()))
                            cache = self._functions.grow_cache(cache, rows, width)
                        cache, choice = self._functions.prefill(
                            cache, free, [job.prompt_ids for job in group],
                            [(*job.sampling[:4], 0, job.sampling[4]) for job in group],
                            lora=[t[adapter] for t in self._lora_table])
                    except Exception as error:  # noqa: BLE001 - the requests that failed get it
                        for job in group:
                            job.sink({"error": error})
                        continue
                    for r, (slot, job) in enumerate(zip(free, group)):
                        slots[slot] = job
                        tokens[slot], positions[slot] = choice.tokens[r], len(job.prompt_ids)
                        if self._take(job, choice, r):
                            slots[slot] = None
            active = [s for s, job in enumerate(slots) if job is not None]
            if not active:
                if stopping:
                    return
                cache = None  # idle: the next request starts a cache of its own length
                continue
            try:
                sampling = [(*job.sampling[:4], len(job.ids), job.sampling[4]) if job else (0.0, 0, 1.0, 0, 0, 0)
                            for job in slots]
                adapters = [job.adapter if job else 0 for job in slots]
                cache, choice = self._functions.step(cache, tokens, positions, sampling, adapters, self._lora_table)
            except Exception as error:  # noqa: BLE001
                for s in active:
                    slots[s].sink({"error": error})
                    slots[s] = None
                cache = None
                continue
            self.stats["batches"] += 1
            self.stats["batch_sizes"].append(len(active))
            for s in active:
                tokens[s] = choice.tokens[s]
                positions[s] += 1
                if self._take(slots[s], choice, s):
                    slots[s] = None

    def _waiting(self, free: int, block: bool) -> tuple[list[Job], bool]:
        """Up to `free` queued jobs (waiting for the first when `block`), and whether close() was seen."""
        jobs = []
        while len(jobs) < free:
            try:
                job = self._queue.get() if block and not jobs else self._queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                return jobs, True
            if not job.cancelled:
                jobs.append(job)
        return jobs, False

    def _take(self, job: Job, choice, row: int) -> bool:
        """Hands row `row` of a decode call's Choice to its job; True when the job is finished."""
        token = int(choice.tokens[row])
        if job.cancelled:
            return True
        if token in self.tokens.stop_ids:
            self._flush(job, "stop")
            return True
        job.ids.append(token)
        text = self.tokens.decode(job.ids)
        entry = token_entry(choice, row)
        if text.endswith("\ufffd") and len(job.ids) < job.max_tokens:
            job.pending.append(entry)  # an incomplete UTF-8 sequence: wait for the rest
            return False
        entries = job.pending + [entry]
        job.pending = []
        job.text = text
        cut = min((text.find(s) for s in job.stop if s in text), default=-1)
        if cut >= 0:
            job.text = text[:cut]
            self._emit(job, entries)
            self._flush(job, "stop")
            return True
        if len(job.ids) >= job.max_tokens:
            self._emit(job, entries)
            self._flush(job, "length")
            return True
        self._emit(job, entries, hold=_stop_prefix(text, job.stop))
        return False

    def _emit(self, job: Job, entries: list[dict], hold: int = 0) -> None:
        """Sends the answer's text past what was sent, less `hold` characters that may start a stop string."""
        end = len(job.text) - hold
        piece = job.text[job.emitted:end] if end > job.emitted else ""
        job.emitted = max(job.emitted, end)
        job.held = job.held + entries
        if piece or not hold:
            job.sink({"text": piece, "tokens": [e["token"] for e in job.held], "entries": job.held})
            job.held = []

    def _flush(self, job: Job, reason: str) -> None:
        if job.emitted < len(job.text) or job.held:
            self._emit(job, [])
        job.sink({"finish_reason": reason})


def _stop_prefix(text: str, stops: list[str]) -> int:
    """Length of the longest end of `text` that is the start of a stop string (held back while streaming)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if stop.startswith(text[-size:]):
                longest = size
                break
    return longest


def _integer(body: dict, name: str, default, low: int, high: int | None):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low or (high is not None and value > high):
        bound = f"from {low} to {high}" if high is not None else f"at least {low}"
        raise RequestError(f"{name} must be an integer {bound}, got {value!r}", param=name)
    return value


def _number(body: dict, name: str, default: float, low: float, high: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise RequestError(f"{name} must be a number from {low:g} to {high:g}, got {value!r}", param=name)
    return float(value)


def _message_text(content, where: str) -> str:
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError(f"{where} must be a string or a list of text parts", param=where)


def _stack_adapters(backbone, model_id: str, adapters: dict) -> tuple[list[str], list, list]:
    """Model names, the LoRA variables read per row, and their values stacked over models.

    Row 0 is the model as loaded (no adapter, or a run dir's own). Each named adapter is read
    from its files (no reload of the base): LoRA is enabled at the largest rank over the union of
    targets with scale 1; an adapter's A is zero-padded to that rank and its B scaled by its
    alpha / rank, so A @ B * scale is unchanged; a layer an adapter does not target gets zeros.
    """
    if not adapters:
        return [model_id], [], []
    from safetensors.numpy import load_file

    from kerasft.config import LoraConfig
    from kerasft.models.lora import ADAPTER_WEIGHTS, apply_lora, lora_layers, read_adapter_config

    if lora_layers(backbone):
        raise KerasftError("serve --adapter: SRC must be a base model, not a run dir with its own adapter "
                           "(name the run dir with --adapter instead)")
    metas = {}
    for name, folder in adapters.items():
        if name == model_id:
            raise KerasftError(f"serve --adapter {name}=...: the name is the base model's; pick another")
        meta = read_adapter_config(folder)
        if (meta.get("trainable_tokens") or {}).get("ids"):
            raise KerasftError(f"serve --adapter {name}={folder}: the adapter retrains embedding rows "
                               "(lora.trainable_tokens), which change the base; serve it alone (kerasft serve RUN_DIR)")
        metas[name] = meta
    rank = max(int(m["rank"]) for m in metas.values())
    targets = tuple(sorted({t for m in metas.values() for t in m["targets"]}))
    apply_lora(backbone, LoraConfig(rank=rank, alpha=float(rank), targets=targets))
    layers = lora_layers(backbone)
    variables = [v for layer in layers for v in (layer.lora_kernel_a, layer.lora_kernel_b)]
    table = [[np.zeros(tuple(v.shape), np.float32)] for v in variables]
    for name, folder in adapters.items():
        meta = metas[name]
        weights = load_file(str(Path(folder) / ADAPTER_WEIGHTS))
        scale = float(meta["alpha"]) / int(meta["rank"])
        known = set()
        for column, variable in enumerate(variables):
            value = weights.get(variable.path)
            padded = np.zeros(tuple(variable.shape), np.float32)
            if value is not None:
                known.add(variable.path)
                own = int(meta["rank"])
                a_matrix = column % 2 == 0  # variables alternate A, B
                expected = list(variable.shape)
                if a_matrix:
                    expected[-1] = own
                else:
                    expected[0] = own
                if list(value.shape) != expected:
                    raise KerasftError(f"{folder}: {variable.path} has shape {value.shape}, the base wants {tuple(expected)}")
                if a_matrix:
                    padded[..., :own] = value
                else:
                    padded[:own] = value * scale
            table[column].append(padded)
        unknown = sorted(set(weights) - known)
        if unknown:
            raise KerasftError(f"{folder}: adapter does not match the base model (first mismatch: {unknown[0]})")
    import jax.numpy as jnp

    return [model_id, *adapters], variables, [jnp.asarray(np.stack(column)) for column in table]
