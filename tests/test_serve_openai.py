"""The OpenAI-compatible server with the official ``openai`` client, on a real uvicorn server.

One server (tiny Llama, an API key) is started for the module on 127.0.0.1.  Answers are
checked against plain ``transformers`` greedy generation of the same chat prompt.
"""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from vistune.config import RunConfig
from vistune.inference.transformers_engine import TransformersEngine
from vistune.serving.app import create_app
from vistune.serving.server import ServerThread

MODEL = "tiny-llama"
KEY = "test-key-123"
MESSAGES = [
    {"role": "system", "content": "You answer in few words."},
    {"role": "user", "content": "What colour is the star?"},
]


@pytest.fixture(scope="module")
def server(tiny_llama):
    from vistune.plugins import get_plugin_manager

    config = RunConfig(task="serve", device="cpu", api_key=KEY, max_new_tokens=16)
    engine = TransformersEngine(str(tiny_llama), get_plugin_manager().registries.models.get("causal-lm"), config)
    thread = ServerThread(create_app(engine, config, model_name=MODEL)).start()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(tiny_llama):
    """Greedy ``generate`` of a conversation with plain transformers: (prompt ids, new ids, text)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()

    def generate(messages, max_new_tokens):
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)[
            "input_ids"
        ]
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)[
                0, len(ids) :
            ].tolist()
        eos = set(model.generation_config.eos_token_id)
        cut = next((i for i, t in enumerate(out) if t in eos), None)
        new = out if cut is None else out[: cut + 1]
        text = tokenizer.decode([t for t in new if t not in eos], skip_special_tokens=True)
        return ids, new, text

    return generate


def test_models_lists_the_served_model(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL]


def test_chat_completion_equals_transformers_greedy(client, reference):
    prompt_ids, new_ids, text = reference(MESSAGES, 12)
    answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0)
    choice = answer.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == text
    assert choice.finish_reason == ("length" if len(new_ids) == 12 else "stop")
    assert answer.usage.prompt_tokens == len(prompt_ids)
    assert answer.usage.completion_tokens == len(new_ids)
    assert answer.usage.total_tokens == len(prompt_ids) + len(new_ids)


def test_streaming_sends_the_same_text_and_ends_with_done(client, server, reference):
    _, new_ids, text = reference(MESSAGES, 12)
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=12, temperature=0, stream=True,
                                            stream_options={"include_usage": True})  # fmt: skip
    pieces, reasons, usage = [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert "".join(pieces) == text
    assert reasons[-1] in ("length", "stop") and all(r is None for r in reasons[:-1])
    assert usage.completion_tokens == len(new_ids)
    # the raw stream is server-sent events closed by [DONE]
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "stream": True}
    with httpx.stream(
        "POST", server.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"}
    ) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[0][6:])["object"] == "chat.completion.chunk"


def test_n_completions_with_a_seed_are_reproducible(client):
    kwargs = {"model": MODEL, "messages": MESSAGES, "max_tokens": 10, "temperature": 1.0, "n": 3, "seed": 42}
    first = client.chat.completions.create(**kwargs)
    second = client.chat.completions.create(**kwargs)
    assert [c.index for c in first.choices] == [0, 1, 2]
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]
    assert len({c.message.content for c in first.choices}) > 1
    other = client.chat.completions.create(**{**kwargs, "seed": 43})
    assert [c.message.content for c in other.choices] != [c.message.content for c in first.choices]
    assert first.usage == second.usage and 3 <= first.usage.completion_tokens <= 30


def test_n_streamed_completions(client):
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=1.0, n=2, seed=5,
                                            stream=True)  # fmt: skip
    texts = {0: "", 1: ""}
    for chunk in stream:
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
    whole = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=6, temperature=1.0, n=2, seed=5)
    assert texts == {c.index: c.message.content for c in whole.choices}


def test_stop_string_ends_the_answer(client, reference):
    _, _, text = reference(MESSAGES, 16)
    words = [w for w in text.split(" ") if len(w) >= 2]
    stop = words[len(words) // 2]
    answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=16, temperature=0, stop=[stop])
    assert answer.choices[0].message.content == text[: text.index(stop)]
    assert answer.choices[0].finish_reason == "stop"


def test_text_completions_with_several_prompts(client, tiny_llama):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    prompts = ["a red circle", "There is a blue square next to a"]
    answer = client.completions.create(model=MODEL, prompt=prompts, max_tokens=6, temperature=0)
    assert [c.index for c in answer.choices] == [0, 1]
    for prompt, choice in zip(prompts, answer.choices):
        ids = tokenizer(prompt)["input_ids"]
        with torch.inference_mode():
            out = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False)[0, len(ids) :].tolist()
        eos = set(model.generation_config.eos_token_id)
        out = out[: next((i for i, t in enumerate(out) if t in eos), len(out))]
        assert choice.text == tokenizer.decode(out, skip_special_tokens=True)
    assert answer.usage.prompt_tokens == sum(len(tokenizer(p)["input_ids"]) for p in prompts)
    streamed = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=6, temperature=0, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == answer.choices[0].text


# -- authentication ----------------------------------------------------------------------


def test_api_key_is_required(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        response = httpx.get(server.url + "/v1/models", headers=headers)
        assert response.status_code == 401
        assert response.json()["error"]["code"] == "invalid_api_key"
    wrong = openai.OpenAI(base_url=server.url + "/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        wrong.chat.completions.create(model=MODEL, messages=MESSAGES)
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # probes need no key


def test_api_key_from_the_environment(monkeypatch):
    from vistune.serving.app import resolve_api_key

    monkeypatch.setenv("VISTUNE_API_KEY", "from-env")
    assert resolve_api_key(RunConfig(task="serve")) == "from-env"
    assert resolve_api_key(RunConfig(task="serve", api_key="from-config")) == "from-config"
    monkeypatch.delenv("VISTUNE_API_KEY")
    assert resolve_api_key(RunConfig(task="serve")) is None


# -- bad requests ------------------------------------------------------------------------


def _post(server, path, content, headers=None):
    return httpx.post(server.url + path, content=content, timeout=60,
                      headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **(headers or {})})  # fmt: skip


def _error(response, status):
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error


@pytest.mark.parametrize(
    "body, param",
    [
        ({"messages": MESSAGES, "max_tokens": "lots"}, "max_tokens"),
        ({"messages": MESSAGES, "max_tokens": 0}, "max_tokens"),
        ({"messages": MESSAGES, "temperature": "hot"}, "temperature"),
        ({"messages": MESSAGES, "temperature": 3}, "temperature"),
        ({"messages": MESSAGES, "top_p": 0}, "top_p"),
        ({"messages": MESSAGES, "n": 0}, "n"),
        ({"messages": MESSAGES, "seed": "x"}, "seed"),
        ({"messages": MESSAGES, "seed": 2**63}, "seed"),
        ({"messages": MESSAGES, "stream": "yes"}, "stream"),
        ({"messages": MESSAGES, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
        ({"messages": []}, "messages"),
        ({"messages": "hello"}, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
        ({"messages": [{"role": "user", "content": 42}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": [{"type": "video", "video": "x"}]}]}, "messages.0.content"),
        ({"messages": MESSAGES, "logprobs": True}, "logprobs"),
        ({"messages": MESSAGES, "tools": [{"type": "function"}]}, "tools"),
        ({}, "model"),
    ],
)
def test_invalid_fields_are_400_with_the_field_named(server, body, param):
    body = {"model": MODEL, **body} if body else {"messages": MESSAGES}
    error = _error(_post(server, "/v1/chat/completions", json.dumps(body)), 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] is not None and error["param"].startswith(param)


def test_malformed_json_and_non_object_bodies(server):
    for content in (b"{not json", b"", b"[1, 2]", b"\xff\xfe"):
        error = _error(_post(server, "/v1/chat/completions", content), 400)
        assert error["code"] == "invalid_json"


def test_largest_seed_is_served(client):
    kwargs = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "temperature": 1.0, "n": 2, "seed": 2**63 - 1}
    first, second = (client.chat.completions.create(**kwargs) for _ in range(2))
    assert [c.message.content for c in first.choices] == [c.message.content for c in second.choices]


def test_too_many_prompts_in_one_completion_request(server):
    from vistune.serving.schemas import MAX_PROMPTS

    body = {"model": MODEL, "prompt": ["a red circle"] * (MAX_PROMPTS + 1), "max_tokens": 1}
    error = _error(_post(server, "/v1/completions", json.dumps(body)), 400)
    assert error["param"] == "prompt" and str(MAX_PROMPTS) in error["message"]


def test_oversized_bodies_are_413_before_they_are_read(server, monkeypatch):
    import socket

    from vistune.serving import schemas

    # A declared length over the limit is refused at once: the 100 MB are never sent.
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {server.host}\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {100 * 1024 * 1024}\r\n\r\n{{\"model\": ")  # fmt: skip
    answer = b""
    with socket.create_connection((server.host, server.port), timeout=20) as sock:
        sock.sendall(head.encode())
        while b"}}" not in answer and (data := sock.recv(65536)):  # the status line and the JSON body
            answer += data
    answer = answer.decode()
    assert answer.startswith("HTTP/1.1 413"), answer
    assert '"code":"request_too_large"' in answer
    # A chunked body (no length declared) is cut off once it passes the limit.
    monkeypatch.setattr(schemas, "MAX_BODY_BYTES", 1000)
    chunks = (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 2000}]}).encode(),)
    error = _error(_post(server, "/v1/chat/completions", iter(chunks)), 413)
    assert error["code"] == "request_too_large"


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as info:
        client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert info.value.body["code"] == "model_not_found"


def test_prompt_longer_than_the_context_and_too_many_tokens(client):
    long_text = " ".join(["red circle"] * 1500)
    with pytest.raises(openai.BadRequestError) as too_long:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long_text}], max_tokens=4)
    assert too_long.value.body["code"] == "context_length_exceeded"
    with pytest.raises(openai.BadRequestError) as too_many:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=100_000)
    assert too_many.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):  # streaming requests are refused before the stream starts
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=100_000, stream=True)


def test_one_refused_prompt_among_several_is_400(server):
    """A prompt refused while the request's other prompt is being encoded: 400, not an internal error."""
    body = {"model": MODEL, "prompt": ["a red circle", " ".join(["red circle"] * 1500)], "max_tokens": 4}
    for stream in (False, True):
        error = _error(_post(server, "/v1/completions", json.dumps({**body, "stream": stream})), 400)
        assert error["code"] == "context_length_exceeded"


def test_images_sent_to_a_text_model_are_refused(client):
    import base64
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buffer, format="PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    content = [{"type": "text", "text": "what is this?"}, {"type": "image_url", "image_url": {"url": url}}]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}])
    assert "text model" in info.value.body["message"]


def test_unknown_routes_and_methods_answer_in_the_error_shape(server):
    _error(httpx.get(server.url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"}), 404)
    _error(httpx.get(server.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {KEY}"}), 405)


def test_the_server_keeps_serving_after_bad_requests(client):
    answer = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=3)
    assert answer.usage.completion_tokens >= 1


def test_a_prompt_refused_after_another_prompt_streamed_its_first_token_is_still_an_error_before_answering():
    """The request's answer starts only once every prompt has its first event (or its error)."""
    import asyncio

    from vistune.errors import VistuneError
    from vistune.inference.engine import StreamEvent
    from vistune.serving.app import _Generation

    class Engine:
        async def stream(self, request):
            if request == "long":
                await asyncio.sleep(0.05)  # refused after the other prompt's first token is out
                raise VistuneError("the prompt is too long")
            yield StreamEvent(0, "a")
            await asyncio.sleep(0.5)
            yield StreamEvent(0, "b", finish_reason="length")

    async def started(requests):
        return await _Generation.start(Engine(), requests)

    async def texts(requests):
        return [event.text async for _, event in await started(requests)]

    with pytest.raises(VistuneError, match="too long"):  # from start: before any status line is sent
        asyncio.run(started(["short", "long"]))
    assert asyncio.run(texts(["short", "short"])) == ["a", "a", "b", "b"]
