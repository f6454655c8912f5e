"""`kerasft serve`: an OpenAI-style HTTP server (FastAPI + uvicorn) over kerasft's decode loop.

engine.py: request validation, sampling options, adapters and the continuous-batching worker;
app.py: the ASGI routes and their JSON / server-sent-event shapes.
"""

from __future__ import annotations

import os
from pathlib import Path

from kerasft.errors import KerasftError
from kerasft.serve.app import DEFAULT_HOST, DEFAULT_PORT, MAX_BODY_BYTES, Server, make_app, make_server, start_server
from kerasft.serve.engine import Engine, RequestError

__all__ = ["DEFAULT_HOST", "DEFAULT_PORT", "MAX_BODY_BYTES", "Engine", "RequestError", "Server", "load_engine",
           "make_app", "make_server", "parse_adapters", "serve", "start_server"]


def parse_adapters(specs) -> dict:
    """{name: adapter folder} from NAME=RUN_DIR strings (a run dir or its adapter/ folder)."""
    from kerasft.paths import RunDir

    adapters = {}
    for spec in specs or ():
        name, sep, folder = spec.partition("=")
        if not sep or not name or not folder:
            raise KerasftError(f"serve --adapter {spec!r}: expected NAME=RUN_DIR")
        if name in adapters:
            raise KerasftError(f"serve --adapter: the name {name!r} is given twice")
        run = RunDir(folder)
        adapters[name] = str(run.adapter) if run.has_adapter else folder
    return adapters


def load_engine(source: str, adapters=None, **options) -> Engine:
    """An Engine for a run dir (base + adapter), a keras-hub preset dir, a Hugging Face export
    dir, a .gguf file or any preset string kerasft's loader takes, plus named adapters over it
    ({name: folder} or NAME=RUN_DIR strings)."""
    from kerasft.models.presets import load_source
    from kerasft.runtime import init_backend

    if adapters is not None and not isinstance(adapters, dict):
        adapters = parse_adapters(adapters)
    init_backend()
    loaded, cfg = load_source(source)
    data = cfg.data if cfg else None
    model_id = Path(source).name if Path(source).exists() else source
    return Engine(loaded, model_id=model_id, template=getattr(data, "template", "auto"),
                  system=getattr(data, "system", ""), adapters=adapters, **options)


def serve(source: str, host: str = DEFAULT_HOST, port: int = DEFAULT_PORT, *, api_key: str | None = None,
          cors_origins=(), max_body_bytes: int = MAX_BODY_BYTES, **options) -> None:
    """Loads the model and serves it until interrupted (Ctrl-C or SIGTERM).

    api_key: defaults to $KERASFT_API_KEY; empty means no key is asked for.
    """
    from kerasft.serve.app import listen_socket

    api_key = api_key if api_key is not None else os.environ.get("KERASFT_API_KEY") or None
    listen_socket(host, port).close()  # a taken port fails now, not after minutes of loading
    engine = load_engine(source, **options)
    server = make_server(engine, host, port, quiet=False, api_key=api_key, cors_origins=cors_origins,
                         max_body_bytes=max_body_bytes)
    print(f"serving {', '.join(engine.model_ids)} on http://{server.server_address[0]}:{server.server_address[1]}/v1 "
          f"(max batch {engine.max_batch}, {engine.max_seq_len} tokens per request, "
          f"{'API key required' if api_key else 'no API key'}); Ctrl-C stops", flush=True)
    try:
        server.serve_forever()  # uvicorn stops on Ctrl-C and SIGTERM
    finally:
        server.server_close()
        engine.close()
