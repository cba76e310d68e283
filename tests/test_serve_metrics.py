"""``GET /metrics``: the server's and the engine's counters in the Prometheus text format.

The text is checked with a strict reader of the exposition format (every sample has its
``# HELP`` and ``# TYPE``, names and values are well formed), against a real server on
the tiny Llama and against an engine that keeps no stats.
"""

from __future__ import annotations

import base64
import io
import math
import re

import pytest

httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")

from vistune.config import RunConfig
from vistune.serving.app import create_app
from vistune.serving.prometheus import Metric, engine_metrics, render

MODEL = "tiny"
KEY = "metrics-key"
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*) (\S+)$")


def parse(text: str) -> dict[str, tuple[str, float]]:
    """``{name: (type, value)}`` of exposition text; fails on anything the format does not allow."""
    assert text.endswith("\n")
    helps, types, samples = set(), {}, {}
    for line in text.splitlines():
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert help_text and name not in helps, line
            helps.add(name)
        elif line.startswith("# TYPE "):
            name, _, kind = line[7:].partition(" ")
            assert kind in ("counter", "gauge") and name not in types, line
            types[name] = kind
        else:
            match = SAMPLE.match(line)
            assert match, f"not a sample line: {line!r}"
            name, value = match.groups()
            assert name in helps and name in types and name not in samples, line
            if types[name] == "counter":
                assert name.endswith("_total"), name
            samples[name] = (types[name], float(value))
    return samples


def values(response) -> dict[str, float]:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
    return {name: value for name, (_, value) in parse(response.text).items()}


def test_render_escapes_help_and_writes_special_values():
    text = render([Metric("a_total", "counter", "back\\slash\nnew line", 3),
                   Metric("b", "gauge", "g", math.inf), Metric("c", "gauge", "g", 0.25)])  # fmt: skip
    assert "# HELP a_total back\\\\slash\\nnew line\n" in text
    assert parse(text) == {"a_total": ("counter", 3), "b": ("gauge", math.inf), "c": ("gauge", 0.25)}
    with pytest.raises(ValueError, match="histogram"):
        render([Metric("h", "histogram", "h", 1)])


def test_engine_stats_become_total_counters_and_non_numbers_are_left_out():
    metrics = engine_metrics({"requests": 2, "prefill_seconds": 0.5, "odd-name": 1, "state": "ok", "busy": True},
                             {"requests": "requests submitted"})  # fmt: skip
    assert [(m.name, m.kind, m.value) for m in metrics] == [
        ("vistune_engine_requests_total", "counter", 2),
        ("vistune_engine_prefill_seconds_total", "counter", 0.5),
        ("vistune_engine_odd_name_total", "counter", 1),
    ]
    assert metrics[0].help == "requests submitted"


class StatlessEngine:
    """An engine without ``stats()`` (as the vllm and sglang plugins): one token per request."""

    max_model_len = 64
    max_batch_size = 1

    async def stream(self, request):
        from vistune.inference.engine import StreamEvent

        yield StreamEvent(0, "ok", (1,), "length", 3)


def _png_url() -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (16, 16), (255, 0, 0)).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def test_an_engine_without_stats_gives_the_servers_counters_only():
    from fastapi.testclient import TestClient

    config = RunConfig(task="serve", device="cpu", max_batch_size=1, max_queue=0)
    app = create_app(StatlessEngine(), config, model_name=MODEL, owns_engine=False)
    client = TestClient(app)
    before = values(client.get("/metrics"))
    assert set(before) == {"vistune_http_requests_admitted_total", "vistune_http_requests_refused_total",
                           "vistune_http_requests_in_flight", "vistune_http_images_total",
                           "vistune_http_image_seconds_total"}  # fmt: skip
    assert all(value == 0 for value in before.values())
    content = [{"type": "image_url", "image_url": {"url": _png_url()}}, {"type": "text", "text": "hi"}]
    body = {"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": 1}
    assert client.post("/v1/chat/completions", json=body).status_code == 200
    app.state.admission.enter()  # the only place is taken: the next request is refused
    assert client.post("/v1/chat/completions", json=body).status_code == 429
    after = values(client.get("/metrics"))
    assert after["vistune_http_requests_admitted_total"] == 2  # the request, and the place taken by hand
    assert after["vistune_http_requests_refused_total"] == 1
    assert after["vistune_http_requests_in_flight"] == 1
    assert after["vistune_http_images_total"] == 1 and after["vistune_http_image_seconds_total"] > 0


@pytest.fixture(scope="module")
def server(tiny_llama):
    pytest.importorskip("torch")
    pytest.importorskip("uvicorn")
    from vistune.inference.transformers_engine import TransformersEngine
    from vistune.plugins import get_plugin_manager
    from vistune.serving.server import ServerThread

    config = RunConfig(task="serve", device="cpu", api_key=KEY, max_new_tokens=8)
    engine = TransformersEngine(str(tiny_llama), get_plugin_manager().registries.models.get("causal-lm"), config)
    thread = ServerThread(create_app(engine, config, model_name=MODEL)).start()
    yield thread
    thread.stop()


def test_metrics_are_open_and_follow_a_streamed_request(server):
    from vistune.inference.engine_stats import DESCRIPTIONS

    before = values(httpx.get(server.url + "/metrics"))  # no API key: scrapers need none, as vLLM's
    assert {f"vistune_engine_{name}_total" for name in DESCRIPTIONS} <= set(before)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 4,
            "temperature": 0, "stream": True, "ignore_eos": True}  # fmt: skip
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as response:  # fmt: skip
        assert response.status_code == 200
        assert [line for line in response.iter_lines() if line.startswith("data:")][-1] == "data: [DONE]"
    after = values(httpx.get(server.url + "/metrics"))
    delta = {name: after[name] - before[name] for name in after}
    assert delta["vistune_http_requests_admitted_total"] == 1
    assert delta["vistune_engine_requests_total"] == delta["vistune_engine_first_tokens_total"] == 1
    assert delta["vistune_engine_prefills_total"] == 1 and delta["vistune_engine_prefill_tokens_total"] > 5
    assert delta["vistune_engine_decode_steps_total"] == 3 and delta["vistune_engine_decode_rows_total"] == 3
    for name in ("encode", "encode_wait", "queue_wait", "prefill", "decode", "first_token"):
        assert delta[f"vistune_engine_{name}_seconds_total"] > 0, name
    assert httpx.get(server.url + "/v1/models").status_code == 401  # the API itself still needs the key
