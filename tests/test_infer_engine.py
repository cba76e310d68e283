"""The transformers engine, checked against plain ``transformers`` ``generate`` and peft.

Greedy completions from the continuous-batching engine (batched, left-padded, rows
joining and leaving mid-generation) must equal what ``model.generate`` produces for
each prompt alone, for a text model, Llava and Qwen2-VL (multimodal rotary positions).
"""

from __future__ import annotations

import asyncio

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from vistune.config import RunConfig
from vistune.inference import GenerationRequest, RequestError, SamplingParams, collect
from vistune.inference.sampling import RowSampler, sample_next, top_p_filter
from vistune.inference.transformers_engine import TransformersEngine
from vistune.templates import Sample

PROMPTS = [
    "a red circle",
    "There is a blue square next to a green star on the left of the picture.",
    "How many shapes are there?",
    "Q: What colour is the star? A:",
]


def chat(text: str, images=()) -> Sample:
    return Sample([{"role": "user", "content": text}], list(images))


def reference_ids(engine: TransformersEngine, sample, max_new_tokens: int, model=None) -> list[int]:
    """``generate`` of the prompt alone, greedy, on the same model and encoding."""
    model = model or engine.model
    inputs = engine.encoder.encode_prompt(sample) if isinstance(sample, Sample) else {"input_ids": list(sample)}
    kwargs = {k: torch.tensor([v]) if isinstance(v, list) else v for k, v in inputs.items()}
    with torch.inference_mode():
        out = model.generate(**kwargs, max_new_tokens=max_new_tokens, do_sample=False)
    return out[0, len(inputs["input_ids"]) :].tolist()


def greedy_without_cache(engine: TransformersEngine, prompt: str, tokens: int, model=None) -> list[int]:
    """``tokens`` greedy tokens after ``prompt``, each from a full forward pass without a cache,
    past end-of-sequence tokens: the reference for ``ignore_eos`` requests."""
    model = model or engine.model
    with torch.inference_mode():
        ids = torch.tensor([engine.encoder.encode_prompt(chat(prompt))["input_ids"]])
        for _ in range(tokens):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
    return ids[0, -tokens:].tolist()


def truncated_at_eos(ids: list[int], eos: set[int]) -> list[int]:
    for i, token in enumerate(ids):
        if token in eos:
            return ids[: i + 1]
    return ids


def engine_for(model_type: str, plugin_manager, path, **config) -> TransformersEngine:
    spec = plugin_manager.registries.models.get(model_type)
    return TransformersEngine(str(path), spec, RunConfig(task="infer", device="cpu", **config))


@pytest.fixture(scope="module")
def llama_engine(tiny_llama):
    from vistune.plugins import get_plugin_manager

    engine = engine_for("causal-lm", get_plugin_manager(), tiny_llama, max_batch_size=4)
    yield engine
    engine.close()


def test_batched_greedy_equals_generate_per_prompt(llama_engine):
    results = llama_engine.generate([GenerationRequest(chat(p), SamplingParams(max_tokens=16)) for p in PROMPTS])
    for prompt, result in zip(PROMPTS, results):
        expected = truncated_at_eos(reference_ids(llama_engine, chat(prompt), 16), llama_engine.eos_ids)
        assert result.outputs[0].token_ids == expected
        assert result.prompt_tokens == len(llama_engine.encoder.encode_prompt(chat(prompt))["input_ids"])
        assert result.completion_tokens == len(expected)
        assert result.text == llama_engine.tokenizer.decode(
            [t for t in expected if t not in llama_engine.eos_ids], skip_special_tokens=True
        )


def test_rows_joining_a_running_batch_match_generate(llama_engine):
    """Requests arriving while another is decoding join its batch (padding re-aligned) and stay exact."""

    async def scenario():
        long_request = GenerationRequest(chat(PROMPTS[0]), SamplingParams(max_tokens=120, ignore_eos=True))
        order: list[str] = []
        stream = llama_engine.stream(long_request)
        tokens: list[int] = []
        joined = []
        async for event in stream:
            tokens.extend(event.token_ids)
            if event.finish_reason:
                order.append("long finished")
            if len(tokens) == 3:

                async def late(prompt):
                    result = await collect(
                        llama_engine.stream(GenerationRequest(chat(prompt), SamplingParams(max_tokens=10)))
                    )
                    order.append("late finished")
                    return result

                joined = [asyncio.ensure_future(late(p)) for p in PROMPTS[1:]]
        return tokens, [await j for j in joined], order

    tokens, late_results, order = asyncio.run(scenario())
    # The late requests finished first: they ran inside the long request's batch, not after it.
    assert order.index("long finished") == len(order) - 1
    # ignore_eos: the reference is plain greedy decoding that does not stop at end-of-sequence tokens
    assert tokens == greedy_without_cache(llama_engine, PROMPTS[0], 120)
    for prompt, result in zip(PROMPTS[1:], late_results):
        assert result.outputs[0].token_ids == truncated_at_eos(
            reference_ids(llama_engine, chat(prompt), 10), llama_engine.eos_ids
        )


def test_stream_deltas_add_up_to_the_completion(llama_engine):
    request = GenerationRequest(chat(PROMPTS[1]), SamplingParams(max_tokens=20))
    whole = llama_engine.generate([request])[0]

    async def pieces():
        return [
            event
            async for event in llama_engine.stream(GenerationRequest(chat(PROMPTS[1]), SamplingParams(max_tokens=20)))
        ]

    events = asyncio.run(pieces())
    assert "".join(e.text for e in events) == whole.text
    assert [t for e in events for t in e.token_ids] == whole.outputs[0].token_ids
    assert [e.finish_reason for e in events][-1] == whole.outputs[0].finish_reason
    assert all(e.finish_reason is None for e in events[:-1])


def test_stop_string_cuts_the_text_before_it(llama_engine):
    free = llama_engine.generate([GenerationRequest(chat(PROMPTS[2]), SamplingParams(max_tokens=24))])[0].text
    words = [w for w in free.split(" ") if len(w) >= 2]
    assert words, free
    stop = words[len(words) // 2]
    cut = free[: free.index(stop)]
    result = llama_engine.generate([GenerationRequest(chat(PROMPTS[2]), SamplingParams(max_tokens=24, stop=[stop]))])[0]
    assert result.text == cut
    assert result.outputs[0].finish_reason == "stop"

    async def streamed():
        request = GenerationRequest(chat(PROMPTS[2]), SamplingParams(max_tokens=24, stop=[stop]))
        return "".join([e.text async for e in llama_engine.stream(request)])

    assert asyncio.run(streamed()) == cut


def test_max_tokens_and_end_of_sequence_finish_reasons(llama_engine, tiny_llama):
    short = llama_engine.generate([GenerationRequest(chat(PROMPTS[0]), SamplingParams(max_tokens=3))])[0]
    assert len(short.outputs[0].token_ids) == 3 and short.outputs[0].finish_reason == "length"
    # Make the greedy third token an end-of-sequence token: the completion stops there, without its text.
    greedy = reference_ids(llama_engine, chat(PROMPTS[0]), 3)
    engine = TransformersEngine.from_model(llama_engine.model, llama_engine.processor, llama_engine.encoder)
    try:
        engine.eos_ids = {greedy[2]}
        result = engine.generate([GenerationRequest(chat(PROMPTS[0]), SamplingParams(max_tokens=10))])[0]
        assert result.outputs[0].token_ids == greedy
        assert result.outputs[0].finish_reason == "stop"
        assert result.text == llama_engine.tokenizer.decode(greedy[:2], skip_special_tokens=True)
        ignored = engine.generate(
            [GenerationRequest(chat(PROMPTS[0]), SamplingParams(max_tokens=10, ignore_eos=True))]
        )[0]
        assert len(ignored.outputs[0].token_ids) == 10
    finally:
        engine.close()


def test_seeded_sampling_is_reproducible_and_n_completions_differ(llama_engine):
    params = SamplingParams(max_tokens=12, temperature=1.0, n=3, seed=1234)
    first = llama_engine.generate([GenerationRequest(chat(PROMPTS[3]), params)])[0]
    # same request again, this time sharing its batch with other work
    again = llama_engine.generate(
        [GenerationRequest(chat(PROMPTS[0]), SamplingParams(max_tokens=5)), GenerationRequest(chat(PROMPTS[3]), params)]
    )[1]
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in again.outputs]
    assert len({tuple(o.token_ids) for o in first.outputs}) == 3
    assert first.completion_tokens == sum(len(o.token_ids) for o in first.outputs)


def test_seed_at_the_top_of_the_range_does_not_fail_its_batch(llama_engine):
    """Completion i is seeded seed + i, past 64 bits here; the greedy request prefilled with it is unharmed."""
    top = SamplingParams(max_tokens=6, temperature=1.0, n=2, seed=2**64 - 1)
    greedy, first = llama_engine.generate(
        [GenerationRequest(chat(PROMPTS[0]), SamplingParams(max_tokens=8)), GenerationRequest(chat(PROMPTS[3]), top)]
    )
    assert greedy.outputs[0].token_ids == truncated_at_eos(
        reference_ids(llama_engine, chat(PROMPTS[0]), 8), llama_engine.eos_ids
    )
    again = llama_engine.generate([GenerationRequest(chat(PROMPTS[3]), top)])[0]
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in again.outputs]
    assert all(o.token_ids for o in first.outputs)


def test_tiny_top_p_is_greedy(llama_engine):
    greedy = llama_engine.generate([GenerationRequest(chat(PROMPTS[1]), SamplingParams(max_tokens=12))])[0]
    nucleus = llama_engine.generate(
        [GenerationRequest(chat(PROMPTS[1]), SamplingParams(max_tokens=12, temperature=1.0, top_p=1e-6, seed=7))]
    )[0]
    assert nucleus.outputs[0].token_ids == greedy.outputs[0].token_ids


def test_top_p_keeps_the_tokens_transformers_keeps():
    from transformers.generation.logits_process import TopPLogitsWarper

    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0, -1.0, -3.0], [0.1, 0.2, 0.3, 0.4, 3.0, 0.0]])
    for top_p in (0.3, 0.6, 0.9, 0.99):
        kept = top_p_filter(torch.softmax(logits, -1), torch.full((2, 1), top_p)) > 0
        reference = torch.isfinite(TopPLogitsWarper(top_p, min_tokens_to_keep=1)(None, logits.clone()))
        assert torch.equal(kept, reference), top_p


def test_sampling_follows_the_softmax_distribution():
    logits = torch.tensor([[1.5, 0.5, 0.0, -1.0]])
    rows = [RowSampler.make(0.8, 1.0, seed=3)]
    draws = torch.tensor([sample_next(logits, rows)[0] for _ in range(6000)])
    frequencies = torch.bincount(draws, minlength=4).float() / len(draws)
    assert torch.allclose(frequencies, torch.softmax(logits[0] / 0.8, -1), atol=0.025)


def test_raw_text_and_token_id_prompts(llama_engine):
    ids = llama_engine.tokenizer("a red circle")["input_ids"]
    text_result, ids_result = llama_engine.generate(
        [
            GenerationRequest("a red circle", SamplingParams(max_tokens=8)),
            GenerationRequest(list(ids), SamplingParams(max_tokens=8)),
        ]
    )
    expected = truncated_at_eos(reference_ids(llama_engine, ids, 8), llama_engine.eos_ids)
    assert text_result.outputs[0].token_ids == expected == ids_result.outputs[0].token_ids


def test_requests_that_do_not_fit_are_refused(llama_engine):
    long_prompt = " ".join(["red circle"] * 1500)
    with pytest.raises(RequestError) as too_long:
        llama_engine.generate([GenerationRequest(long_prompt, SamplingParams(max_tokens=8))])
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(RequestError) as too_many:
        llama_engine.generate([GenerationRequest(chat("hi"), SamplingParams(max_tokens=llama_engine.max_model_len))])
    assert too_many.value.param == "max_tokens"
    with pytest.raises(RequestError):
        llama_engine.generate([GenerationRequest([10**7], SamplingParams(max_tokens=2))])
    assert (
        llama_engine.generate([GenerationRequest(chat("hi"), SamplingParams(max_tokens=2))])[0].completion_tokens == 2
    )


@pytest.mark.parametrize("prompt", ["", [], [True, False], 3.5, [[1, 2]]])
def test_malformed_prompts_are_refused(llama_engine, prompt):
    with pytest.raises(RequestError) as info:
        llama_engine.generate([GenerationRequest(prompt, SamplingParams(max_tokens=2))])
    assert info.value.param == "prompt"


def test_closing_a_stream_early_cancels_its_request(llama_engine):
    async def abandon():
        stream = llama_engine.stream(
            GenerationRequest(chat(PROMPTS[0]), SamplingParams(max_tokens=500, ignore_eos=True))
        )
        async for _ in stream:
            break
        await stream.aclose()

    asyncio.run(abandon())
    result = llama_engine.generate([GenerationRequest(chat(PROMPTS[1]), SamplingParams(max_tokens=4))])[0]
    assert len(result.outputs[0].token_ids) == 4
    assert not llama_engine._rows  # the abandoned request left the batch


@pytest.fixture(scope="module")
def lora_dirs(tiny_llama, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    dirs = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        base = AutoModelForCausalLM.from_pretrained(tiny_llama)
        # B initialised randomly (not zeros) so the adapter changes the output
        peft_model = get_peft_model(base, LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False))
        path = tmp_path_factory.mktemp(f"lora{seed}")
        peft_model.save_pretrained(path)
        dirs.append(path)
    return dirs


def test_lora_adapters_match_peft(tiny_llama, lora_dirs, plugin_manager):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    engine = engine_for("causal-lm", plugin_manager, tiny_llama, adapter_path=str(lora_dirs[0]))
    try:
        engine.add_adapter("second", str(lora_dirs[1]))
        requests = [GenerationRequest(chat(PROMPTS[0]), SamplingParams(max_tokens=10)),
                    GenerationRequest(chat(PROMPTS[1]), SamplingParams(max_tokens=10), adapter="second"),
                    GenerationRequest(chat(PROMPTS[2]), SamplingParams(max_tokens=10), adapter="__base__")]  # fmt: skip
        results = engine.generate(requests)
        for request, result, adapter in zip(requests, results, (lora_dirs[0], lora_dirs[1], None)):
            model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
            if adapter is not None:
                model = PeftModel.from_pretrained(model, adapter).eval()
            expected = truncated_at_eos(reference_ids(engine, request.prompt, 10, model=model), engine.eos_ids)
            assert result.outputs[0].token_ids == expected, adapter
        with pytest.raises(RequestError):
            engine.generate([GenerationRequest(chat("hi"), SamplingParams(max_tokens=2), adapter="missing")])
    finally:
        engine.close()


def _images():
    from PIL import Image

    return [Image.new("RGB", (32, 32), (255, 0, 0)), Image.new("RGB", (64, 48), (0, 0, 255))]


@pytest.mark.parametrize("kind", ["llava", "llava-next", "qwen2-vl", "qwen2.5-vl"])
def test_vision_prompts_joining_midway_match_generate(kind, plugin_manager, request):
    """Image prompts of different lengths, one joining while the other decodes (Qwen-VL: 3D rotary offsets)."""
    fixture = {
        "llava": "tiny_llava",
        "llava-next": "tiny_llava_next",
        "qwen2-vl": "tiny_qwen2_vl",
        "qwen2.5-vl": "tiny_qwen2_5_vl",
    }
    path = request.getfixturevalue(fixture[kind])
    engine = engine_for(kind, plugin_manager, path)
    red, blue = _images()
    samples = [chat("<image>\nDescribe the image.", [red]), chat("<image>\nWhat shape is it, and where?", [blue]),
               chat("What colour is the sky?")]  # fmt: skip
    try:

        async def scenario():
            first = engine.stream(GenerationRequest(samples[0], SamplingParams(max_tokens=24)))
            tokens, later = [], []
            async for event in first:
                tokens.extend(event.token_ids)
                if len(tokens) == 2:
                    later = [asyncio.ensure_future(collect(engine.stream(GenerationRequest(s, SamplingParams(max_tokens=10)))))
                             for s in samples[1:]]  # fmt: skip
            return tokens, [await f for f in later]

        tokens, later = asyncio.run(scenario())
        assert tokens == truncated_at_eos(reference_ids(engine, samples[0], 24), engine.eos_ids)
        for sample, result in zip(samples[1:], later):
            assert result.outputs[0].token_ids == truncated_at_eos(reference_ids(engine, sample, 10), engine.eos_ids)
    finally:
        engine.close()


def test_sliding_window_models_batch_without_merging(llama_engine):
    """Sliding-window caches cannot be re-padded: late requests wait for the running batch, results stay exact."""
    from transformers import MistralConfig, MistralForCausalLM

    tokenizer = llama_engine.tokenizer
    config = MistralConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                           num_key_value_heads=1, sliding_window=16, vocab_size=len(tokenizer),
                           eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)  # fmt: skip
    torch.manual_seed(0)
    model = MistralForCausalLM(config).eval()
    engine = TransformersEngine.from_model(model, tokenizer, llama_engine.encoder)
    try:

        async def scenario():
            first = engine.stream(GenerationRequest(chat(PROMPTS[1]), SamplingParams(max_tokens=30, ignore_eos=True)))
            tokens, later = [], None
            async for event in first:
                tokens.extend(event.token_ids)
                if len(tokens) == 2:
                    later = asyncio.ensure_future(
                        collect(engine.stream(GenerationRequest(chat(PROMPTS[0]), SamplingParams(max_tokens=8))))
                    )
            return tokens, await later

        tokens, late = asyncio.run(scenario())
        assert tokens == greedy_without_cache(engine, PROMPTS[1], 30, model=model)  # past the window
        assert late.outputs[0].token_ids == truncated_at_eos(
            reference_ids(engine, chat(PROMPTS[0]), 8, model=model), engine.eos_ids
        )
    finally:
        engine.close()


def test_closed_engine_refuses_requests(tiny_llama, plugin_manager):
    from vistune.inference import EngineClosedError

    engine = engine_for("causal-lm", plugin_manager, tiny_llama)
    engine.close()
    with pytest.raises(EngineClosedError):
        engine.generate([GenerationRequest(chat("hi"), SamplingParams(max_tokens=2))])


def _delta(before: dict, after: dict) -> dict:
    return {key: after[key] - before[key] for key in after}


def test_stats_count_every_phase_of_a_batch(llama_engine):
    """Two requests submitted together: one prefill of both prompts, then 4 decode steps of 2 rows."""
    samples = [chat(p) for p in PROMPTS[:2]]
    lengths = [len(llama_engine.encoder.encode_prompt(s)["input_ids"]) for s in samples]
    before = llama_engine.stats()
    llama_engine.generate([GenerationRequest(s, SamplingParams(max_tokens=5, ignore_eos=True)) for s in samples])
    delta = _delta(before, llama_engine.stats())
    assert delta["requests"] == delta["admissions"] == delta["first_tokens"] == 2
    assert delta["prefills"] == 1 and delta["prefill_rows"] == 2
    assert delta["prefill_tokens"] == sum(lengths)
    assert delta["decode_steps"] == 4 and delta["decode_rows"] == 8  # tokens 2 to 5 of both rows
    for key in ("encode_seconds", "queue_wait_seconds", "prefill_seconds", "decode_seconds", "first_token_seconds"):
        assert delta[key] > 0, key
    assert delta["encode_wait_seconds"] == 0  # generate() encodes in the caller's thread, not the pool
    # each request's first token came at the end of the prefill it waited for
    assert delta["first_token_seconds"] == pytest.approx(delta["queue_wait_seconds"] + 2 * delta["prefill_seconds"])


def test_stats_of_a_stream_count_its_wait_for_an_encode_thread(llama_engine):
    before = llama_engine.stats()
    request = GenerationRequest(chat(PROMPTS[2]), SamplingParams(max_tokens=3, ignore_eos=True))
    result = asyncio.run(collect(llama_engine.stream(request)))
    delta = _delta(before, llama_engine.stats())
    assert delta["requests"] == delta["first_tokens"] == delta["prefills"] == 1
    assert delta["prefill_tokens"] == result.prompt_tokens
    assert delta["decode_steps"] == 2 and delta["decode_rows"] == 2
    assert delta["encode_wait_seconds"] > 0 and delta["encode_seconds"] > 0


def test_stats_of_an_image_prompt_count_its_image_tokens(tiny_llava, plugin_manager):
    engine = engine_for("llava", plugin_manager, tiny_llava)
    try:
        sample = chat("<image>\nDescribe the image.", _images()[:1])
        length = len(engine.encoder.encode_prompt(sample)["input_ids"])
        [result] = engine.generate([GenerationRequest(sample, SamplingParams(max_tokens=2, ignore_eos=True))])
        stats = engine.stats()
        assert stats["prefill_tokens"] == result.prompt_tokens == length
        assert stats["requests"] == stats["prefills"] == stats["decode_steps"] == 1
        assert stats["encode_seconds"] > 0 and stats["prefill_seconds"] > 0
    finally:
        engine.close()


def test_stats_do_not_count_a_first_token_for_a_failed_prefill(llama_engine, monkeypatch):
    def broken(prefill):
        raise RuntimeError("out of memory")

    before = llama_engine.stats()
    monkeypatch.setattr(llama_engine, "_prefill_call", broken)
    with pytest.raises(RuntimeError, match="out of memory"):
        llama_engine.generate([GenerationRequest(chat(PROMPTS[0]), SamplingParams(max_tokens=2))])
    delta = _delta(before, llama_engine.stats())
    assert delta["prefills"] == delta["admissions"] == 1 and delta["first_tokens"] == 0
    assert delta["first_token_seconds"] == 0


def test_an_idle_engine_prefills_prompts_encoded_together_in_one_call(llama_engine, monkeypatch):
    """Streams sent together while the model is idle share one prefill, even when one prompt
    takes longer to encode than the other (the first waits for prompts still being encoded)."""
    import time

    prepare = llama_engine._prepare

    def slower_second(request):
        if request.prompt.messages[0]["content"] == PROMPTS[1]:
            time.sleep(0.015)
        return prepare(request)

    monkeypatch.setattr(llama_engine, "_prepare", slower_second)
    before = llama_engine.stats()

    async def together():
        requests = [GenerationRequest(chat(p), SamplingParams(max_tokens=3)) for p in PROMPTS[:2]]
        return await asyncio.gather(*(collect(llama_engine.stream(r)) for r in requests))

    results = asyncio.run(together())
    delta = _delta(before, llama_engine.stats())
    assert delta["prefills"] == 1 and delta["prefill_rows"] == 2
    assert [r.outputs[0].token_ids for r in results] == [
        truncated_at_eos(reference_ids(llama_engine, chat(p), 3), llama_engine.eos_ids) for p in PROMPTS[:2]
    ]
