"""Serving over HTTP on the product path: ``vistune serve`` against ms-swift's deploy and sequential ``generate``.

Every system runs as its own process on the same saved checkpoint (a Llava-1.5-7B-shaped
model with random weights, ``build_checkpoint`` of bench/sft_product.py) and answers the
same prompts: one 640x480 JPEG and a few words each (~587 prompt tokens with Llava-1.5's
576 image tokens), greedy, 64 and 256 new tokens:

* ``vistune``: ``python -m vistune serve --model DIR`` (bf16, SDPA on a GPU), driven by
  streaming OpenAI-style chat clients, 1, 8, 32 and 64 at a time;
* ``swift``: ``python -m swift.cli.main deploy --infer_backend pt`` (ms-swift 4.6, when
  importable from ``--swift-site``), the same clients;
* ``generate``: a plain transformers script (bench/peers/hf_generate.py) answering one
  request after the other with ``model.generate`` and a streamer: the baseline row.

Each server is started (its process group, its log under ``--work``/logs), polled until
``/v1/models`` answers, warmed up with a few requests, measured, then stopped.  A system
that fails is a row that says why, with the tail of its log.

Fixed-length answers: the clients ask for ``max_tokens`` new tokens at temperature 0,
with ``ignore_eos`` where the server accepts it (vistune; ms-swift 4.6's request has
neither ``ignore_eos`` nor ``min_tokens``; the ``generate`` script sets ``min_new_tokens``).  So that no
system can stop early or stream empty text, the benchmark's copy of the checkpoint has the
output-layer rows of every token that is not a plain word (`` word``: special tokens,
end-of-sequence, byte pieces, ids past the tokenizer's vocabulary) set to zero: greedy
decoding of random weights then picks a word every step (the largest of a few hundred
random logits is positive), each token is one word of streamed text, and the cost of a
step is unchanged.  Output tokens are counted from the stream (``usage`` where the server
sends it, else one per content chunk) and recorded, not assumed.

Client metrics, per (system, clients, new_tokens): each request notes when its request
was sent and when each content chunk arrived.  ``ttft``: first non-empty content chunk;
``itl``: gaps between consecutive content chunks (what a reader of the stream sees;
ms-swift holds each word back until the next token shows where it ends, so its first
chunk comes a decode step after its first token, and ``tokens_per_chunk`` is recorded);
``tpot``: (last chunk - first chunk) / (output tokens - 1), per token whatever the
chunking; ``req_per_s`` and ``out_tok_per_s``: finished requests and their output tokens
over the cell's wall time.  Clients are closed loops: each sends its next request when the
last one ended, ``--requests`` in all (default ``max(8, 2 x clients)``).

Server phases (vistune only): ``/metrics`` is read before and after each cell and the
differences of its counters go in the row as ``server``: per request, the seconds spent
loading its image (``image_s_per_request``), waiting for an encode thread
(``encode_wait_s_per_request``), encoding the prompt (``encode_s_per_request``), waiting
to be admitted to a prefill (``queue_wait_s_per_request``) and from submission to the
engine to its first token (``first_token_s_per_request``); per prefill call its seconds
and prompts (``prefill_s_per_call``, ``prefill_rows_per_call``); per decode step its
seconds and rows (``decode_s_per_step``, ``rows_per_step``).  The client's TTFT minus
the encode figures and ``first_token_s_per_request`` is what the rest took: reading the
request, loading its image, the event loop and sending the first chunk.

Usage on a GPU (the checkpoint is built into ``--work`` on the first run and reused)::

    python bench/serve_http.py --site /tmp/site --swift-site /tmp/swift-site --out serve_h200.json

The whole grid takes longer than one 10-minute call: ms-swift serves one request at a
time by default (``max_batch_size 1``), so its 256-token cells alone take ~15 minutes.
Split it with ``--systems``, ``--clients`` and ``--new-tokens``, one ``--out`` per call;
``--cell-budget`` (default 120 s) stops a cell from sending new requests, and requests in
flight then finish (at most ``--request-timeout``).  ``--vistune-args '--max_batch_size
32'`` / ``--swift-args '--max_batch_size 8'`` with ``--label`` measure other settings.

``--smoke`` serves the tiny Llava on the CPU to 1 and 2 clients, 4 new tokens (the test
suite runs it).  Rows: ``{system, clients, new_tokens, req_per_s, ttft_p50_s, ttft_p95_s,
itl_p50_s, itl_p95_s, out_tok_per_s, requests, errors, ..., server}`` (``server``: vistune's rows).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import random
import re
import shlex
import signal
import socket
import struct
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
from sft_product import build_checkpoint, machine, text_of, write_image  # noqa: E402 - the same checkpoint and pictures

SYSTEMS = ("vistune", "swift", "generate")
#: Fields each server is sent beyond the OpenAI ones it shares; ms-swift's request has no
#: ignore_eos / min_tokens / stream_options (it sends usage in every chunk anyway).
EXTRA_BODY = {"vistune": {"ignore_eos": True, "stream_options": {"include_usage": True}}, "swift": {}}
#: Systems whose server answers ``GET /metrics`` with vistune's counters.
METRICS = ("vistune",)
MARKER = "vocab-restricted.json"


# -- the checkpoint's output layer --------------------------------------------------------------


def word_token_ids(tokenizer) -> list[int]:
    """Ids that decode, alone, to a space and a plain word (no special, byte-piece or empty tokens)."""
    special = set(tokenizer.all_special_ids)
    ids = []
    for i in range(len(tokenizer)):
        if i in special:
            continue
        text = tokenizer.decode([i])
        if len(text) >= 2 and text[0] == " " and text[1:].isascii() and text[1:].isalpha():
            ids.append(i)
    return ids


def _safetensors_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        return sorted({model_dir / name for name in json.loads(index.read_text())["weight_map"].values()})
    return sorted(model_dir.glob("*.safetensors"))


def restrict_output_vocabulary(model_dir: Path, keep: list[int]) -> int:
    """Zero, in place, the rows of the output layer (``lm_head.weight``) not in ``keep``.

    The rows are overwritten inside the safetensors file (its header gives the tensor's
    offset), so a 14 GB checkpoint is not loaded or rewritten.  Returns the rows zeroed.
    """
    sizes = {"BF16": 2, "F16": 2, "F32": 4}
    for path in _safetensors_files(model_dir):
        with path.open("r+b") as f:
            (header_len,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(header_len))
            name = next((k for k in header if k.endswith("lm_head.weight")), None)
            if name is None:
                continue
            entry = header[name]
            if entry["dtype"] not in sizes:
                raise ValueError(f"{path}: {name} is {entry['dtype']}, expected one of {sorted(sizes)}")
            rows, width = entry["shape"]
            row_bytes = width * sizes[entry["dtype"]]
            start = 8 + header_len + entry["data_offsets"][0]
            kept = set(keep)
            zero = bytes(row_bytes)
            zeroed = 0
            for row in range(rows):
                if row not in kept:
                    f.seek(start + row * row_bytes)
                    f.write(zero)
                    zeroed += 1
            return zeroed
    raise ValueError(f"{model_dir}: no lm_head.weight in its safetensors files")


def prepare_checkpoint(work: Path, smoke: bool) -> Path:
    """The benchmark's checkpoint: built once, its output layer restricted to word tokens (see the docstring)."""
    model = build_checkpoint(work / "model", smoke)
    marker = work / MARKER
    if not marker.is_file():
        from transformers import AutoTokenizer

        keep = word_token_ids(AutoTokenizer.from_pretrained(model))
        if len(keep) < 50:
            raise ValueError(f"{model}: only {len(keep)} word tokens in the tokenizer")
        zeroed = restrict_output_vocabulary(model, keep)
        marker.write_text(json.dumps({"kept": len(keep), "zeroed": zeroed}) + "\n")
    return model


# -- the prompts -------------------------------------------------------------------------------


def write_prompts(work: Path, model: Path, count: int, text_tokens: int, smoke: bool) -> list[dict]:
    """``count`` prompts ``{image, text}``: a JPEG each (640x480; 64x48 in smoke mode) and ~``text_tokens`` words."""
    path = work / f"prompts-{count}-{text_tokens}.jsonl"
    if path.is_file():
        return [json.loads(line) for line in path.read_text().splitlines()]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    rng = random.Random(0)
    images = work / "images"
    images.mkdir(parents=True, exist_ok=True)
    prompts = []
    for i in range(count):
        image = images / f"{i:04d}.jpg"
        write_image(image, rng, (64, 48) if smoke else (640, 480))
        prompts.append({"image": str(image.resolve()), "text": text_of(rng, tokenizer, text_tokens)})
    path.write_text("".join(json.dumps(p) + "\n" for p in prompts))
    return prompts


def chat_body(prompt: dict, model_id: str, new_tokens: int, extra: dict) -> dict:
    data = base64.b64encode(Path(prompt["image"]).read_bytes()).decode()
    content = [{"type": "image_url", "image_url": {"url": f"data:image/jpeg;base64,{data}"}},
               {"type": "text", "text": prompt["text"]}]  # fmt: skip
    return {"model": model_id, "messages": [{"role": "user", "content": content}], "max_tokens": new_tokens,
            "temperature": 0, "stream": True, **extra}  # fmt: skip


# -- one request, one cell -----------------------------------------------------------------------


@dataclass
class Result:
    """One request as its client saw it; times in seconds from when it was sent."""

    chunk_times: list[float] = field(default_factory=list)
    latency: float = 0.0
    out_tokens: int = 0
    prompt_tokens: int | None = None
    error: str | None = None

    @property
    def ttft(self) -> float | None:
        return self.chunk_times[0] if self.chunk_times else None


async def stream_request(client, url: str, body: dict) -> Result:
    """POST one streaming chat completion; note each content chunk's arrival and the usage sent."""
    result = Result()
    usage_tokens = None
    start = time.perf_counter()
    try:
        async with client.stream("POST", url, json=body) as response:
            if response.status_code != 200:
                text = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {text[:300]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    break
                now = time.perf_counter() - start
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = f"error in stream: {json.dumps(chunk['error'])[:300]}"
                    return result
                usage = chunk.get("usage") or {}
                if usage.get("completion_tokens") is not None:
                    usage_tokens = usage["completion_tokens"]
                    result.prompt_tokens = usage.get("prompt_tokens", result.prompt_tokens)
                for choice in chunk.get("choices") or []:
                    if (choice.get("delta") or {}).get("content"):
                        result.chunk_times.append(now)
                        break
    except Exception as exc:  # noqa: BLE001 - a failed request is counted, not fatal
        result.error = f"{type(exc).__name__}: {exc}"[:300]
        return result
    result.latency = time.perf_counter() - start
    result.out_tokens = usage_tokens if usage_tokens is not None else len(result.chunk_times)
    if not result.chunk_times:
        result.error = "the stream carried no content"
    return result


async def drive(url: str, bodies: list[dict], clients: int, timeout: float, budget: float) -> tuple[list[Result], float]:
    """``clients`` closed-loop clients sending ``bodies`` in turn; no new request after ``budget`` seconds."""
    import httpx

    results: list[Result] = []
    next_body = 0
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(timeout, connect=30), limits=limits) as client:
        start = time.perf_counter()

        async def one_client() -> None:
            nonlocal next_body
            while next_body < len(bodies) and time.perf_counter() - start < budget:
                body = bodies[next_body]
                next_body += 1
                results.append(await stream_request(client, url, body))

        await asyncio.gather(*(one_client() for _ in range(clients)))
        return results, time.perf_counter() - start


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated ``q``-th percentile (as numpy's default), ``None`` for no values."""
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q / 100
    low = int(k)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (k - low)


def summarise(results: list[Result], wall: float) -> dict:
    """The row's figures from its requests (finished ones only; failures counted in ``errors``)."""
    ok = [r for r in results if r.error is None]
    gaps = [b - a for r in ok for a, b in zip(r.chunk_times, r.chunk_times[1:])]
    tpot = [(r.chunk_times[-1] - r.chunk_times[0]) / (r.out_tokens - 1) for r in ok if r.out_tokens > 1]
    out_tokens = [r.out_tokens for r in ok]
    chunks = sum(len(r.chunk_times) for r in ok)
    prompt_tokens = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]

    def rounded(value, digits=4):
        return None if value is None else round(value, digits)

    row = {
        "req_per_s": rounded(len(ok) / wall if wall > 0 else None, 3),
        "ttft_p50_s": rounded(percentile([r.ttft for r in ok], 50)),
        "ttft_p95_s": rounded(percentile([r.ttft for r in ok], 95)),
        "itl_p50_s": rounded(percentile(gaps, 50)),
        "itl_p95_s": rounded(percentile(gaps, 95)),
        "tpot_p50_s": rounded(percentile(tpot, 50)),
        "latency_p50_s": rounded(percentile([r.latency for r in ok], 50)),
        "out_tok_per_s": rounded(sum(out_tokens) / wall if wall > 0 else None, 1),
        "requests": len(ok),
        "errors": len(results) - len(ok),
        "out_tokens_min": min(out_tokens, default=None),
        "out_tokens_max": max(out_tokens, default=None),
        "tokens_per_chunk": rounded(sum(out_tokens) / chunks if chunks else None, 2),
        "prompt_tokens": round(percentile(prompt_tokens, 50)) if prompt_tokens else None,
        "wall_s": round(wall, 3),
    }
    failed = [r.error for r in results if r.error is not None]
    if failed:
        row["error_sample"] = failed[0]
    return row


# -- the server's own accounting -----------------------------------------------------------------


def read_metrics(base: str) -> dict[str, float] | None:
    """``{name: value}`` of the samples (no labels) in a server's ``/metrics`` text; ``None``
    when it does not answer them (the row then has no ``server`` figures)."""
    import httpx

    try:
        response = httpx.get(f"{base}/metrics", timeout=30)
        response.raise_for_status()
    except httpx.HTTPError:
        return None
    found = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


def server_phases(before: dict[str, float], after: dict[str, float]) -> dict:
    """Where a cell's time went inside the server: its counters' differences as per-request,
    per-prefill and per-step figures (``None`` where nothing was counted)."""

    def delta(name: str) -> float:
        return after.get(name, 0.0) - before.get(name, 0.0)

    def per(seconds: str, count: str, digits: int = 6) -> float | None:
        n = delta(count)
        return round(delta(seconds) / n, digits) if n > 0 else None

    engine = "vistune_engine_"
    return {
        "image_s_per_request": per("vistune_http_image_seconds_total", "vistune_http_requests_admitted_total"),
        "encode_wait_s_per_request": per(engine + "encode_wait_seconds_total", engine + "requests_total"),
        "encode_s_per_request": per(engine + "encode_seconds_total", engine + "requests_total"),
        "queue_wait_s_per_request": per(engine + "queue_wait_seconds_total", engine + "admissions_total"),
        "first_token_s_per_request": per(engine + "first_token_seconds_total", engine + "first_tokens_total"),
        "prefill_s_per_call": per(engine + "prefill_seconds_total", engine + "prefills_total"),
        "prefill_rows_per_call": per(engine + "prefill_rows_total", engine + "prefills_total", 3),
        "prefill_tokens_per_call": per(engine + "prefill_tokens_total", engine + "prefills_total", 1),
        "decode_s_per_step": per(engine + "decode_seconds_total", engine + "decode_steps_total"),
        "rows_per_step": per(engine + "decode_rows_total", engine + "decode_steps_total", 3),
        "prefills": round(delta(engine + "prefills_total")),
        "decode_steps": round(delta(engine + "decode_steps_total")),
    }


# -- the servers ---------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def environment(args, system: str) -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    paths = []
    if system == "swift":
        paths.append(str(args.swift_site or ""))
        env.update(USE_HF="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   MODELSCOPE_CACHE=str(args.work / "ms-cache"))  # fmt: skip
    elif args.site:
        paths.append(str(args.site))
    paths.append(env.get("PYTHONPATH", ""))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    if args.smoke:  # the client shares the machine's two cores with the server
        env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    return env


def server_command(system: str, model: Path, port: int, args) -> list[str]:
    if system == "vistune":
        command = [sys.executable, "-m", "vistune", "serve", "--model", str(model), "--host", "127.0.0.1",
                   "--port", str(port)]  # fmt: skip
        if args.smoke:
            command += ["--device", "cpu", "--dtype", "float32"]
        else:
            command += ["--device", "cuda", "--dtype", "bfloat16", "--attn_implementation", "sdpa"]
        return command + shlex.split(args.vistune_args)
    command = [sys.executable, "-m", "swift.cli.main", "deploy", "--model", str(model), "--model_type", "llava1_5_hf",
               "--template", "llava1_5_hf", "--infer_backend", "pt", "--torch_dtype",
               "float32" if args.smoke else "bfloat16", "--attn_impl", "sdpa", "--host", "127.0.0.1",
               "--port", str(port), "--max_new_tokens", str(max(args.new_tokens))]  # fmt: skip
    return command + shlex.split(args.swift_args)


def available(system: str, args) -> str | None:
    """Why ``system`` cannot run here, or None."""
    if system == "swift":
        import importlib.util

        site = args.swift_site and (Path(args.swift_site) / "swift").is_dir()
        if not site and not importlib.util.find_spec("swift"):
            return "ms-swift is not installed (--swift-site)"
    return None


def log_tail(path: Path, lines: int = 20) -> list[str]:
    try:
        return path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return []


class Server:
    """A server process in its own process group, logging to ``log``."""

    def __init__(self, command: list[str], env: dict, log: Path, port: int):
        self.log = log
        self.port = port
        with log.open("w") as f:
            f.write(" ".join(command) + "\n")
            f.flush()
            self.process = subprocess.Popen(command, env=env, stdout=f, stderr=subprocess.STDOUT,
                                            start_new_session=True, cwd=log.parent)  # fmt: skip

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float) -> str:
        """Poll until ``/v1/models`` lists a model; returns its id.  ms-swift moves off a busy
        port on its own, so the port uvicorn reports in the log wins."""
        import httpx

        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"the server exited with code {self.process.returncode} before it was ready")
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready after {timeout:.0f} s")
            found = re.findall(r"Uvicorn running on https?://[^\s:]+:(\d+)", self.log.read_text(errors="replace"))
            if found:
                self.port = int(found[-1])
            try:
                answer = httpx.get(f"{self.base}/v1/models", timeout=5)
                if answer.status_code == 200 and answer.json().get("data"):
                    return answer.json()["data"][0]["id"]
            except (httpx.HTTPError, ValueError):
                pass
            time.sleep(0.5)

    def stop(self, grace: float = 30) -> None:
        """SIGTERM the process group, SIGKILL what is left after ``grace`` seconds."""
        if self.process.poll() is None:
            try:
                os.killpg(self.process.pid, signal.SIGTERM)
                self.process.wait(grace)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                return
        try:
            os.killpg(self.process.pid, signal.SIGKILL)  # children the leader left behind
        except ProcessLookupError:
            pass
        self.process.wait()


def cells(args) -> list[tuple[int, int]]:
    return [(clients, new_tokens) for new_tokens in args.new_tokens for clients in args.clients]


def bench_server(system: str, args, model: Path, prompts: list[dict]) -> list[dict]:
    """Start ``system``'s server, warm it up, measure every cell, stop it."""
    logs = args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"{system}.log"
    base = {"system": system, "config": args.label or "defaults"}
    port = free_port()
    server = Server(server_command(system, model, port, args), environment(args, system), log, port)
    rows = []
    try:
        try:
            model_id = server.wait_ready(args.ready_timeout)
            url = f"{server.base}/v1/chat/completions"
            extra = EXTRA_BODY[system]
            warm = [chat_body(prompts[i % len(prompts)], model_id, min(16, max(args.new_tokens)), extra)
                    for i in range(args.warmup)]  # fmt: skip
            concurrency = min(len(warm), max(args.clients))
            results, _ = asyncio.run(drive(url, warm, concurrency, args.request_timeout, args.cell_budget))
            failed = [r.error for r in results if r.error]
            if failed:
                raise RuntimeError(f"warm-up failed: {failed[0]}")
        except Exception as exc:  # noqa: BLE001 - a system that cannot serve is a row that says why
            return [{**base, "clients": None, "new_tokens": None, "error": str(exc), "log_tail": log_tail(log)}]
        for clients, new_tokens in cells(args):
            count = args.requests or max(8, 2 * clients)
            bodies = [chat_body(prompts[i % len(prompts)], model_id, new_tokens, extra) for i in range(count)]
            before = read_metrics(server.base) if system in METRICS else None
            results, wall = asyncio.run(drive(url, bodies, clients, args.request_timeout, args.cell_budget))
            row = {**base, "clients": clients, "new_tokens": new_tokens, **summarise(results, wall)}
            after = read_metrics(server.base) if before is not None else None
            if after is not None:
                row["server"] = server_phases(before, after)
            if server.process.poll() is not None:
                row.update(error=f"the server exited with code {server.process.returncode}", log_tail=log_tail(log))
            rows.append(row)
            print(json.dumps(row), flush=True)
            if "error" in row:
                break
    finally:
        server.stop()
    return rows


def bench_generate(args, model: Path, prompts: list[dict]) -> list[dict]:
    """Sequential ``generate`` (bench/peers/hf_generate.py): one row per new-token count, one client."""
    logs = args.work / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log, timings = logs / "generate.log", args.work / "generate-timings.json"
    timings.unlink(missing_ok=True)
    count = args.requests or 8
    prompt_file = args.work / "generate-prompts.jsonl"
    prompt_file.write_text("".join(json.dumps(prompts[i % len(prompts)]) + "\n" for i in range(count)))
    command = [sys.executable, str(HERE / "peers" / "hf_generate.py"), "--model", str(model), "--prompts",
               str(prompt_file), "--new-tokens", ",".join(map(str, args.new_tokens)), "--warmup", str(args.warmup),
               "--out", str(timings)] + ["--cpu"] * args.smoke  # fmt: skip
    base = {"system": "generate", "config": args.label or "defaults", "clients": 1}
    timeout = args.ready_timeout + args.cell_budget * len(args.new_tokens)
    with log.open("w") as f:
        f.write(" ".join(command) + "\n")
        f.flush()
        process = subprocess.Popen(command, env=environment(args, "generate"), stdout=f, stderr=subprocess.STDOUT,
                                   start_new_session=True)  # fmt: skip
        try:
            code = process.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            code = "timeout"
    if code != 0 or not timings.is_file():
        return [{**base, "new_tokens": None, "error": f"exit {code}", "log_tail": log_tail(log)}]
    rows = []
    for cell in json.loads(timings.read_text())["cells"]:
        results = [Result(chunk_times=r["token_times"], latency=r["latency"], out_tokens=len(r["token_times"]),
                          prompt_tokens=r["prompt_tokens"]) for r in cell["requests"]]  # fmt: skip
        row = {**base, "new_tokens": cell["new_tokens"], **summarise(results, cell["wall_s"])}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


# -- the whole benchmark -----------------------------------------------------------------------------


def table(rows: list[dict]) -> str:
    lines = ["| system | clients | new tokens | req/s | TTFT p50 / p95 s | ITL p50 / p95 s | out tok/s | ok / errors |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        if r.get("requests") is None:
            lines.append(f"| {r['system']} | {r.get('clients')} | {r.get('new_tokens')} | "
                         f"{r.get('skipped') or r.get('error')} | | | | |")  # fmt: skip
            continue
        lines.append(f"| {r['system']} | {r['clients']} | {r['new_tokens']} | {r['req_per_s']} | "
                     f"{r['ttft_p50_s']} / {r['ttft_p95_s']} | {r['itl_p50_s']} / {r['itl_p95_s']} | "
                     f"{r['out_tok_per_s']} | {r['requests']} / {r['errors']} |")  # fmt: skip
    return "\n".join(lines)


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--systems", default=",".join(SYSTEMS), type=lambda s: s.split(","))
    parser.add_argument("--clients", default="1,8,32,64", type=ints, help="concurrent streaming clients per cell")
    parser.add_argument("--new-tokens", default="64,256", type=ints)
    parser.add_argument("--requests", type=int, help="requests per cell (default: max(8, 2 x clients))")
    parser.add_argument("--warmup", type=int, default=8, help="requests (16 tokens) before the first cell")
    parser.add_argument("--text-tokens", type=int, default=4, help="words of text beside each prompt's image")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "serve-http",
                        help="checkpoint, prompts and logs (its own folder: the checkpoint's output layer is changed)")
    parser.add_argument("--site", type=Path, help="folder vistune is installed into (--target)")
    parser.add_argument("--swift-site", type=Path, help="folder ms-swift's wheels are installed into")
    parser.add_argument("--vistune-args", default="", help="extra flags of vistune serve, e.g. '--max_batch_size 32'")
    parser.add_argument("--swift-args", default="", help="extra flags of swift deploy, e.g. '--max_batch_size 8'")
    parser.add_argument("--label", help="the rows' config (default: defaults)")
    parser.add_argument("--out", type=Path, help="results JSON (default: bench/results/serve_h200.json on a GPU)")
    parser.add_argument("--ready-timeout", type=float, default=900, help="seconds a server may take to load")
    parser.add_argument("--request-timeout", type=float, default=600, help="seconds one request may take")
    parser.add_argument("--cell-budget", type=float, default=120, help="seconds after which a cell sends no new request")
    parser.add_argument("--smoke", action="store_true", help="tiny Llava on the CPU, 1 and 2 clients, 4 new tokens")
    args = parser.parse_args(argv)
    if args.smoke:
        if "--clients" not in " ".join(argv or sys.argv):
            args.clients = [1, 2]
        if "--new-tokens" not in " ".join(argv or sys.argv):
            args.new_tokens = [4]
        args.warmup = min(args.warmup, 2)
        args.ready_timeout, args.cell_budget = min(args.ready_timeout, 180), min(args.cell_budget, 60)
        args.request_timeout = min(args.request_timeout, 60)
    unknown = [s for s in args.systems if s not in SYSTEMS]
    if unknown:
        parser.error(f"unknown systems: {unknown}; choose from {', '.join(SYSTEMS)}")
    if args.out is None:
        on_gpu = not args.smoke and not machine().startswith("CPU")
        args.out = ROOT / "bench" / "results" / "serve_h200.json" if on_gpu else args.work / "serve_http.json"
    args.work.mkdir(parents=True, exist_ok=True)
    model = prepare_checkpoint(args.work, args.smoke)
    most = args.requests or max(8, *(2 * c for c in args.clients))
    prompts = write_prompts(args.work, model, most, args.text_tokens, args.smoke)
    info = {"machine": machine(), "model": "tiny Llava" if args.smoke else "Llava-1.5-7B shape, random weights",
            "prompts": len(prompts)}  # fmt: skip
    rows: list[dict] = []
    for system in args.systems:
        reason = available(system, args)
        if reason:
            new = [{"system": system, "config": args.label or "defaults", "clients": None, "new_tokens": None,
                    "skipped": reason}]  # fmt: skip
        elif system == "generate":
            new = bench_generate(args, model, prompts)
        else:
            new = bench_server(system, args, model, prompts)
        rows += new
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**info, "rows": rows}, indent=1) + "\n")
    print(table(rows))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
