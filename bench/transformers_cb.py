"""Can transformers' own continuous batching serve vistune's prompts?  Checks and a CPU timing.

transformers 5.x ships a continuous-batching engine with a paged KV cache
(``model.generate_batch``, ``model.init_continuous_batching`` ->
``ContinuousBatchingManager``, transformers/generation/continuous_batching/).  Its
requests are token ids only (``add_request(input_ids, max_new_tokens, eos_token_id,
streaming, ...)``) and its model call is ``model(input_ids, position_ids, cu_seq_lens_q,
cache, ...)`` over all requests flattened into one row, with 1-D positions.  This script
checks, on the CPU with vistune's tiny checkpoints and prompts encoded by vistune's own
template encoder (the ones ``vistune serve`` would batch):

1. ``text``: tiny Llama, greedy: ``generate_batch`` against ``generate`` per prompt;
2. ``llava`` ``ids_only``: tiny Llava, the prompt's ids (576-style image placeholder run)
   given to ``generate_batch`` as they are: the pixels have no way in;
3. ``llava`` ``feature_table``: the same with the image features put in through the input
   embedding: each image's rows are written to a table and its placeholders replaced by
   ids past the vocabulary that index the table (a wrapper around ``embed_tokens``);
4. the same wrapper for Llava-NeXT (anyres tiles, 1-D positions like Llava) and for Qwen2-VL, whose image tokens need
   3-D (M-RoPE) positions that the manager does not compute;
5. ``streaming``: one streamed request (``add_request(streaming=True)``) and per-request
   ``eos_token_id=-1`` (ignore end-of-sequence) and ``max_new_tokens``;
6. ``timing``: ``--requests`` text prompts x ``--new-tokens`` tokens, all submitted at
   once: sequential ``generate``, the manager (built once, its cache sized with
   ``num_blocks``), and vistune's engine (``TransformersEngine.generate``); fastest of
   ``--repeats``.

Run: ``python bench/transformers_cb.py [--out FILE]`` (~1 minute on 2 cores).  The
findings are written up in bench/results/serve_engine_choice.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "core"))
PROMPTS = [
    "a red circle",
    "There is a blue square next to a green star on the left of the picture.",
    "How many shapes are there?",
    "Q: What colour is the star? A:",
    "the small yellow triangle is at the top",
]
#: A fixed, small paged cache: by default the manager sizes its cache from the device's
#: memory, on the CPU 60-90% of the machine's RAM (psutil), which takes tens of seconds to fill.
NUM_BLOCKS = 32


def engine_for(model_type: str, path: Path, max_batch_size: int = 8):
    from vistune.config import RunConfig
    from vistune.inference.transformers_engine import TransformersEngine
    from vistune.plugins import get_plugin_manager

    spec = get_plugin_manager().registries.models.get(model_type)
    return TransformersEngine(str(path), spec, RunConfig(task="infer", device="cpu", max_batch_size=max_batch_size))


def encoded(engine, text: str, images=()) -> dict:
    from vistune.templates import Sample

    return engine.encoder.encode_prompt(Sample([{"role": "user", "content": text}], list(images)))


def reference(model, inputs: dict, new_tokens: int) -> list[int]:
    """``generate`` of one prompt alone, greedy, ``new_tokens`` tokens, end-of-sequence not stopping it.

    (``min_new_tokens`` would not do: it forbids end-of-sequence, so the next-best token
    is chosen where the engines, told to ignore it, emit it and go on.)
    """
    return reference_with_logprobs(model, inputs, new_tokens)[0]


def reference_with_logprobs(model, inputs: dict, new_tokens: int) -> tuple[list[int], list[float]]:
    """:func:`reference`'s tokens and the log-probability ``generate`` gave each."""
    kwargs = {k: torch.tensor([v]) if isinstance(v, list) else v for k, v in inputs.items()}
    with torch.inference_mode():
        out = model.generate(**kwargs, max_new_tokens=new_tokens, do_sample=False, eos_token_id=None,
                             output_logits=True, return_dict_in_generate=True)  # fmt: skip
    ids = out.sequences[0, len(inputs["input_ids"]) :].tolist()
    assert len(ids) == new_tokens, f"generate stopped after {len(ids)} of {new_tokens} tokens"
    logprobs = [torch.log_softmax(step[0].float(), -1)[token].item() for step, token in zip(out.logits, ids)]
    return ids, logprobs


def cb_batch(model, prompts: list[list[int]], new_tokens: int, logprobs: bool = False, batch_tokens: int = 2048) -> list:
    """``generate_batch`` greedy, end-of-sequence off, a small fixed cache: each prompt's
    tokens (with ``logprobs``: ``(tokens, log-probabilities)``).  ``batch_tokens``: tokens
    per model call; a longer prompt is prefilled in pieces (chunked prefill)."""
    from transformers.generation import ContinuousBatchingConfig, GenerationConfig

    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1)
    cb = ContinuousBatchingConfig(num_blocks=NUM_BLOCKS, max_batch_tokens=batch_tokens, return_logprobs=logprobs)
    out = model.generate_batch(prompts, generation_config=config, continuous_batching_config=cb, warmup=False)
    return [(o.generated_tokens, o.logprobs) if logprobs else o.generated_tokens for o in out.values()]


class FeatureTableEmbedding(nn.Module):
    """An input embedding that also looks up image features: ids past the vocabulary index a table of them.

    The manager only moves token ids; an image's placeholders become ids that stand for its
    rows in the table, so chunked prefill and batching need no knowledge of images.
    """

    def __init__(self, embed: nn.Embedding, capacity: int):
        super().__init__()
        self.embed = embed
        self.vocab = embed.num_embeddings
        self.register_buffer("table", torch.zeros(capacity, embed.weight.shape[1], dtype=embed.weight.dtype))
        self.used = 0

    def add(self, features: torch.Tensor) -> list[int]:
        """Store ``features`` (rows, hidden); return the ids that stand for them."""
        rows = features.shape[0]
        self.table[self.used : self.used + rows] = features.to(self.table.dtype)
        ids = list(range(self.vocab + self.used, self.vocab + self.used + rows))
        self.used += rows
        return ids

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        is_feature = input_ids >= self.vocab
        text = self.embed(input_ids.clamp(max=self.vocab - 1))
        feature = self.table[(input_ids - self.vocab).clamp(min=0, max=self.table.shape[0] - 1)]
        return torch.where(is_feature.unsqueeze(-1), feature, text)


def feature_table_prompts(model, prompts: list[dict], image_token: int) -> tuple[list[list[int]], object]:
    """Ids of ``prompts`` with their image placeholders replaced by feature-table ids (the wrapper installed)."""
    inner = model.model
    original = inner.get_input_embeddings()
    table = FeatureTableEmbedding(original, capacity=4096)
    out = []
    with torch.inference_mode():
        for inputs in prompts:
            vision = {k: torch.as_tensor(v) for k, v in inputs.items() if k in ("pixel_values", "image_sizes",
                                                                               "image_grid_thw")}  # fmt: skip
            features = inner.get_image_features(**vision)
            features = getattr(features, "pooler_output", features)  # older releases return the features themselves
            ids = table.add(torch.cat(list(features), dim=0))
            row, k = [], 0
            for token in inputs["input_ids"]:
                if token == image_token:
                    row.append(ids[k])
                    k += 1
                else:
                    row.append(token)
            assert k == len(ids), (k, len(ids))
            out.append(row)
    inner.set_input_embeddings(table)
    return out, original


def check_vlm(kind: str, model_type: str, new_tokens: int, side: int) -> dict:
    """Greedy ``generate_batch`` of three one-image prompts against ``generate`` with the pixels.

    ``side``: the pictures' size in pixels; Qwen2-VL needs 64 (4 image tokens in a 2x2
    grid) for its 3-D positions to differ from 1-D ones (at 32 an image is one token).
    """
    from PIL import Image

    from vistune import tiny_models

    engine = engine_for(model_type, tiny_models.tiny_model_path(kind))
    try:
        model = engine.model
        image_token = model.config.image_token_id
        # the same question about three pictures: only the pixels tell the prompts apart
        prompts = [encoded(engine, "<image>\nWhat is in the picture?", [Image.new("RGB", (side, side), colour)])
                   for colour in ("red", "blue", "green")]  # fmt: skip
        references = [reference_with_logprobs(model, p, new_tokens) for p in prompts]
        expected = [tokens for tokens, _ in references]
        result = {"image_tokens": prompts[0]["input_ids"].count(image_token),
                  "images_change_generate": len({tuple(e) for e in expected}) == len(expected)}  # fmt: skip
        if kind == "llava":
            got = cb_batch(model, [p["input_ids"] for p in prompts], new_tokens)
            result["ids_only_equal"] = [g == e for g, e in zip(got, expected)]
            result["ids_only_distinct_outputs"] = len({tuple(g) for g in got})
        ids, original = feature_table_prompts(model, prompts, image_token)
        try:
            got = cb_batch(model, ids, new_tokens, logprobs=True)
            split = cb_batch(model, ids, new_tokens, batch_tokens=24)  # prompts prefilled in pieces
        finally:
            model.model.set_input_embeddings(original)
        result["feature_table_equal"] = [tokens == e for (tokens, _), e in zip(got, expected)]
        result["feature_table_chunked_prefill_equal"] = [tokens == e for tokens, e in zip(split, expected)]
        # tiny random models pick the same tokens under small errors: the log-probabilities show them
        result["feature_table_max_logprob_diff"] = max(
            abs(a - b) for (_, got_lp), (_, ref_lp) in zip(got, references) for a, b in zip(got_lp, ref_lp)
        )
        return result
    finally:
        engine.close()


def check_streaming(model, tokenizer) -> dict:
    from transformers.generation import ContinuousBatchingConfig, GenerationConfig

    config = GenerationConfig(max_new_tokens=64, do_sample=False, eos_token_id=tokenizer.eos_token_id)
    manager = model.init_continuous_batching(generation_config=config,
                                             continuous_batching_config=ContinuousBatchingConfig(num_blocks=NUM_BLOCKS))  # fmt: skip
    manager.start()
    try:
        ids = tokenizer(PROMPTS[0])["input_ids"]
        request = manager.add_request(ids, max_new_tokens=12, streaming=True, eos_token_id=-1)
        events = [len(o.generated_tokens) for o in manager.request_id_iter(request)]
    finally:
        manager.stop(block=True)
    return {"events": len(events), "tokens_per_event": events}


def timing(engine, requests: int, new_tokens: int, repeats: int) -> dict:
    """Seconds to answer ``requests`` prompts submitted at once, fastest of ``repeats`` runs per path."""
    from transformers.generation import ContinuousBatchingConfig, GenerationConfig

    from vistune.inference import GenerationRequest, SamplingParams

    model = engine.model
    prompts = [encoded(engine, PROMPTS[i % len(PROMPTS)] + f" {i}") for i in range(requests)]
    ids = [p["input_ids"] for p in prompts]
    times: dict[str, list[float]] = {"generate_sequential_s": [], "generate_batch_s": [], "vistune_engine_s": []}
    for _ in range(repeats):
        start = time.perf_counter()
        expected = [reference(model, p, new_tokens) for p in prompts]
        times["generate_sequential_s"].append(time.perf_counter() - start)

    config = GenerationConfig(max_new_tokens=new_tokens, do_sample=False, eos_token_id=-1)
    cb = ContinuousBatchingConfig(num_blocks=NUM_BLOCKS, max_batch_tokens=2048)
    with torch.inference_mode():
        manager = model.init_continuous_batching(generation_config=config, continuous_batching_config=cb)
        manager.start()
    try:
        for _ in range(repeats):
            start = time.perf_counter()
            request_ids = manager.add_requests(ids, max_new_tokens=new_tokens)
            done = {}
            while len(done) < len(request_ids):
                result = manager.get_result(timeout=5)
                if result is not None and result.is_finished():
                    done[result.request_id] = result.generated_tokens
            times["generate_batch_s"].append(time.perf_counter() - start)
    finally:
        manager.stop(block=True)
    cb_equal = sum(done[r] == e for r, e in zip(request_ids, expected))

    sampling = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    for _ in range(repeats):
        start = time.perf_counter()
        results = engine.generate([GenerationRequest(p, sampling) for p in ids])
        times["vistune_engine_s"].append(time.perf_counter() - start)
    vistune_equal = sum(r.outputs[0].token_ids == e for r, e in zip(results, expected))
    return {
        "requests": requests, "new_tokens": new_tokens, "max_batch_size": engine.max_batch_size,
        **{name: round(min(values), 3) for name, values in times.items()},
        "generate_batch_equal": f"{cb_equal}/{requests}", "vistune_equal": f"{vistune_equal}/{requests}",
    }  # fmt: skip


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import transformers

    from vistune import tiny_models

    torch.manual_seed(0)
    report = {"transformers": transformers.__version__, "torch": torch.__version__, "threads": torch.get_num_threads()}
    engine = engine_for("causal-lm", tiny_models.tiny_model_path("llama"), max_batch_size=args.requests)
    try:
        prompts = [encoded(engine, p) for p in PROMPTS]
        expected = [reference(engine.model, p, 16) for p in prompts]
        got = cb_batch(engine.model, [p["input_ids"] for p in prompts], 16)
        report["text_equal"] = [g == e for g, e in zip(got, expected)]
        report["streaming"] = check_streaming(engine.model, engine.tokenizer)
        report["timing"] = timing(engine, args.requests, args.new_tokens, args.repeats)
    finally:
        engine.close()
    report["llava"] = check_vlm("llava", "llava", 12, side=32)
    report["llava_next"] = check_vlm("llava-next", "llava-next", 12, side=64)
    report["qwen2_vl"] = check_vlm("qwen2-vl", "qwen2-vl", 12, side=64)
    text = json.dumps(report, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
