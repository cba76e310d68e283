"""The engine's KV slots: bucket sizes, in-place growth and compaction, and exact decoding across them.

The engine tests (test_infer_engine.py) check slot decoding against ``generate`` for
rows that join and leave; these check what those cannot see: that the slot layout is
the one in use, that buffers grown mid-generation keep every row's keys, and that
compacting rows moves exactly their filled columns.
"""

from __future__ import annotations

import asyncio

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from vistune.inference import GenerationRequest, SamplingParams, collect
from vistune.inference.slot_cache import WIDTH_STEP, SlotBatch, bucket_rows, bucket_width, make_slot_cache

from test_infer_engine import PROMPTS, chat, greedy_without_cache, llama_engine  # noqa: F401  (fixture)


def test_buckets():
    assert [bucket_rows(n) for n in (1, 2, 3, 5, 8, 9, 17, 33)] == [1, 2, 4, 8, 8, 16, 24, 40]
    assert [bucket_width(n) for n in (1, WIDTH_STEP, WIDTH_STEP + 1)] == [WIDTH_STEP, WIDTH_STEP, 2 * WIDTH_STEP]


def prefill_cache(lengths: list[int], layers: int = 2, heads: int = 2, dim: int = 4):
    """A left-padded ``DynamicCache`` whose key at (row, column) is row * 1000 + position."""
    from transformers import DynamicCache

    width = max(lengths)
    cache = DynamicCache()
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    keys = torch.zeros(len(lengths), heads, width, dim)
    for r, n in enumerate(lengths):
        mask[r, width - n :] = 1
        keys[r, :, width - n :] = (r * 1000 + torch.arange(n, dtype=torch.float)).view(1, n, 1)
    for layer in range(layers):
        cache.update(keys.clone(), -keys.clone(), layer)
    return cache, mask


def test_absorb_grow_and_select_keep_each_rows_columns():
    cache, mask = prefill_cache([3, 5, 2])
    batch = SlotBatch(cache, slots=2)
    batch.absorb(cache, mask, torch.tensor([-2, 0, -3]), needed=10)
    assert batch.lengths == [3, 5, 2] and batch.slots == 4
    assert batch.offsets[:3].tolist() == [0, 0, 0]  # position == column once the left padding is gone
    batch.reserve(8, 2 * WIDTH_STEP + 1)  # grown while rows run: kept rows are copied
    assert batch.slots == 8 and batch.capacity == 3 * WIDTH_STEP
    keys = batch.cache.keys[1]
    assert keys[1, 0, :5, 0].tolist() == [1000, 1001, 1002, 1003, 1004]
    assert batch.cache.values[0][2, 1, :2, 0].tolist() == [-2000, -2001]
    batch.select([1, 2])  # row 0 leaves: rows 1 and 2 move down
    assert batch.lengths == [5, 2]
    assert keys[0, 0, :5, 0].tolist() == [1000, 1001, 1002, 1003, 1004]
    assert keys[1, 0, :2, 0].tolist() == [2000, 2001]


def test_slot_cache_writes_each_row_at_its_own_column():
    keys = [torch.zeros(4, 1, 8, 2)]
    cache = make_slot_cache(keys, [torch.zeros(4, 1, 8, 2)])
    from transformers.cache_utils import Cache

    assert isinstance(cache, Cache)
    cache.begin_step(torch.arange(2), torch.tensor([3, 5]), width=6)
    k, _ = cache.update(torch.ones(2, 1, 1, 2), torch.ones(2, 1, 1, 2), 0)
    assert k.shape == (2, 1, 6, 2)
    assert keys[0][0, 0, :, 0].tolist() == [0, 0, 0, 1, 0, 0, 0, 0]
    assert keys[0][1, 0, :, 0].tolist() == [0, 0, 0, 0, 0, 1, 0, 0]


def test_engine_decodes_in_slots_and_grows_them_mid_generation(llama_engine):  # noqa: F811
    """A short request runs; one needing more columns than the slots hold joins; both stay exact."""

    async def scenario():
        short = llama_engine.stream(GenerationRequest(chat(PROMPTS[0]), SamplingParams(max_tokens=40, ignore_eos=True)))
        tokens, late = [], None
        async for event in short:
            tokens.extend(event.token_ids)
            if len(tokens) == 2:
                assert isinstance(llama_engine._batch, SlotBatch)
                capacity = llama_engine._batch.capacity
                late = asyncio.ensure_future(collect(llama_engine.stream(
                    GenerationRequest(chat(PROMPTS[1]), SamplingParams(max_tokens=capacity + 20, ignore_eos=True)))))
        return tokens, await late, capacity

    tokens, late, capacity = asyncio.run(scenario())
    assert llama_engine._batch.capacity > capacity
    for prompt, got in ((PROMPTS[0], tokens), (PROMPTS[1], late.outputs[0].token_ids)):
        assert got == greedy_without_cache(llama_engine, prompt, len(got))


def test_rollout_engines_free_their_slots_between_calls(llama_engine):  # noqa: F811
    """An engine over a training policy keeps no KV memory once its rows are done; a server keeps its slots."""
    from vistune.inference.transformers_engine import TransformersEngine

    rollout = TransformersEngine.from_model(llama_engine.model, llama_engine.processor, llama_engine.encoder)
    try:
        request = GenerationRequest(chat(PROMPTS[2]), SamplingParams(max_tokens=4, n=3))
        assert len(rollout.generate([request])[0].outputs) == 3
        settled(lambda: rollout._batch is None)  # the engine thread drops the rows just after their last event
        assert rollout._decoder.use_graphs is False
    finally:
        rollout.close()
    llama_engine.generate([GenerationRequest(chat(PROMPTS[2]), SamplingParams(max_tokens=4))])
    settled(lambda: isinstance(llama_engine._batch, SlotBatch) and llama_engine._batch.size == 0)


def settled(condition, timeout: float = 5.0) -> None:
    import time

    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "the engine did not reach the expected state"
        time.sleep(0.01)


def test_a_step_whose_capture_fails_runs_eagerly_and_graphs_stay_off(llama_engine, monkeypatch, caplog):  # noqa: F811
    """A model that cannot be captured still decodes: the failed step runs eagerly, later steps too."""
    from vistune.inference.cuda_graphs import DecodeRunner

    request = GenerationRequest(chat(PROMPTS[3]), SamplingParams(max_tokens=6, ignore_eos=True))
    expected = llama_engine.generate([request])[0].outputs[0].token_ids

    def no_capture():
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(torch.cuda, "graph_pool_handle", no_capture)
    runner = DecodeRunner(llama_engine._slot_forward, llama_engine.pad_id, use_graphs=True)
    monkeypatch.setattr(llama_engine, "_decoder", runner)
    with caplog.at_level("WARNING"):
        got = llama_engine.generate([request])[0].outputs[0].token_ids
    assert got == expected
    assert runner.use_graphs is False and "without CUDA graphs" in caplog.text


def test_every_allocation_is_a_new_generation():
    """A decode runner that outlives a batch (an RL engine frees its slots between rollouts) must see the new buffers."""
    cache, mask = prefill_cache([3])
    first, second = SlotBatch(cache, slots=1), SlotBatch(cache, slots=8)
    assert first.generation != second.generation
    before = second.generation
    second.reserve(8, 10 * WIDTH_STEP)
    assert second.generation != before


def test_model_calls_on_a_gpu_keep_cudnn_attention_off_only_while_they_run():
    """cuDNN builds a graph per new attention shape (hundreds of ms): engine steps run without it."""
    from vistune.inference.transformers_engine import attention_kernels

    assert torch.backends.cuda.cudnn_sdp_enabled()
    with attention_kernels("cuda"):
        assert not torch.backends.cuda.cudnn_sdp_enabled()
        assert torch.backends.cuda.flash_sdp_enabled() and torch.backends.cuda.mem_efficient_sdp_enabled()
    assert torch.backends.cuda.cudnn_sdp_enabled()  # training in the same process keeps its choice
    with attention_kernels("cpu"):
        assert torch.backends.cuda.cudnn_sdp_enabled()
