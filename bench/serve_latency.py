"""Serving latency on one GPU: plain sequential ``generate`` against vistune's TransformersEngine.

The model is Llava-1.5-7B-shaped (CLIP ViT-L/14-336 + Llama-2-7B) with random weights
built from configs, bf16, SDPA: nothing is downloaded.  Every request is one 336x336
image (576 image tokens) plus a short question, 587 prompt tokens in all, and asks for
64 new tokens (greedy; end-of-sequence ignored, since random weights could end early).
Both sides get the same pre-encoded prompts (token ids and pixel tensors), so image
preprocessing, which costs the same on both sides, is left out.

* ``plain``: ``model.generate`` one request after another (what a naive server does);
  time to first token measured with a streamer.
* ``engine``: ``vistune.inference.transformers_engine.TransformersEngine`` (continuous
  batching, ``max_batch_size`` 8), driven by ``--clients`` concurrent clients (default 8)
  that each send ``--requests`` requests back to back through ``engine.stream``; and by
  one client, for the per-request overhead.

Reported: requests/s, time to first token (TTFT) p50/p95 and request latency p50/p95.
Targets: engine TTFT p50 < 350 ms under 8 clients, and >= 3x the plain requests/s.

The server (FastAPI/uvicorn) is not in the loop: the GPU machine has neither, and the
HTTP layer adds the same small cost to both sides.

Usage: ``python bench/serve_latency.py [--clients 8] [--requests 4] [--out results.json]``;
``--smoke`` runs a 2-layer model of small widths (on CPU if there is no GPU) to check the
script.  Results go to ``--out``, else ``$OUT/serve_latency.json``, else
``./serve_latency.json``; a markdown table is printed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

try:
    import vistune  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))

from vistune.inference import GenerationRequest, SamplingParams
from vistune.inference.transformers_engine import TransformersEngine
from vistune.templates import Sample

IMAGE_TOKEN = 32000
IMAGE_TOKENS = 576
TEXT_TOKENS = 11  # "USER: <image>\nWhat is shown in this image? ASSISTANT:" around the image
NEW_TOKENS = 64


def llava_config(smoke: bool):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if smoke:
        vision = CLIPVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=336, patch_size=14, projection_dim=64)  # fmt: skip
        text = LlamaConfig(hidden_size=128, intermediate_size=256, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=4, vocab_size=32064, max_position_embeddings=4096)  # fmt: skip
    else:  # openai/clip-vit-large-patch14-336 and meta-llama/Llama-2-7b-hf
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                  image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")  # fmt: skip
        text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                           num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5)  # fmt: skip
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, image_seq_length=IMAGE_TOKENS,
                       vision_feature_layer=-2, vision_feature_select_strategy="default", projector_hidden_act="gelu")  # fmt: skip


def build_model(config, device: str, dtype):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    with torch.device(device):
        model = LlavaForConditionalGeneration._from_config(config, dtype=dtype, attn_implementation="sdpa")
    generation = model.generation_config
    generation.eos_token_id, generation.pad_token_id, generation.bos_token_id = 2, 0, 1
    return model.eval()


def make_prompts(n: int, dtype) -> list[dict]:
    """Encoded prompts as the llava-1.5 template gives them: ids with 576 image tokens, pixel values."""
    gen = torch.Generator().manual_seed(0)
    prompts = []
    for _ in range(n):
        text = torch.randint(100, 31000, (TEXT_TOKENS - 1,), generator=gen).tolist()
        ids = [1] + text[:4] + [IMAGE_TOKEN] * IMAGE_TOKENS + text[4:]
        pixels = torch.randn(1, 3, 336, 336, generator=gen).to(dtype)
        prompts.append({"input_ids": ids, "pixel_values": pixels})
    return prompts


class PreEncoded:
    """An Encoder over prompts encoded in advance (``sample.columns["prompt"]`` indexes them)."""

    def __init__(self, prompts: list[dict]):
        self.prompts = prompts

    def encode_prompt(self, sample: Sample) -> dict:
        return dict(self.prompts[sample.columns["prompt"]])

    def encode(self, sample: Sample):
        raise NotImplementedError

    def decode(self, token_ids) -> str:
        return " ".join(str(t) for t in token_ids)  # costs about what a tokenizer's decode does


class Tokenizer:
    """What the engine reads from a processor: pad/eos ids and a length."""

    pad_token_id, eos_token_id = 0, 2

    def __len__(self) -> int:
        return 32064


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summary(name: str, ttfts: list[float], latencies: list[float], wall: float, clients: int) -> dict:
    return {
        "setting": name,
        "clients": clients,
        "requests": len(latencies),
        "requests_per_s": len(latencies) / wall,
        "ttft_p50_ms": statistics.median(ttfts) * 1000,
        "ttft_p95_ms": percentile(ttfts, 0.95) * 1000,
        "latency_p50_s": statistics.median(latencies),
        "latency_p95_s": percentile(latencies, 0.95),
        "tokens_per_s": len(latencies) * NEW_TOKENS / wall,
        "wall_s": wall,
    }


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def run_plain(model, prompts: list[dict], device: str) -> dict:
    from transformers.generation.streamers import BaseStreamer

    class FirstToken(BaseStreamer):
        def __init__(self):
            self.calls, self.at = 0, None

        def put(self, value):
            self.calls += 1
            if self.calls == 2 and self.at is None:  # the first put is the prompt
                self.at = time.perf_counter()

        def end(self):
            pass

    def one(prompt):
        streamer = FirstToken()
        started = time.perf_counter()
        with torch.inference_mode():
            out = model.generate(input_ids=torch.tensor([prompt["input_ids"]], device=device),
                                 pixel_values=prompt["pixel_values"].to(device), max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, do_sample=False, streamer=streamer)  # fmt: skip
        synchronize()
        assert out.shape[1] == len(prompt["input_ids"]) + NEW_TOKENS
        return streamer.at - started, time.perf_counter() - started

    one(prompts[0])  # warm-up
    ttfts, latencies = [], []
    started = time.perf_counter()
    for prompt in prompts:
        ttft, latency = one(prompt)
        ttfts.append(ttft)
        latencies.append(latency)
    return summary("plain generate, sequential", ttfts, latencies, time.perf_counter() - started, 1)


def run_engine(engine: TransformersEngine, n_prompts: int, clients: int, per_client: int) -> dict:
    params = SamplingParams(max_tokens=NEW_TOKENS, ignore_eos=True)

    async def request(k: int):
        started = time.perf_counter()
        first, tokens = None, 0
        async for event in engine.stream(GenerationRequest(Sample([], columns={"prompt": k % n_prompts}), params)):
            if first is None and event.token_ids:
                first = time.perf_counter()
            tokens += len(event.token_ids)
        assert tokens == NEW_TOKENS, tokens
        return first - started, time.perf_counter() - started

    async def client(c: int):
        return [await request(c * per_client + r) for r in range(per_client)]

    async def main():
        await asyncio.gather(*[request(k) for k in range(min(clients, 2))])  # warm-up
        started = time.perf_counter()
        results = await asyncio.gather(*[client(c) for c in range(clients)])
        return [x for rs in results for x in rs], time.perf_counter() - started

    results, wall = asyncio.run(main())
    name = f"vistune TransformersEngine, {clients} concurrent client(s)"
    return summary(name, [t for t, _ in results], [lat for _, lat in results], wall, clients)


def table(rows: list[dict]) -> str:
    lines = ["| setting | clients | requests | req/s | TTFT p50 (ms) | TTFT p95 (ms) | latency p50 (s) | latency p95 (s) | tokens/s |",
             "|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for r in rows:
        lines.append(f"| {r['setting']} | {r['clients']} | {r['requests']} | {r['requests_per_s']:.2f} | "
                     f"{r['ttft_p50_ms']:.0f} | {r['ttft_p95_ms']:.0f} | {r['latency_p50_s']:.2f} | "
                     f"{r['latency_p95_s']:.2f} | {r['tokens_per_s']:.0f} |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=4, help="requests per client")
    parser.add_argument("--plain-requests", type=int, default=8, help="requests for the sequential baseline")
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--smoke", action="store_true", help="a small 2-layer model, to check the script")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()

    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    out = Path(args.out or Path(os.environ.get("OUT", ".")) / "serve_latency.json")
    import transformers

    meta = {
        "device": torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "transformers": transformers.__version__, "smoke": args.smoke,
        "model": "Llava-1.5-7B shape, random weights" if not args.smoke else "2-layer smoke model",
        "dtype": str(dtype).replace("torch.", ""), "prompt_tokens": IMAGE_TOKENS + TEXT_TOKENS, "new_tokens": NEW_TOKENS,
        "max_batch_size": args.max_batch_size,
    }  # fmt: skip
    print(json.dumps(meta), flush=True)
    model = build_model(llava_config(args.smoke), device, dtype)
    prompts = make_prompts(max(args.clients * args.requests, args.plain_requests), dtype)
    rows = []

    def save():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"meta": meta, "results": rows}, indent=2) + "\n")

    rows.append(run_plain(model, prompts[: args.plain_requests], device))
    print(table(rows[-1:]), flush=True)
    save()
    engine = TransformersEngine.from_model(model, Tokenizer(), PreEncoded(prompts), max_batch_size=args.max_batch_size)
    try:
        rows.append(run_engine(engine, len(prompts), 1, 2))
        print(table(rows[-1:]), flush=True)
        rows.append(run_engine(engine, len(prompts), args.clients, args.requests))
        save()
    finally:
        engine.close()
    plain, concurrent = rows[0], rows[-1]
    speedup = concurrent["requests_per_s"] / plain["requests_per_s"]
    meta["speedup_requests_per_s"] = speedup
    meta["targets"] = {
        "ttft_p50_under_350ms": concurrent["ttft_p50_ms"] < 350,
        "requests_per_s_at_least_3x": speedup >= 3,
    }
    save()
    print(f"\n{meta['device']}, torch {meta['torch']}, transformers {meta['transformers']}, {meta['model']}, "
          f"{meta['prompt_tokens']} prompt tokens (1 image), {NEW_TOKENS} new tokens\n")  # fmt: skip
    print(table(rows))
    print(f"\nrequests/s: {speedup:.2f}x the sequential baseline; TTFT p50 under {args.clients} clients: "
          f"{concurrent['ttft_p50_ms']:.0f} ms; targets met: {meta['targets']}\nresults: {out}")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
