"""The OpenAI-style server on a tiny preset, over real HTTP on 127.0.0.1: the `openai` client for
completions, chat and streaming; urllib for the 4xx cases; concurrent clients batched together
and answered exactly as when they come one at a time."""

import json
import threading
import urllib.error
import urllib.request

import pytest

from kerasft.serve import Engine, load_engine, make_server

CONTEXT, MAX_TOKENS = 128, 48


@pytest.fixture(scope="module")
def server(tiny_preset):
    engine = load_engine(str(tiny_preset), max_batch=4, batch_window_s=0.2, max_tokens_limit=MAX_TOKENS,
                         context_length=CONTEXT)
    httpd = make_server(engine, "127.0.0.1", 0, quiet=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    host, port = httpd.server_address[:2]
    yield engine, f"http://{host}:{port}"
    httpd.shutdown()
    httpd.server_close()
    engine.close()


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=server[1] + "/v1", api_key="unused", max_retries=0, timeout=120)


def _reference(engine, prompt_ids, max_tokens):
    """What greedy decoding gives for one prompt, straight from generate_ids (no server). It decodes
    16 tokens and keeps the first `max_tokens` (greedy prefixes agree), so it reuses the
    server's compiled shape instead of compiling its own."""
    from kerasft.evaluate.generate import generate_ids

    outputs, _ = generate_ids(engine.causal_lm, [prompt_ids], 16 * -(-max_tokens // 16), 1, engine.tokens.stop_ids,
                              engine.tokens.pad)
    return engine.tokens.decode(outputs[0][:max_tokens]), outputs[0][:max_tokens]


def _post(url, payload, raw=None):
    data = raw if raw is not None else json.dumps(payload).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_health_and_models(server):
    engine, url = server
    with urllib.request.urlopen(url + "/health", timeout=10) as response:
        assert json.loads(response.read())["status"] == "ok"
    with urllib.request.urlopen(url + "/v1/models", timeout=10) as response:
        models = json.loads(response.read())
    assert models["object"] == "list" and models["data"][0]["id"] == engine.model_id


def test_completion_is_greedy_generation(server, client):
    engine, _ = server
    reply = client.completions.create(model=engine.model_id, prompt="La capital de España", max_tokens=12)
    text, ids = _reference(engine, [engine.tokens.bos] + engine.tokens.encode("La capital de España"), 12)
    assert reply.choices[0].text == text
    assert reply.usage.completion_tokens == len(ids) and reply.usage.prompt_tokens == 1 + len(
        engine.tokens.encode("La capital de España"))
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
    text, _ = _reference(engine, prompt_ids, 20)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == text
    assert reply.usage.prompt_tokens == len(prompt_ids)


def test_streaming_matches_the_plain_reply(server, client):
    engine, _ = server
    messages = [{"role": "user", "content": "Hola, ¿cómo estás?"}]
    plain = client.chat.completions.create(model=engine.model_id, messages=messages, max_tokens=24)
    chunks = list(client.chat.completions.create(model=engine.model_id, messages=messages, max_tokens=24, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert streamed == plain.choices[0].message.content
    assert len([c for c in chunks if c.choices[0].delta.content]) > 1  # token by token, not one blob
    assert chunks[-1].choices[0].finish_reason == plain.choices[0].finish_reason

    completion = client.completions.create(model=engine.model_id, prompt="The quick brown", max_tokens=10)
    pieces = list(client.completions.create(model=engine.model_id, prompt="The quick brown", max_tokens=10,
                                            stream=True))
    assert "".join(p.choices[0].text for p in pieces) == completion.choices[0].text
    assert pieces[-1].choices[0].finish_reason == completion.choices[0].finish_reason


def test_stop_strings_cut_the_reply(server, client):
    engine, _ = server
    full = client.completions.create(model=engine.model_id, prompt="El río", max_tokens=16).choices[0].text
    assert len(full) > 3
    stop = full[2:4]
    reply = client.completions.create(model=engine.model_id, prompt="El río", max_tokens=16, stop=[stop])
    assert reply.choices[0].text == full[: full.find(stop)] and reply.choices[0].finish_reason == "stop"


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
    ("/v1/completions", {"prompt": "hola " * 30, "max_tokens": MAX_TOKENS}, 400, "exceeds this model's context",
     "context_length_exceeded"),
    ("/v1/completions", {"prompt": "hola", "temperature": 0.7}, 400, "decodes greedily", None),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "one prompt per request", None),
    ("/v1/embeddings", {"input": "x"}, 404, "no route", "not_found"),
])
def test_bad_requests_get_openai_errors(server, route, payload, status, message, code):
    _, url = server
    got, body = _post(url + route, payload, raw=b"{not json" if payload is None else None)
    assert got == status
    error = body["error"]
    assert message in error["message"] and error["code"] == code
    assert error["type"] == "invalid_request_error" and set(error) == {"message", "type", "param", "code"}


def test_concurrent_requests_are_batched_and_equal_sequential_answers(server, client):
    engine, _ = server
    prompts = ["Hola", "¿Cuál es la capital de Francia?", "El niño comió", "Answer the question"]
    sequential = [client.completions.create(model="m", prompt=p, max_tokens=16).choices[0].text for p in prompts]
    batches_before = len(engine.stats["batch_sizes"])
    results = [None] * len(prompts)

    def ask(index):
        results[index] = client.completions.create(model="m", prompt=prompts[index], max_tokens=16).choices[0].text

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(prompts))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert results == sequential
    assert max(engine.stats["batch_sizes"][batches_before:]) > 1  # they shared a decode


def test_serves_a_hugging_face_export(tiny_preset, tmp_path):
    from kerasft.export.hf import export_hf
    from kerasft.models.presets import load_model
    from kerasft.config import ModelConfig

    loaded = load_model(ModelConfig(preset=str(tiny_preset)))
    out = export_hf(loaded.backbone, loaded.tokenizer, tmp_path / "hf")
    from_export = load_engine(str(out), max_tokens_limit=16)
    from_preset = Engine(loaded, model_id="preset", max_tokens_limit=16)
    try:
        request = from_export.completion({"prompt": "Hola", "max_tokens": 16})
        assert from_export.model_id == "hf" and from_export.context_length == 32768
        assert from_export.generate(**request) == from_preset.generate(**from_preset.completion({"prompt": "Hola",
                                                                                                   "max_tokens": 16}))
    finally:
        from_export.close()
        from_preset.close()


def test_binds_loopback_by_default():
    from kerasft.cli import _parser

    args = _parser().parse_args(["serve", "somewhere"])
    assert (args.host, args.port) == ("127.0.0.1", 8000)


def test_serves_a_run_dir_with_its_adapter_and_system_prompt(tiny_preset, tmp_path):
    import numpy as np

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

    engine = load_engine(str(run_dir), max_tokens_limit=8)
    try:
        assert engine.model_id == "run" and engine.system == "Sé breve."
        served = keras_logits(engine.causal_lm.backbone, tokens)
        np.testing.assert_allclose(served, keras_logits(loaded.backbone, tokens), atol=1e-5)
        assert np.abs(served - base_logits).max() > 1e-2  # the adapter is on
        request = engine.chat({"messages": [{"role": "user", "content": "Hola"}]})
        assert request["prompt_ids"] == encode_prompt(engine.tokens, "Hola", "Sé breve.")
    finally:
        engine.close()
