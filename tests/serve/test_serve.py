"""The OpenAI-style server on a tiny preset, over real HTTP on 127.0.0.1 (uvicorn): the `openai`
client for completions, chat, streaming, sampling and logprobs; urllib for the 4xx cases; two
LoRA adapters over the one base, checked against the adapter models' own logits; concurrent
clients decoded together and answered exactly as when they come one at a time."""

import json
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest

from kerasft.serve import load_engine, start_server

CONTEXT, MAX_TOKENS, KEY = 128, 48, "sekret-key"


def _save_adapter(preset, folder, rank, alpha, targets, value):
    from kerasft.config import LoraConfig, ModelConfig
    from kerasft.models.lora import apply_lora, lora_layers, save_adapter
    from kerasft.models.presets import load_model

    loaded = load_model(ModelConfig(preset=str(preset)))
    apply_lora(loaded.backbone, LoraConfig(rank=rank, alpha=alpha, targets=targets))
    rng = np.random.default_rng(rank)
    for layer in lora_layers(loaded.backbone):
        layer.lora_kernel_b.assign(rng.normal(0, value, layer.lora_kernel_b.shape).astype("float32"))
    save_adapter(loaded.backbone, LoraConfig(rank=rank, alpha=alpha, targets=targets), folder, base_model=str(preset))
    return loaded.backbone


@pytest.fixture(scope="module")
def adapters(tiny_preset, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {"alpha": (root / "a", _save_adapter(tiny_preset, root / "a", 2, 4.0, ("query", "value"), 0.5)),
            "beta": (root / "b", _save_adapter(tiny_preset, root / "b", 4, 4.0, ("query",), 0.8))}


@pytest.fixture(scope="module")
def server(tiny_preset, adapters):
    engine = load_engine(str(tiny_preset), adapters={name: str(folder) for name, (folder, _) in adapters.items()},
                         max_batch=4, max_tokens_limit=MAX_TOKENS, context_length=CONTEXT, max_seq_len=CONTEXT)
    httpd, url = start_server(engine, "127.0.0.1", 0, api_key=KEY, max_body_bytes=4096)
    yield engine, url
    httpd.shutdown()
    httpd.server_close()
    engine.close()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server[1] + "/v1", api_key=KEY, max_retries=0, timeout=120)


def _reference(engine, prompt_ids, max_tokens):
    """Greedy decoding of one prompt through generate_ids (the decode loop, no server). It decodes
    MAX_TOKENS and keeps the first `max_tokens` (greedy prefixes agree): fewer compiled shapes."""
    from kerasft.evaluate.generate import generate_ids

    outputs, _ = generate_ids(engine.causal_lm, [prompt_ids], MAX_TOKENS, 1, engine.tokens.stop_ids)
    return engine.tokens.decode(outputs[0][:max_tokens]), outputs[0][:max_tokens]


def _post(url, payload, raw=None, key=KEY, headers=()):
    data = raw if raw is not None else json.dumps(payload).encode()
    return _request(url, data, key, {"Content-Type": "application/json", **dict(headers)}, timeout=120)


def _get(url, key=KEY, headers=()):
    return _request(url, None, key, dict(headers), timeout=30)


def _request(url, data, key, headers, timeout):
    """(status, JSON body, headers) of a request, an HTTP error's too."""
    request = urllib.request.Request(url, data=data, headers=headers)
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.status, json.loads(response.read()), response.headers
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read()), error.headers


def test_health_models_key_and_no_cors(server):
    engine, url = server
    assert _get(url + "/health", key=None)[1]["status"] == "ok"  # health needs no key
    status, models, headers = _get(url + "/v1/models", headers={"Origin": "http://evil.example"})
    assert status == 200 and [m["id"] for m in models["data"]] == [engine.model_id, "alpha", "beta"]
    assert "access-control-allow-origin" not in {k.lower() for k in headers}  # CORS is off by default
    for key, message in ((None, "missing API key"), ("wrong", "incorrect API key")):
        status, body, _ = _post(url + "/v1/completions", {"prompt": "hola"}, key=key)
        assert status == 401 and message in body["error"]["message"] and body["error"]["code"] == "invalid_api_key"
        assert _get(url + "/v1/models", key=key)[0] == 401


def test_cors_only_for_the_allowed_origin(server):
    from fastapi.testclient import TestClient

    from kerasft.serve import make_app

    client = TestClient(make_app(server[0], cors_origins=["http://studio.local"]))
    allowed = client.get("/health", headers={"Origin": "http://studio.local"})
    assert allowed.headers["access-control-allow-origin"] == "http://studio.local"
    assert "access-control-allow-origin" not in client.get("/health", headers={"Origin": "http://other"}).headers


def test_completion_is_greedy_generation(server, client):
    engine, _ = server
    reply = client.completions.create(model=engine.model_id, prompt="La capital de España", max_tokens=12)
    prompt_ids = [engine.tokens.bos] + engine.tokens.encode("La capital de España")
    text, ids = _reference(engine, prompt_ids, 12)
    assert reply.choices[0].text == text
    assert reply.usage.completion_tokens == len(ids) and reply.usage.prompt_tokens == len(prompt_ids)
    assert reply.choices[0].finish_reason == ("length" if len(ids) == 12 else "stop")


def test_chat_renders_the_training_template(server, client):
    from kerasft.data.template import encode_prompt

    engine, _ = server
    messages = [
        {"role": "system", "content": "Sé breve."},
        {"role": "user", "content": "¿Dónde está Zaragoza?"},
        {"role": "assistant", "content": "En Aragón."},
        {"role": "user", "content": [{"type": "text", "text": "¿Y Sevilla?"}]},
    ]
    reply = client.chat.completions.create(model=engine.model_id, messages=messages, max_tokens=20)
    prompt_ids = encode_prompt(engine.tokens, "¿Y Sevilla?", "Sé breve.", [("¿Dónde está Zaragoza?", "En Aragón.")])
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == _reference(engine, prompt_ids, 20)[0]
    assert reply.usage.prompt_tokens == len(prompt_ids)


def test_streaming_sends_tokens_as_they_are_decoded(server, client):
    engine, _ = server
    messages = [{"role": "user", "content": "Hola, ¿cómo estás?"}]
    plain = client.chat.completions.create(model=engine.model_id, messages=messages, max_tokens=MAX_TOKENS)
    steps_at_first = None
    chunks = []
    for chunk in client.chat.completions.create(model=engine.model_id, messages=messages, max_tokens=MAX_TOKENS,
                                                stream=True, stream_options={"include_usage": True}):
        if steps_at_first is None and chunk.choices and chunk.choices[0].delta.content:
            steps_at_first = engine.stats["batches"]
        chunks.append(chunk)
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == plain.choices[0].message.content
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1  # token by token
    assert chunks[-2].choices[0].finish_reason == plain.choices[0].finish_reason
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens
    # The first token reached the client before the decode loop had produced the rest.
    assert steps_at_first is not None and engine.stats["batches"] > steps_at_first

    completion = client.completions.create(model=engine.model_id, prompt="The quick brown", max_tokens=10)
    pieces = list(client.completions.create(model=engine.model_id, prompt="The quick brown", max_tokens=10,
                                            stream=True))
    assert "".join(p.choices[0].text for p in pieces) == completion.choices[0].text
    assert pieces[-1].choices[0].finish_reason == completion.choices[0].finish_reason


def test_stop_strings_cut_the_reply_also_when_streamed(server, client):
    engine, _ = server
    full = client.completions.create(model=engine.model_id, prompt="El río", max_tokens=16).choices[0].text
    assert len(full) > 3
    stop = full[2:4]
    reply = client.completions.create(model=engine.model_id, prompt="El río", max_tokens=16, stop=[stop])
    assert reply.choices[0].text == full[: full.find(stop)] and reply.choices[0].finish_reason == "stop"
    pieces = list(client.completions.create(model=engine.model_id, prompt="El río", max_tokens=16, stop=[stop],
                                            stream=True))
    assert "".join(p.choices[0].text for p in pieces) == reply.choices[0].text


def test_sampling_seed_n_top_k_and_logprobs(server, client):
    engine, _ = server
    ask = dict(model=engine.model_id, prompt="Hola", max_tokens=12)
    hot = dict(ask, temperature=1.5, top_p=0.95, seed=11)
    first = client.completions.create(**hot, n=2)
    assert len(first.choices) == 2 and first.choices[0].text != first.choices[1].text  # n draws differ
    again = client.completions.create(**hot, n=2)
    assert [c.text for c in again.choices] == [c.text for c in first.choices]  # same seed, same tokens
    assert client.completions.create(**dict(hot, seed=12)).choices[0].text != first.choices[0].text
    greedy = client.completions.create(**ask).choices[0].text
    assert client.completions.create(**dict(ask, temperature=1.8, seed=3), extra_body={"top_k": 1}).choices[0].text == greedy

    reply = client.chat.completions.create(model=engine.model_id, messages=[{"role": "user", "content": "Hola"}],
                                           max_tokens=6, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens and all(len(t.top_logprobs) == 3 for t in content)
    for token in content:  # greedy: the chosen token is the most likely one
        assert token.logprob == pytest.approx(token.top_logprobs[0].logprob) and token.logprob <= 0
        assert token.top_logprobs[0].logprob >= token.top_logprobs[1].logprob >= token.top_logprobs[2].logprob
    assert "".join(t.token for t in content) == reply.choices[0].message.content
    completion = client.completions.create(**ask, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert "".join(logprobs.tokens) == completion.choices[0].text and len(logprobs.top_logprobs[0]) == 2
    assert logprobs.text_offset[0] == 0 and logprobs.token_logprobs[0] == pytest.approx(max(logprobs.top_logprobs[0].values()))


def test_adapters_share_a_batch_and_match_their_own_models(server, adapters, client):
    """Each adapter's served distribution equals its own LoRA model's logits, for the first token
    (prefill) and the second (the batched step), with the three models decoding side by side."""
    from kerasft.export.hf import keras_logits

    engine, url = server
    prompt_ids = [engine.tokens.bos] + engine.tokens.encode("El río Ebro")
    results = {}

    def ask(model):
        results[model] = _post(url + "/v1/completions", {"model": model, "prompt": "El río Ebro", "max_tokens": 2,
                                                         "logprobs": 5})[1]

    steps_before = len(engine.stats["batch_sizes"])
    threads = [threading.Thread(target=ask, args=(m,)) for m in ("alpha", "beta", engine.model_id)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    answers = {}
    for name, (_, backbone) in adapters.items():
        served = results[name]["choices"][0]["logprobs"]["token_logprobs"]
        ids = list(prompt_ids)
        for k in range(2):  # greedy: each token is the argmax of the adapter model's own logits
            logits = keras_logits(backbone, np.array([ids]))[0, -1].astype(np.float64)
            log_probs = logits - logits.max() - np.log(np.exp(logits - logits.max()).sum())
            assert served[k] == pytest.approx(log_probs.max(), abs=2e-3)
            ids.append(int(log_probs.argmax()))
        answers[name] = (ids, served)
    assert answers["alpha"] != answers["beta"]
    assert results[engine.model_id]["choices"][0]["logprobs"]["token_logprobs"] != answers["alpha"][1]
    assert all(results[m]["choices"][0]["finish_reason"] for m in results)
    status, body, _ = _post(url + "/v1/completions", {"model": "gamma", "prompt": "x"})
    assert status == 404 and body["error"]["code"] == "model_not_found" and "alpha, beta" in body["error"]["message"]
    assert max(engine.stats["batch_sizes"][steps_before:], default=0) >= 1


@pytest.mark.parametrize("route, payload, status, message, code", [
    ("/v1/chat/completions", None, 400, "not valid JSON", "invalid_json"),
    ("/v1/chat/completions", {"model": "m"}, 400, "you must provide messages", "missing_required_parameter"),
    ("/v1/completions", {"model": "m"}, 400, "you must provide a prompt", "missing_required_parameter"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "'wizard' is not one of", None),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "content": "hi"}]}, 400, "alternating", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": 3}]}, 400, "must be a string", None),
    ("/v1/completions", {"prompt": "hola", "max_tokens": MAX_TOKENS + 1}, 400, "more than this server allows", None),
    ("/v1/completions", {"prompt": "hola", "max_tokens": 0}, 400, "positive integer", None),
    ("/v1/completions", {"prompt": "hola " * 200}, 400, "context is 128 tokens", "context_length_exceeded"),
    ("/v1/completions", {"prompt": "hola " * 30, "max_tokens": MAX_TOKENS}, 400, "exceeds this server's 128 tokens",
     "context_length_exceeded"),
    ("/v1/completions", {"prompt": "hola", "temperature": 3}, 400, "temperature must be a number from 0 to 2", None),
    ("/v1/completions", {"prompt": "hola", "n": 9}, 400, "n must be an integer from 1 to 8", None),
    ("/v1/completions", {"prompt": "hola", "seed": "x"}, 400, "seed must be an integer", None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "top_logprobs": 2}, 400,
     "top_logprobs needs logprobs", None),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "one prompt per request", None),
    ("/v1/completions", {"prompt": "x" * 5000}, 413, "limit", "request_too_large"),
    ("/v1/embeddings", {"input": "x"}, 404, "no route", "not_found"),
])
def test_bad_requests_get_openai_errors(server, route, payload, status, message, code):
    _, url = server
    got, body, _ = _post(url + route, payload, raw=b"{not json" if payload is None else None)
    assert got == status
    error = body["error"]
    assert message in error["message"] and error["code"] == code
    assert error["type"] == "invalid_request_error" and set(error) == {"message", "type", "param", "code"}


def test_a_request_joins_the_running_batch(server, client):
    """Requests arriving while another decodes join it at the next step (continuous batching)
    and get exactly the answers they get alone."""
    engine, _ = server
    prompts = ["Hola", "¿Cuál es la capital de Francia?", "El niño comió", "Answer the question"]
    alone = [client.completions.create(model=engine.model_id, prompt=p, max_tokens=16).choices[0].text for p in prompts]
    steps_before = len(engine.stats["batch_sizes"])
    results = [None] * len(prompts)

    def ask(index):
        results[index] = client.completions.create(model=engine.model_id, prompt=prompts[index],
                                                   max_tokens=16).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
        time.sleep(0.01)
    for thread in threads:
        thread.join(timeout=120)
    assert results == alone
    assert max(engine.stats["batch_sizes"][steps_before:]) > 1  # they shared decode steps


def test_serves_a_hugging_face_export(server, tiny_preset, tmp_path):
    from kerasft.config import ModelConfig
    from kerasft.export.hf import export_hf
    from kerasft.models.presets import load_model

    loaded = load_model(ModelConfig(preset=str(tiny_preset)))
    out = export_hf(loaded.backbone, loaded.tokenizer, tmp_path / "hf")
    from_export = load_engine(str(out), max_tokens_limit=16, max_batch=1)
    try:
        assert from_export.model_id == "hf" and from_export.context_length == 32768
        assert from_export.max_seq_len == 1024
        request = {"prompt_ids": [2, 17, 40], "max_tokens": 16, "stop": []}
        assert from_export.generate(**request) == server[0].generate(**request)
    finally:
        from_export.close()


def test_cli_defaults_loopback_and_parses_adapters(tmp_path):
    from kerasft.cli import _parser
    from kerasft.errors import KerasftError
    from kerasft.serve import parse_adapters

    args = _parser().parse_args(["serve", "somewhere", "--adapter", "a=runs/a", "--adapter", "b=runs/b"])
    assert (args.host, args.port, args.api_key, args.cors_origin) == ("127.0.0.1", 8000, None, [])
    assert parse_adapters(args.adapter) == {"a": "runs/a", "b": "runs/b"}
    with pytest.raises(KerasftError, match="expected NAME=RUN_DIR"):
        parse_adapters(["nameless"])


def test_serves_a_run_dir_with_its_adapter_and_system_prompt(tiny_preset, tmp_path):
    from kerasft.config import DataConfig, LoraConfig, ModelConfig, RunConfig, save_config
    from kerasft.data.template import encode_prompt
    from kerasft.export.hf import keras_logits
    from kerasft.models.lora import apply_lora, lora_layers, save_adapter
    from kerasft.models.presets import load_model

    run_dir = tmp_path / "run"
    lora = LoraConfig(rank=2, alpha=4.0, targets=("query",))
    cfg = RunConfig(model=ModelConfig(preset=str(tiny_preset)), lora=lora, data=DataConfig(system="Sé breve."))
    run_dir.mkdir()
    save_config(cfg, run_dir / "config.yaml")
    loaded = load_model(cfg.model)
    tokens = np.array([[2, 5, 17, 40, 41]], dtype=np.int32)
    base_logits = keras_logits(loaded.backbone, tokens)
    apply_lora(loaded.backbone, lora)
    for layer in lora_layers(loaded.backbone):
        layer.lora_kernel_b.assign(np.full(layer.lora_kernel_b.shape, 0.3, "float32"))
    save_adapter(loaded.backbone, lora, run_dir / "adapter", base_model=str(tiny_preset))

    engine = load_engine(str(run_dir), max_tokens_limit=8, max_batch=1)
    try:
        assert engine.model_id == "run" and engine.system == "Sé breve."
        served = keras_logits(engine.causal_lm.backbone, tokens)
        np.testing.assert_allclose(served, keras_logits(loaded.backbone, tokens), atol=1e-5)
        assert np.abs(served - base_logits).max() > 1e-2  # the adapter is on
        request = engine.chat({"messages": [{"role": "user", "content": "Hola"}]})
        assert request["prompt_ids"] == encode_prompt(engine.tokens, "Hola", "Sé breve.")
    finally:
        engine.close()
