"""An OpenAI-style HTTP server for a kerasft model: /v1/completions, /v1/chat/completions (plain
JSON or server-sent events with `stream: true`), /v1/models and /health.

Standard library only (http.server.ThreadingHTTPServer): each connection gets a thread that
parses and validates its request, then hands the token ids to one worker thread. The worker
collects the requests that arrive within a short window (up to `max_batch`) and decodes them
together with kerasft's batched greedy generate (kerasft.evaluate.generate.generate_ids), so
every JAX call happens on one thread and concurrent clients share a forward pass. Chat prompts
are rendered by kerasft.data.template, the function training used.

Streaming sends one event per token, but only once the request's batch has finished decoding:
keras-hub's compiled generate loop does not hand out tokens as it goes.
"""

from __future__ import annotations

import json
import queue
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from kerasft.data.template import chat_tokens, encode_prompt
from kerasft.errors import KerasftError
from kerasft.evaluate.generate import PROMPT_BUCKET, causal_lm_for, generate_ids
from kerasft.models.families import FAMILIES, model_family
from kerasft.models.presets import load_source
from kerasft.runtime import init_backend

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MAX_BODY_BYTES = 1 << 20
# Decode lengths are rounded up to this grid (and batches to powers of two), so the server
# compiles a handful of generate programs, not one per request shape.
NEW_TOKEN_BUCKET = 16
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
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
class _Job:
    """One prompt waiting for the worker."""

    prompt_ids: list[int]
    max_tokens: int
    done: threading.Event = field(default_factory=threading.Event)
    new_ids: list[int] | None = None
    error: BaseException | None = None


class Engine:
    """The model, its chat template, and the batching worker thread.

    Args:
        loaded: kerasft.models.presets.LoadedModel.
        model_id: the name /v1/models reports.
        template / system: the chat template and default system prompt (a run's data config).
        max_batch: the most prompts decoded together.
        batch_window_s: how long the worker waits for more requests after the first arrives.
        max_tokens_limit: the largest max_tokens a request may ask for.
        context_length: the longest prompt + max_tokens accepted (defaults to the family's).
    """

    def __init__(self, loaded, *, model_id: str, template: str = "auto", system: str = "", max_batch: int = 8,
                 batch_window_s: float = 0.02, max_tokens_limit: int = 512, context_length: int | None = None):
        if max_batch < 1 or max_tokens_limit < 1:
            raise KerasftError("serve: --max-batch and --max-tokens must be at least 1")
        self.model_id, self.template, self.system = model_id, template, system
        self.tokens = chat_tokens(loaded.tokenizer)
        self.causal_lm = causal_lm_for(loaded.backbone)
        self.context_length = context_length or FAMILIES[model_family(loaded.backbone)].context_length
        self.max_batch, self.batch_window_s, self.max_tokens_limit = max_batch, batch_window_s, max_tokens_limit
        self.created = int(time.time())
        self.stats = {"requests": 0, "batches": 0, "batch_sizes": []}
        self._queue: queue.Queue = queue.Queue()
        self._worker = threading.Thread(target=self._run, name="kerasft-generate", daemon=True)
        self._worker.start()

    # Request side (HTTP handler threads) -------------------------------------------------------

    def completion(self, body: dict) -> dict:
        """Validates a /v1/completions body; returns {"prompt_ids", "max_tokens", "stop"}."""
        prompt = body.get("prompt")
        if prompt is None:
            raise RequestError("you must provide a prompt", param="prompt", code="missing_required_parameter")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
            prompt = prompt[0]
        if not isinstance(prompt, str):
            raise RequestError("prompt must be a string (one prompt per request)", param="prompt")
        prompt_ids = [self.tokens.bos] + self.tokens.encode_batch([prompt], after_special=True)[0]
        return self._limits(body, prompt_ids, COMPLETIONS_DEFAULT_MAX_TOKENS)

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
        return self._limits(body, prompt_ids, None)

    def _limits(self, body: dict, prompt_ids: list[int], default_max_tokens: int | None) -> dict:
        for name, allowed in (("n", (None, 1)), ("best_of", (None, 1)), ("echo", (None, False))):
            if body.get(name) not in allowed:
                raise RequestError(f"{name}={body.get(name)!r} is not supported by this server", param=name)
        temperature = body.get("temperature")
        if temperature is not None and (not isinstance(temperature, (int, float)) or temperature != 0):
            raise RequestError("this server decodes greedily: omit temperature or send 0", param="temperature")
        key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        room = self.context_length - len(prompt_ids)
        if room < 1:
            raise RequestError(
                f"the prompt is {len(prompt_ids)} tokens; this model's context is {self.context_length} tokens",
                param="messages" if "messages" in body else "prompt", code="context_length_exceeded")
        max_tokens = body.get(key)
        if max_tokens is None:
            max_tokens = default_max_tokens or min(self.max_tokens_limit, room)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise RequestError(f"{key} must be a positive integer, got {max_tokens!r}", param=key)
        if max_tokens > self.max_tokens_limit:
            raise RequestError(f"{key}={max_tokens} is more than this server allows ({self.max_tokens_limit})",
                               param=key)
        if len(prompt_ids) + max_tokens > self.context_length:
            raise RequestError(
                f"the prompt ({len(prompt_ids)} tokens) plus {key} ({max_tokens}) exceeds this model's context of "
                f"{self.context_length} tokens", param=key, code="context_length_exceeded")
        stop = body.get("stop")
        stop = [stop] if isinstance(stop, str) else stop
        if stop is not None and (not isinstance(stop, list) or len(stop) > 4
                                 or not all(isinstance(s, str) and s for s in stop)):
            raise RequestError("stop must be a non-empty string or a list of up to 4 of them", param="stop")
        return {"prompt_ids": prompt_ids, "max_tokens": max_tokens, "stop": stop or []}

    def generate(self, prompt_ids: list[int], max_tokens: int, stop: list[str]) -> dict:
        """Greedy continuation of one prompt (blocks until its batch is decoded).

        Returns:
            {"ids": new token ids, "pieces": the text each id adds, "text", "finish_reason"}.
        """
        job = _Job(prompt_ids, max_tokens)
        self._queue.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        new_ids = job.new_ids[:max_tokens]
        finish = "stop" if len(job.new_ids) < max_tokens else "length"
        pieces, previous = [], ""
        for end in range(1, len(new_ids) + 1):
            text = self.tokens.decode(new_ids[:end])
            if text.endswith("\ufffd") and end < len(new_ids):
                pieces.append("")  # an incomplete UTF-8 byte sequence: wait for the rest
                continue
            pieces.append(text[len(previous):])
            previous = text
        text = "".join(pieces)
        cut = min((text.find(s) for s in stop if s in text), default=-1)
        if cut >= 0:
            text, finish, kept = text[:cut], "stop", []
            for piece in pieces:  # streamed pieces end where the text was cut
                room = cut - sum(len(p) for p in kept)
                if room <= 0:
                    break
                kept.append(piece[:room])
            pieces = kept
        return {"ids": new_ids, "pieces": pieces, "text": text, "finish_reason": finish}

    def warm_up(self, prompts: list[list[int]], max_tokens: int) -> float:
        """Compiles the generate program of every batch size the worker can form (powers of two
        up to max_batch) for each prompt-length bucket among `prompts`; returns the seconds."""
        started = time.perf_counter()
        by_bucket = {-(-len(ids) // PROMPT_BUCKET): ids for ids in prompts}
        for prompt_ids in by_bucket.values():
            rows = 1
            while True:
                jobs = [_Job(prompt_ids, max_tokens) for _ in range(rows)]
                self._decode(jobs)
                if jobs[0].error is not None:
                    raise jobs[0].error
                if rows >= self.max_batch:
                    break
                rows *= 2
        return time.perf_counter() - started

    def close(self) -> None:
        self._queue.put(None)
        self._worker.join(timeout=60)

    # Worker side ------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            jobs = [job]
            deadline = time.monotonic() + self.batch_window_s
            while len(jobs) < self.max_batch:
                try:
                    more = self._queue.get(timeout=max(deadline - time.monotonic(), 0))
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)  # finish this batch, then stop
                    break
                jobs.append(more)
            self._decode(jobs)

    def _decode(self, jobs: list[_Job]) -> None:
        try:
            # Powers of two rows and a 16-token grid of lengths: few compiled shapes.
            rows = 1 << (len(jobs) - 1).bit_length()
            new_tokens = -(-max(job.max_tokens for job in jobs) // NEW_TOKEN_BUCKET) * NEW_TOKEN_BUCKET
            prompts = [job.prompt_ids for job in jobs]
            prompts += [prompts[-1]] * (rows - len(jobs))
            outputs, _ = generate_ids(self.causal_lm, prompts, new_tokens, rows, self.tokens.stop_ids, self.tokens.pad)
            self.stats["requests"] += len(jobs)
            self.stats["batches"] += 1
            self.stats["batch_sizes"].append(len(jobs))
            for job, new_ids in zip(jobs, outputs):
                job.new_ids = new_ids
        except BaseException as error:  # noqa: BLE001 - the waiting handlers report it
            for job in jobs:
                job.error = error
        finally:
            for job in jobs:
                job.done.set()


def make_server(engine: Engine, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, quiet: bool = False):
    """A ThreadingHTTPServer answering the OpenAI-style routes with `engine` (port 0: any free port)."""
    handler = type("KerasftHandler", (_Handler,), {"engine": engine, "quiet": quiet})
    try:
        server = ThreadingHTTPServer((host, port), handler)
    except OSError as error:
        raise KerasftError(f"serve: cannot listen on {host}:{port} ({error.strerror or error})") from None
    server.daemon_threads = True
    return server


def load_engine(source: str, **options) -> Engine:
    """An Engine for a run dir (base + adapter), a keras-hub preset dir, a Hugging Face export
    dir, a .gguf file or any preset string kerasft's loader takes."""
    from pathlib import Path

    init_backend()
    loaded, cfg = load_source(source)
    data = cfg.data if cfg else None
    model_id = Path(source).name if Path(source).exists() else source
    return Engine(loaded, model_id=model_id, template=getattr(data, "template", "auto"),
                  system=getattr(data, "system", ""), **options)


def serve(source: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, **options) -> None:
    """Loads the model and serves it until interrupted (Ctrl-C)."""
    engine = load_engine(source, **options)
    server = make_server(engine, host, port)
    bound_host, bound_port = server.server_address[:2]
    print(f"serving {engine.model_id!r} on http://{bound_host}:{bound_port}/v1 "
          f"(max batch {engine.max_batch}, context {engine.context_length}); Ctrl-C stops", flush=True)
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _interrupt)  # `kill` stops it as cleanly as Ctrl-C
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        server.server_close()
        engine.close()


def _interrupt(signum, frame):
    raise KeyboardInterrupt


class _Handler(BaseHTTPRequestHandler):
    engine: Engine
    quiet: bool = False
    server_version = "kerasft"

    def log_message(self, format, *args):  # noqa: A002 - the base class's name
        if not self.quiet:
            super().log_message(format, *args)

    def do_GET(self):  # noqa: N802 - http.server's naming
        path = self.path.split("?", 1)[0].rstrip("/")
        if path == "/health":
            self._send_json(200, {"status": "ok", "model": self.engine.model_id})
        elif path == "/v1/models":
            self._send_json(200, {"object": "list", "data": [self._model_card()]})
        elif path == f"/v1/models/{self.engine.model_id}":
            self._send_json(200, self._model_card())
        else:
            self._send_error(RequestError(f"no route GET {path}", status=404, code="not_found"))

    def do_POST(self):  # noqa: N802
        path = self.path.split("?", 1)[0].rstrip("/")
        try:
            if path not in ("/v1/completions", "/v1/chat/completions"):
                raise RequestError(f"no route POST {path}", status=404, code="not_found")
            body = self._read_json()
            chat = path.endswith("chat/completions")
            request = self.engine.chat(body) if chat else self.engine.completion(body)
            stream = body.get("stream", False)
            if not isinstance(stream, bool):
                raise RequestError("stream must be true or false", param="stream")
            result = self.engine.generate(request["prompt_ids"], request["max_tokens"], request["stop"])
        except RequestError as error:
            self._send_error(error)
            return
        except Exception as error:  # noqa: BLE001 - a server error still gets a JSON body
            self._send_error(RequestError(f"generation failed: {type(error).__name__}: {error}", status=500))
            return
        usage = {"prompt_tokens": len(request["prompt_ids"]), "completion_tokens": len(result["ids"]),
                 "total_tokens": len(request["prompt_ids"]) + len(result["ids"])}
        reply_id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if stream:
            self._stream(reply_id, chat, result, usage, body)
            return
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": result["text"]},
                      "logprobs": None, "finish_reason": result["finish_reason"]}
        else:
            choice = {"index": 0, "text": result["text"], "logprobs": None, "finish_reason": result["finish_reason"]}
        self._send_json(200, {"id": reply_id, "object": "chat.completion" if chat else "text_completion",
                              "created": int(time.time()), "model": self.engine.model_id, "choices": [choice],
                              "usage": usage})

    def _stream(self, reply_id: str, chat: bool, result: dict, usage: dict, body: dict) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")
        self.end_headers()
        created = int(time.time())

        def chunk(delta_or_text, finish=None, extra=None):
            if chat:
                choice = {"index": 0, "delta": delta_or_text, "logprobs": None, "finish_reason": finish}
            else:
                choice = {"index": 0, "text": delta_or_text, "logprobs": None, "finish_reason": finish}
            event = {"id": reply_id, "object": "chat.completion.chunk" if chat else "text_completion",
                     "created": created, "model": self.engine.model_id, "choices": [choice], **(extra or {})}
            self.wfile.write(f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode())

        try:
            if chat:
                chunk({"role": "assistant", "content": ""})
            for piece in result["pieces"]:
                if piece:
                    chunk({"content": piece} if chat else piece)
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
            chunk({} if chat else "", result["finish_reason"], {"usage": usage} if include_usage else None)
            self.wfile.write(b"data: [DONE]\n\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            pass  # the client went away mid-stream
        self.close_connection = True

    def _model_card(self) -> dict:
        return {"id": self.engine.model_id, "object": "model", "created": self.engine.created, "owned_by": "kerasft"}

    def _read_json(self) -> dict:
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise RequestError("a JSON body with a Content-Length header is required", status=411) from None
        if length > MAX_BODY_BYTES:
            raise RequestError(f"the body is {length} bytes; the limit is {MAX_BODY_BYTES}", status=413)
        raw = self.rfile.read(length)
        try:
            body = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RequestError(f"the body is not valid JSON: {error}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        return body

    def _send_json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _send_error(self, error: RequestError) -> None:
        self._send_json(error.status, error.body())


def _message_text(content, where: str) -> str:
    """A message's text: a string, or OpenAI's list of {"type": "text", "text": ...} parts."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise RequestError(f"{where} must be a string or a list of text parts", param=where)

