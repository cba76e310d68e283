"""``SglangEngine`` on any machine, over a stand-in for ``sglang.Engine``.

SGLang's engine needs CUDA; the stand-in answers ``async_generate`` the way SGLang's
offline engine does (a dict per completion, cumulative chunks when streaming) and records
what it was asked, so what vistune's engine sends and how it puts the answers together
are checked here: prompts and their token counts, one seeded request per completion,
adapters, streams, cancellation, and the event loop SGLang is bound to.
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import types

import pytest

pytest.importorskip("transformers")

from vistune.config import RunConfig
from vistune.inference import BASE_ADAPTER, EngineClosedError, GenerationRequest, RequestError, SamplingParams, collect
from vistune.templates import Sample


class FakeSglangEngine:
    """What ``SglangEngine`` uses of ``sglang.Engine``: completion ``i`` is ``seed + 100 + i``, ``seed + 101 + i``..."""

    def __init__(self, **server_args):
        self.server_args = server_args
        self.loop = asyncio.get_event_loop()  # SGLang binds to the loop current at construction
        self.requests: list[dict] = []
        self.loaded: dict[str, str] = {}
        self.aborted = 0
        self.shut_down = False

    def _answer(self, input_ids, sampling_params):
        first = (sampling_params["sampling_seed"] or 0) + 100
        ids = list(range(first, first + sampling_params["max_new_tokens"]))
        return ids, [f" w{t}" for t in ids]

    async def async_generate(self, input_ids, sampling_params, image_data=None, lora_path=None, stream=False):
        assert asyncio.get_running_loop() is self.loop, "called on another loop than SGLang's"
        self.requests.append({"input_ids": input_ids, "sampling_params": sampling_params, "image_data": image_data,
                              "lora_path": lora_path, "stream": stream})  # fmt: skip
        ids, pieces = self._answer(input_ids, sampling_params)
        meta = {"finish_reason": {"type": "length", "length": len(ids)}, "prompt_tokens": len(input_ids)}
        if not stream:
            return {"text": "".join(pieces), "output_ids": ids, "meta_info": meta}
        return self._chunks(ids, pieces, meta)

    async def _chunks(self, ids, pieces, meta):
        finished = False
        try:
            for k in range(1, len(ids) + 1):
                await asyncio.sleep(0.001)
                last = k == len(ids)
                yield {"text": "".join(pieces[:k]), "output_ids": ids[:k],
                       "meta_info": meta if last else {"finish_reason": None}}  # fmt: skip
            finished = True
        finally:
            if not finished:
                self.aborted += 1

    async def async_load_lora_adapter(self, lora_name, lora_path):
        assert asyncio.get_running_loop() is self.loop
        self.loaded[lora_name] = lora_path

    def shutdown(self):
        self.shut_down = True


def test_the_stand_in_has_sglang_s_signatures():
    """The stand-in takes what the pinned sglang.Engine takes (names and defaults), so it cannot accept more."""
    import inspect

    from pinned_sglang_api import pinned

    api = pinned()["Engine"]
    for name in ("async_generate", "async_load_lora_adapter", "shutdown"):
        parameters = inspect.signature(getattr(FakeSglangEngine, name)).parameters
        ours = {p: None if v.default is inspect.Parameter.empty else repr(v.default) for p, v in parameters.items()}
        ours.pop("self")
        assert set(ours) <= set(api[name]), (name, set(ours) - set(api[name]))
        assert {p: d for p, d in ours.items() if d is not None} == {p: api[name][p] for p in ours if ours[p] is not None}
        required = {p for p, d in api[name].items() if d is None}
        assert required <= set(ours), (name, required - set(ours))


def test_what_the_engine_sends_is_in_sglang_s_pinned_api(engine):
    """The keyword arguments SglangEngine really passed, against the pinned signatures (sglang 0.5.23)."""
    from pinned_sglang_api import pinned

    api = pinned()
    engine.generate([GenerationRequest(chat("Name a colour."), SamplingParams(max_tokens=2, n=2, seed=3, stop=["x"]))])
    assert engine._engine.requests
    for request in engine._engine.requests:
        assert set(request) <= set(api["Engine"]["async_generate"])
        assert set(request["sampling_params"]) <= set(api["SamplingParams"])
    assert set(engine._engine.server_args) <= set(api["ServerArgs"]), set(engine._engine.server_args) - set(api["ServerArgs"])


@pytest.fixture
def adapter_dir(tmp_path):
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 4, "peft_type": "LORA"}))
    return tmp_path


@pytest.fixture
def engine(tiny_llama, adapter_dir, plugin_manager, monkeypatch):
    from vistune_sglang.engine import SglangEngine

    monkeypatch.setitem(sys.modules, "sglang", types.SimpleNamespace(Engine=FakeSglangEngine))
    config = RunConfig(task="serve", max_length=256, adapter_path=str(adapter_dir))
    engine = SglangEngine(str(tiny_llama), plugin_manager.registries.models.get("causal-lm"), config)
    yield engine
    engine.close()


def chat(text: str) -> Sample:
    return Sample([{"role": "user", "content": text}])


def test_engine_is_started_with_the_configs_limits_and_adapter(engine, adapter_dir):
    args = engine._engine.server_args
    assert args["context_length"] == engine.max_model_len == 256  # max_length, under the model's 2048
    assert args["enable_lora"] and args["lora_paths"] == [f"default={adapter_dir}"]


def test_generate_sends_one_seeded_request_per_completion(engine):
    prompt_ids = engine.encoder.encode_prompt(chat("a red circle"))["input_ids"]
    requests = [GenerationRequest(chat("a red circle"), SamplingParams(max_tokens=3, temperature=1.0, n=2, seed=5)),
                GenerationRequest("a blue square", SamplingParams(max_tokens=2), adapter=BASE_ADAPTER)]  # fmt: skip
    first, second = engine.generate(requests)
    sent = {(r["sampling_params"]["sampling_seed"], r["lora_path"]): r for r in engine._engine.requests}
    assert set(sent) == {(5, "default"), (6, "default"), (None, None)}  # the default adapter, unless the base is asked
    assert sent[(5, "default")]["input_ids"] == prompt_ids and sent[(5, "default")]["sampling_params"]["n"] == 1
    assert sent[(None, None)]["input_ids"] == engine.tokenizer("a blue square")["input_ids"]
    assert [o.index for o in first.outputs] == [0, 1]
    assert [o.token_ids for o in first.outputs] == [[105, 106, 107], [106, 107, 108]]
    assert first.outputs[1].text == " w106 w107 w108" and first.outputs[1].finish_reason == "length"
    assert first.prompt_tokens == len(prompt_ids) and first.completion_tokens == 6
    assert second.outputs[0].token_ids == [100, 101]


def test_stream_adds_up_to_generate(engine):
    request = GenerationRequest(chat("a red circle"), SamplingParams(max_tokens=4, temperature=1.0, n=2, seed=1))
    whole = engine.generate([request])[0]
    streamed = asyncio.run(collect(engine.stream(request), request.request_id))
    assert streamed == whole
    assert all(r["stream"] for r in engine._engine.requests[2:])


def test_closing_a_stream_early_aborts_its_requests(engine):
    async def abandon():
        stream = engine.stream(GenerationRequest(chat("hi"), SamplingParams(max_tokens=200, n=2, temperature=1.0)))
        async for _ in stream:
            break
        await stream.aclose()

    asyncio.run(abandon())
    deadline = time.monotonic() + 10
    while engine._engine.aborted < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert engine._engine.aborted == 2


def test_requests_that_cannot_be_served_are_refused(engine):
    with pytest.raises(RequestError) as too_long:
        engine.generate([GenerationRequest(chat("hi"), SamplingParams(max_tokens=256))])
    assert too_long.value.code == "context_length_exceeded"
    with pytest.raises(RequestError) as unknown:
        engine.generate([GenerationRequest(chat("hi"), SamplingParams(max_tokens=2), adapter="other")])
    assert unknown.value.code == "model_not_found"
    assert not engine._engine.requests  # refused before anything was sent


def test_added_adapters_are_loaded_into_sglang(engine, adapter_dir):
    engine.add_adapter("other", str(adapter_dir))
    assert engine._engine.loaded == {"other": str(adapter_dir)}
    engine.generate([GenerationRequest(chat("hi"), SamplingParams(max_tokens=2), adapter="other")])
    assert engine._engine.requests[-1]["lora_path"] == "other"


def test_closed_engine_shuts_sglang_down_and_refuses_requests(engine):
    engine.close()
    assert engine._engine.shut_down
    with pytest.raises(EngineClosedError):
        engine.generate([GenerationRequest(chat("hi"), SamplingParams(max_tokens=2))])


def test_image_prompts_are_sent_collapsed_with_their_images(tiny_llava, plugin_manager, monkeypatch):
    pytest.importorskip("vistune_llava")
    from PIL import Image
    from vistune.inference.prompts import image_token_id
    from vistune_sglang.engine import SglangEngine

    monkeypatch.setitem(sys.modules, "sglang", types.SimpleNamespace(Engine=FakeSglangEngine))
    config = RunConfig(task="serve", max_length=512)
    engine = SglangEngine(str(tiny_llava), plugin_manager.registries.models.get("llava"), config)
    try:
        image = Image.new("RGB", (32, 32), (200, 0, 0))
        sample = Sample([{"role": "user", "content": "<image>\nWhat is it?"}], [image])
        result = engine.generate([GenerationRequest(sample, SamplingParams(max_tokens=2))])[0]
        token = image_token_id(json.loads((tiny_llava / "config.json").read_text()))
        expanded = engine.encoder.encode_prompt(sample)["input_ids"]
        sent = engine._engine.requests[0]
        assert expanded.count(token) == 16 and sent["input_ids"].count(token) == 1
        assert len(sent["input_ids"]) == len(expanded) - 15
        assert result.prompt_tokens == len(expanded)  # counted as the model sees it, images expanded
        assert len(sent["image_data"]) == 1 and sent["image_data"][0].getpixel((0, 0)) == (200, 0, 0)
    finally:
        engine.close()
