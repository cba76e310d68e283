"""Chunked prefill: where prompts are cut, and that the engine's chunked prefills stay exact
and let running rows decode between chunks."""

from __future__ import annotations

import asyncio

import pytest

from vistune.inference.prefill_chunks import chunk_bounds, media_token_ids


def test_a_prompt_within_the_budget_is_one_call():
    assert chunk_bounds({"input_ids": list(range(8))}, 8, set()) is None


def test_a_text_prompt_is_cut_every_budget_tokens():
    assert chunk_bounds({"input_ids": list(range(20)), "attention_mask": [1] * 20}, 8, set()) == [8, 16, 20]


def test_the_first_chunk_reaches_past_the_last_image_placeholder():
    ids = [1, 2] + [99] * 10 + [3] * 9  # 21 tokens, placeholders at 2..11
    assert chunk_bounds({"input_ids": ids, "pixel_values": object()}, 4, {99}) == [12, 16, 20, 21]
    # placeholders early on: the budget decides
    assert chunk_bounds({"input_ids": [99, 99] + [3] * 10, "pixel_values": object()}, 4, {99}) == [4, 8, 12]


def test_media_the_model_cannot_place_are_not_cut():
    """Pixels but no known placeholder token: only one call keeps features and tokens together."""
    assert chunk_bounds({"input_ids": list(range(20)), "pixel_values": object()}, 4, set()) is None
    assert chunk_bounds({"input_ids": list(range(20)), "pixel_values": None}, 4, set()) == [4, 8, 12, 16, 20]


def test_media_token_ids_come_from_the_config():
    class Config:
        image_token_id = 7
        video_token_index = 9
        image_token_index = None

    assert media_token_ids(Config()) == {7, 9}
    assert media_token_ids(None) == set()


# -- the engine --------------------------------------------------------------------------------

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from vistune.inference import GenerationRequest, SamplingParams, collect  # noqa: E402
from test_infer_engine import PROMPTS, _images, chat, engine_for, greedy_without_cache, reference_ids, truncated_at_eos  # noqa: E402


def record_calls(engine) -> list[tuple[str, int]]:
    """Log the engine's model calls in order: ("prefill", chunk end) and ("decode", rows)."""
    calls: list[tuple[str, int]] = []
    prefill_call, decode_step = engine._prefill_call, engine._decode_step

    def prefill(p):
        calls.append(("prefill", p.bounds[0]))
        return prefill_call(p)

    def decode():
        calls.append(("decode", len(engine._rows)))
        return decode_step()

    engine._prefill_call, engine._decode_step = prefill, decode
    return calls


def generate_recorded(engine, sample, tokens: int):
    """``engine``'s greedy result for ``sample`` alone and its model calls; the engine is closed after."""
    calls = record_calls(engine)
    try:
        return engine.generate([GenerationRequest(sample, SamplingParams(max_tokens=tokens))])[0], calls
    finally:
        engine.close()


def test_running_rows_decode_between_the_chunks_of_a_long_prompt(tiny_llama, plugin_manager):
    engine = engine_for("causal-lm", plugin_manager, tiny_llama, prefill_chunk_tokens=6)
    long_prompt = PROMPTS[1]
    length = len(engine.encoder.encode_prompt(chat(long_prompt))["input_ids"])
    assert length > 12  # at least three chunks
    calls = record_calls(engine)
    try:

        async def scenario():
            running = engine.stream(GenerationRequest(chat(PROMPTS[0]), SamplingParams(max_tokens=40, ignore_eos=True)))
            tokens, late = [], None
            async for event in running:
                tokens.extend(event.token_ids)
                if len(tokens) == 2:
                    late = asyncio.ensure_future(
                        collect(engine.stream(GenerationRequest(chat(long_prompt), SamplingParams(max_tokens=8))))
                    )
            return tokens, await late

        tokens, late = asyncio.run(scenario())
    finally:
        engine.close()
    assert tokens == greedy_without_cache(engine, PROMPTS[0], 40)
    assert late.outputs[0].token_ids == truncated_at_eos(reference_ids(engine, chat(long_prompt), 8), engine.eos_ids)
    first_decode = calls.index(("decode", 1))
    chunks = [i for i, (kind, end) in enumerate(calls) if kind == "prefill" and i > first_decode]  # the late prompt's
    assert [calls[i][1] for i in chunks] == list(range(6, length, 6)) + [length]
    # a decode step of the running row after every chunk but the last
    for i in chunks[:-1]:
        assert calls[i + 1] == ("decode", 1)


def test_an_image_prompt_is_chunked_after_its_image_and_matches_generate(tiny_llava, plugin_manager):
    engine = engine_for("llava", plugin_manager, tiny_llava, prefill_chunk_tokens=4)
    sample = chat("<image>\nWhat shape is it, and where is it in the picture? Say it in one short sentence.",
                  [_images()[1]])  # fmt: skip
    ids = engine.encoder.encode_prompt(sample)["input_ids"]
    last_placeholder = max(i for i, t in enumerate(ids) if t in engine._media_tokens)
    result, calls = generate_recorded(engine, sample, 12)
    assert result.outputs[0].token_ids == truncated_at_eos(reference_ids(engine, sample, 12), engine.eos_ids)
    ends = [end for kind, end in calls if kind == "prefill"]
    assert ends[0] == max(4, last_placeholder + 1) and ends[-1] == len(ids) and len(ends) > 2


def test_models_with_3d_positions_prefill_in_one_call(tiny_qwen2_vl, plugin_manager):
    """Qwen2-VL computes its rotary positions over the whole prompt: no chunks, still exact."""
    engine = engine_for("qwen2-vl", plugin_manager, tiny_qwen2_vl, prefill_chunk_tokens=4)
    sample = chat("<image>\nDescribe the image.", [_images()[0]])
    result, calls = generate_recorded(engine, sample, 8)
    assert result.outputs[0].token_ids == truncated_at_eos(reference_ids(engine, sample, 8), engine.eos_ids)
    assert [kind for kind, _ in calls].count("prefill") == 1
