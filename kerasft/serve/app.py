"""The OpenAI-style HTTP API over an Engine: a FastAPI (ASGI) app run by uvicorn (no `from __future__
import annotations` here: FastAPI reads the route functions' annotations at run time).

Routes: POST /v1/completions, POST /v1/chat/completions (JSON, or server-sent events with
`stream: true`, one event per decoded token as the decode loop produces it), GET /v1/models,
GET /v1/models/{id}, GET /health. Errors are OpenAI's {"error": {message, type, param, code}}.
"""


import asyncio
import hmac
import json
import socket
import threading
import time
import uuid

from kerasft.errors import KerasftError
from kerasft.serve.engine import RequestError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8000
MAX_BODY_BYTES = 1 << 20


def make_app(engine, *, api_key: str | None = None, cors_origins=(), max_body_bytes: int = MAX_BODY_BYTES):
    """The FastAPI app answering the OpenAI-style routes with `engine`.

    Args:
        api_key: when set, every route but /health needs `Authorization: Bearer <api_key>` (401 otherwise).
        cors_origins: origins allowed to call from a browser (none: no CORS headers at all).
        max_body_bytes: larger request bodies get 413.
    """
    try:
        from fastapi import FastAPI, Request
        from fastapi.exceptions import RequestValidationError
        from fastapi.responses import JSONResponse, StreamingResponse
        from starlette.exceptions import HTTPException
    except ImportError:
        raise KerasftError("kerasft serve needs fastapi and uvicorn: pip install 'kerasft[serve]'") from None

    app = FastAPI(title="kerasft", docs_url=None, redoc_url=None, openapi_url=None)
    if cors_origins:
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])

    def error_response(error: RequestError, headers=None):
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(RequestError)
    async def on_request_error(request, error: RequestError):
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def on_http_error(request, error: HTTPException):
        if error.status_code == 404:
            return error_response(RequestError(f"no route {request.method} {request.url.path}", status=404,
                                               code="not_found"))
        return error_response(RequestError(str(error.detail), status=error.status_code))

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request, error):
        return error_response(RequestError(str(error), status=400))

    @app.middleware("http")
    async def check_key(request: Request, call_next):
        if api_key and request.url.path.rstrip("/") != "/health" and request.method != "OPTIONS":
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), api_key.encode()):
                message = "missing API key: send Authorization: Bearer <key>" if not token else "incorrect API key"
                return error_response(RequestError(message, status=401, code="invalid_api_key"),
                                      headers={"WWW-Authenticate": "Bearer"})
        return await call_next(request)

    def card(model_id: str) -> dict:
        return {"id": model_id, "object": "model", "created": engine.created, "owned_by": "kerasft"}

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": engine.model_id}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [card(m) for m in engine.model_ids]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id not in engine.model_ids:
            raise RequestError(f"model {model_id!r} is not served here", status=404, param="model",
                               code="model_not_found")
        return card(model_id)

    async def read_json(request: Request) -> dict:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise RequestError(f"the body is {declared} bytes; the limit is {max_body_bytes}", status=413,
                               code="request_too_large")
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > max_body_bytes:
                raise RequestError(f"the body is over the limit of {max_body_bytes} bytes", status=413,
                                   code="request_too_large")
        try:
            body = json.loads(bytes(raw).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as error:
            raise RequestError(f"the body is not valid JSON: {error}", code="invalid_json") from None
        if not isinstance(body, dict):
            raise RequestError("the body must be a JSON object")
        return body

    async def complete(request: Request, chat: bool):
        body = await read_json(request)
        options = engine.chat(body) if chat else engine.completion(body)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError("stream must be true or false", param="stream")
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()
        jobs = engine.submit(options, lambda index, event: loop.call_soon_threadsafe(events.put_nowait, (index, event)))
        reply = _Reply(engine, options, chat, body.get("model") or engine.model_id)
        if stream:
            include_usage = bool((body.get("stream_options") or {}).get("include_usage"))

            async def sse():
                try:
                    if chat:
                        for index in range(options["n"]):
                            yield reply.chunk(index, {"role": "assistant", "content": ""})
                    finished = 0
                    while finished < options["n"]:
                        index, event = await events.get()
                        if "error" in event:
                            yield reply.error_chunk(event["error"])
                            return
                        if "finish_reason" in event:
                            finished += 1
                            reply.finish(index, event["finish_reason"])
                            yield reply.chunk(index, {} if chat else "", event["finish_reason"])
                            continue
                        reply.add(index, event)
                        if event["text"] or event["entries"]:
                            yield reply.chunk(index, {"content": event["text"]} if chat else event["text"],
                                              logprobs=reply.logprobs(event["entries"], index))
                    if include_usage:
                        yield reply.usage_chunk()
                    yield "data: [DONE]\n\n"
                finally:
                    for job in jobs:  # a client that went away frees its rows at the next step
                        job.cancelled = True

            return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        finished = 0
        try:
            while finished < options["n"]:
                index, event = await events.get()
                if "error" in event:
                    error = event["error"]
                    raise RequestError(f"generation failed: {type(error).__name__}: {error}", status=500)
                if "finish_reason" in event:
                    finished += 1
                    reply.finish(index, event["finish_reason"])
                else:
                    reply.add(index, event)
        finally:
            for job in jobs:
                job.cancelled = True
        return reply.whole()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    return app


class _Reply:
    """One request's answer in OpenAI's shapes, as events arrive."""

    def __init__(self, engine, options: dict, chat: bool, model: str):
        self.engine, self.options, self.chat, self.model = engine, options, chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.texts = [""] * options["n"]
        self.ids = [[] for _ in range(options["n"])]
        self.entries = [[] for _ in range(options["n"])]
        self.finish_reasons = [None] * options["n"]
        self.offsets = [0] * options["n"]

    def add(self, index: int, event: dict) -> None:
        self.texts[index] += event["text"]
        self.ids[index] += event["tokens"]
        self.entries[index] += event["entries"]

    def finish(self, index: int, reason: str) -> None:
        self.finish_reasons[index] = reason

    def usage(self) -> dict:
        prompt, completion = len(self.options["prompt_ids"]), sum(len(i) for i in self.ids)
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def logprobs(self, entries: list[dict], index: int):
        """OpenAI's logprobs object for these tokens (None when the request asked for none)."""
        top = self.options["logprobs"]
        if top is None:
            return None
        piece = self.engine.tokens.decode
        if self.chat:
            def item(token, logprob):
                text = piece([token])
                return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

            return {"content": [{**item(e["token"], e["logprob"]),
                                 "top_logprobs": [item(t, lp) for t, lp in e["top"][:top]]} for e in entries]}
        tokens = [piece([e["token"]]) for e in entries]
        offsets = []
        for text in tokens:
            offsets.append(self.offsets[index])
            self.offsets[index] += len(text)
        return {"tokens": tokens, "token_logprobs": [e["logprob"] for e in entries],
                "top_logprobs": [{piece([t]): lp for t, lp in e["top"][:top]} for e in entries] if top else None,
                "text_offset": offsets}

    def whole(self) -> dict:
        choices = []
        for index in range(self.options["n"]):
            self.offsets[index] = 0
            logprobs = self.logprobs(self.entries[index], index)
            if self.chat:
                choices.append({"index": index, "message": {"role": "assistant", "content": self.texts[index]},
                                "logprobs": logprobs, "finish_reason": self.finish_reasons[index]})
            else:
                choices.append({"index": index, "text": self.texts[index], "logprobs": logprobs,
                                "finish_reason": self.finish_reasons[index]})
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self.usage()}

    def _event(self, payload: dict) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    def chunk(self, index: int, delta_or_text, finish=None, logprobs=None) -> str:
        key = "delta" if self.chat else "text"
        choice = {"index": index, key: delta_or_text, "logprobs": logprobs, "finish_reason": finish}
        return self._event({"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                            "created": self.created, "model": self.model, "choices": [choice]})

    def usage_chunk(self) -> str:
        return self._event({"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                            "created": self.created, "model": self.model, "choices": [], "usage": self.usage()})

    def error_chunk(self, error) -> str:
        return self._event(RequestError(f"generation failed: {type(error).__name__}: {error}", status=500).body())


class Server:
    """uvicorn serving make_app(engine) on a socket bound at construction (port 0: any free port),
    with http.server's method names: serve_forever() on some thread, shutdown() from another (it
    waits until serving stops), server_close(); server_address is (host, port)."""

    def __init__(self, engine, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, log_level: str = "warning",
                 **app_options):
        import uvicorn

        self.socket = listen_socket(host, port)
        self.server_address = self.socket.getsockname()[:2]
        self._uvicorn = uvicorn.Server(uvicorn.Config(make_app(engine, **app_options), log_level=log_level,
                                                      access_log=log_level == "info"))
        self._stopped = threading.Event()

    @property
    def started(self) -> bool:
        return self._uvicorn.started

    def serve_forever(self) -> None:
        try:
            self._uvicorn.run(sockets=[self.socket])
        finally:
            self._stopped.set()

    def shutdown(self, timeout: float = 30.0) -> None:
        self._uvicorn.should_exit = True
        self._stopped.wait(timeout)

    def server_close(self) -> None:
        self.socket.close()


def make_server(engine, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, quiet: bool = True, **app_options) -> Server:
    """A Server for `engine` (quiet: no access log)."""
    return Server(engine, host, port, log_level="warning" if quiet else "info", **app_options)


def start_server(engine, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, **app_options) -> tuple[Server, str]:
    """make_server, serving on a daemon thread once this returns; returns (server, base URL).
    Stop it with server.shutdown() and server.server_close()."""
    server = make_server(engine, host, port, **app_options)
    thread = threading.Thread(target=server.serve_forever, name="kerasft-http", daemon=True)
    thread.start()
    while not server.started and thread.is_alive():
        time.sleep(0.01)
    return server, "http://%s:%d" % server.server_address


def listen_socket(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port (a one-line KerasftError if it cannot bind)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as error:
        sock.close()
        raise KerasftError(f"serve: cannot listen on {host}:{port} ({error.strerror or error})") from None
    sock.listen(128)
    sock.set_inheritable(True)
    return sock
