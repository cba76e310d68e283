"""Load on the server: the bounded queue (429), draining (503), graceful shutdown, and a load test.

All traffic goes to servers on 127.0.0.1 started here; every loop is bounded in count
and time.  The load test prints requests/s and latency percentiles.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from vistune.config import RunConfig
from vistune.inference.transformers_engine import TransformersEngine
from vistune.serving.app import create_app
from vistune.serving.server import ServerThread

MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "Describe a red circle."}]


def start(engine, **config) -> ServerThread:
    config = RunConfig(task="serve", device="cpu", **config)
    return ServerThread(create_app(engine, config, model_name=MODEL, owns_engine=False)).start()


def body(max_tokens: int, stream: bool = False) -> dict:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": max_tokens, "temperature": 0, "stream": stream,
            "ignore_eos": True}  # fmt: skip


async def _ask(client: httpx.AsyncClient, url: str, max_tokens: int) -> tuple[int, float, dict]:
    started = time.perf_counter()
    response = await client.post(url + "/v1/chat/completions", json=body(max_tokens), timeout=120)
    return response.status_code, time.perf_counter() - started, response.json()


def test_full_queue_answers_429_and_every_request_is_answered(engine):
    server = start(engine, max_batch_size=1, max_queue=1)  # two requests in flight at most
    try:

        async def burst():
            async with httpx.AsyncClient() as client:
                return await asyncio.gather(*[_ask(client, server.url, 200) for _ in range(8)])

        answers = asyncio.run(asyncio.wait_for(burst(), timeout=120))
    finally:
        server.stop()
    statuses = sorted(status for status, _, _ in answers)
    # all 8 arrive within milliseconds while the first two generate 200 tokens: exactly two get in
    assert statuses == [200] * 2 + [429] * 6, statuses
    for status, _, payload in answers:
        if status == 429:
            assert payload["error"]["type"] == "rate_limit_error" and payload["error"]["code"] == "queue_full"
        else:
            assert payload["usage"]["completion_tokens"] >= 1


def test_draining_server_answers_503(engine):
    server = start(engine)
    try:
        server.server.config.app.state.admission.start_draining()
        response = httpx.post(server.url + "/v1/chat/completions", json=body(4), timeout=30)
        assert response.status_code == 503
        assert response.json()["error"]["code"] == "shutting_down"
        assert httpx.get(server.url + "/health").status_code == 503
    finally:
        server.stop()


def test_graceful_shutdown_finishes_the_stream_in_flight(engine):
    server = start(engine)
    lines: list[str] = []
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", server.url + "/v1/chat/completions", json=body(150, stream=True)) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line:
                    lines.append(line)
                if len(lines) == 3:
                    server.begin_shutdown()  # as SIGTERM does
    server.stop()
    assert lines[-1] == "data: [DONE]"
    # the stream ran to its full length after the shutdown began, it was not cut
    assert json.loads(lines[-2][len("data: ") :])["choices"][0]["finish_reason"] == "length"
    assert not server._thread.is_alive()
    with pytest.raises(httpx.ConnectError):
        httpx.get(server.url + "/health", timeout=5)


def test_a_client_leaving_a_stream_of_several_prompts_frees_its_place(engine):
    server = start(engine)
    admission = server.server.config.app.state.admission
    body = {"model": MODEL, "prompt": ["a red circle", "a blue square"], "max_tokens": 1000, "ignore_eos": True,
            "stream": True}  # fmt: skip
    try:
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
            assert response.status_code == 200
            for i, _ in enumerate(response.iter_lines()):
                if i == 3:
                    break
        deadline = time.monotonic() + 30
        while (admission.in_flight or engine._rows) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert admission.in_flight == 0  # the request left the admission limit
        assert not engine._rows  # and both its prompts left the engine's batch
    finally:
        server.stop()


def test_load_32_clients_every_request_answered(engine):
    """32 concurrent clients x 4 requests on loopback, after the same requests one at a time.

    The server has room for all 32 (max_batch_size 8 + max_queue 64), so every request must be
    served (a 429 is a failure).  The throughput bound comes from the sequential latency measured
    just before on the same machine, so a busy machine moves both alike: batching must give at least
    1.5x the throughput of one client (a server that runs one request at a time gives about 1x).
    The latency bound is relative to the mean latency the throughput implies: p95 within 3x of it,
    the slowest request within 4x (a starved request waits far longer than the others).
    """
    server = start(engine, max_batch_size=8, max_queue=64)
    clients, per_client, max_tokens = 32, 4, 8
    try:

        async def alone():
            async with httpx.AsyncClient() as client:
                await _ask(client, server.url, max_tokens)  # warm-up
                return [await _ask(client, server.url, max_tokens) for _ in range(8)]

        async def client_loop(client):
            return [await _ask(client, server.url, max_tokens) for _ in range(per_client)]

        async def run():
            limits = httpx.Limits(max_connections=clients)
            async with httpx.AsyncClient(limits=limits) as client:
                started = time.perf_counter()
                results = await asyncio.gather(*[client_loop(client) for _ in range(clients)])
                return [r for rs in results for r in rs], time.perf_counter() - started

        sequential = asyncio.run(asyncio.wait_for(alone(), timeout=120))
        answers, elapsed = asyncio.run(asyncio.wait_for(run(), timeout=300))
    finally:
        server.stop()
    assert [status for status, _, _ in sequential] == [200] * 8
    single = statistics.median(latency for _, latency, _ in sequential)
    assert len(answers) == clients * per_client
    statuses = [status for status, _, _ in answers]
    assert statuses == [200] * len(answers), f"{statuses.count(429)} refused although the queue had room"
    assert all(payload["usage"]["completion_tokens"] == max_tokens for _, _, payload in answers)
    latencies = sorted(latency for _, latency, _ in answers)
    p50 = statistics.median(latencies)
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
    throughput = len(answers) / elapsed
    print(f"\nload test: {clients} clients x {per_client} requests, {max_tokens} tokens each, tiny llama on CPU: "
          f"{throughput:.1f} requests/s (one client: {1 / single:.1f}), latency p50 {p50 * 1000:.0f} ms, "
          f"p95 {p95 * 1000:.0f} ms, max {latencies[-1] * 1000:.0f} ms (one request alone: {single * 1000:.0f} ms), "
          f"{elapsed:.1f} s")  # fmt: skip
    assert throughput >= 1.5 / single, "concurrent requests are not batched"
    # Little's law: with 32 requests always in flight, the mean latency is 32 / throughput; a fair queue
    # keeps the tail near it, a request left behind (starved) shows far above it
    mean = clients / throughput
    assert p95 <= 3 * mean and latencies[-1] <= 4 * mean, f"p95 {p95:.2f} s, max {latencies[-1]:.2f} s, mean {mean:.2f} s"
