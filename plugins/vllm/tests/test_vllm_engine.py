"""The vLLM engine end to end on a tiny Llama, against plain ``transformers`` and peft.

Skipped where vllm is not installed.  One engine is started for the module (vLLM starts
in 15-100 s on a CPU); it is started with a LoRA adapter, so one engine covers the base
model (``adapter="__base__"``) and the adapter.
"""

from __future__ import annotations

import asyncio
import os

import pytest

pytest.importorskip("vllm")
torch = pytest.importorskip("torch")

from vistune.config import RunConfig
from vistune.inference import GenerationRequest, RequestError, SamplingParams, collect
from vistune.templates import Sample

PROMPTS = ["a red circle", "There is a blue square next to a green star on the left.", "How many shapes are there?"]
BASE = "__base__"


def chat(text: str) -> Sample:
    return Sample([{"role": "user", "content": text}])


@pytest.fixture(scope="module")
def adapter_dir(tiny_llama, tmp_path_factory):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_llama),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False))  # fmt: skip
    path = tmp_path_factory.mktemp("lora")
    model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def engine(tiny_llama, adapter_dir):
    from vistune.plugins import get_plugin_manager
    from vistune_vllm.engine import VllmEngine

    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    config = RunConfig(task="infer", device="cpu", dtype="float32", max_length=256, adapter_path=str(adapter_dir))
    engine = VllmEngine(str(tiny_llama), get_plugin_manager().registries.models.get("causal-lm"), config)
    yield engine
    engine.close()


def transformers_greedy(engine, model, prompt: Sample, max_new_tokens: int) -> list[int]:
    ids = engine.encoder.encode_prompt(prompt)["input_ids"]
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False)[
            0, len(ids) :
        ].tolist()
    eos = set(model.generation_config.eos_token_id)
    return out[: next((i + 1 for i, t in enumerate(out) if t in eos), len(out))]


def test_greedy_tokens_equal_transformers(engine, tiny_llama):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_llama).eval()
    results = engine.generate(
        [GenerationRequest(chat(p), SamplingParams(max_tokens=24), adapter=BASE) for p in PROMPTS]
    )
    for prompt, result in zip(PROMPTS, results):
        expected = transformers_greedy(engine, model, chat(prompt), 24)
        assert result.outputs[0].token_ids == expected
        assert result.prompt_tokens == len(engine.encoder.encode_prompt(chat(prompt))["input_ids"])
    print(f"\nvLLM vs transformers greedy: {len(PROMPTS)} prompts x 24 tokens, token for token equal")


def test_lora_adapter_equals_peft(engine, tiny_llama, adapter_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), adapter_dir).eval()
    result = engine.generate([GenerationRequest(chat(PROMPTS[0]), SamplingParams(max_tokens=16))])[0]  # default adapter
    assert result.outputs[0].token_ids == transformers_greedy(engine, model, chat(PROMPTS[0]), 16)


def test_stream_matches_generate(engine):
    request = GenerationRequest(chat(PROMPTS[1]), SamplingParams(max_tokens=16), adapter=BASE)
    whole = engine.generate([request])[0]

    async def streamed():
        events = [e async for e in engine.stream(request)]
        return events

    events = asyncio.run(streamed())
    assert "".join(e.text for e in events) == whole.text
    assert [t for e in events for t in e.token_ids] == whole.outputs[0].token_ids
    assert events[-1].finish_reason == whole.outputs[0].finish_reason


def test_seeded_n_completions_and_stop(engine):
    params = SamplingParams(max_tokens=10, temperature=1.0, n=3, seed=7)
    first, second = (engine.generate([GenerationRequest(chat(PROMPTS[2]), params, adapter=BASE)])[0] for _ in range(2))
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in second.outputs]
    assert [o.index for o in first.outputs] == [0, 1, 2]
    free = engine.generate([GenerationRequest(chat(PROMPTS[0]), SamplingParams(max_tokens=24), adapter=BASE)])[0].text
    stop = [w for w in free.split(" ") if len(w) >= 2][1]
    cut = engine.generate(
        [GenerationRequest(chat(PROMPTS[0]), SamplingParams(max_tokens=24, stop=[stop]), adapter=BASE)]
    )[0]
    assert cut.text == free[: free.index(stop)] and cut.outputs[0].finish_reason == "stop"


def test_requests_that_do_not_fit_are_refused(engine):
    with pytest.raises(RequestError) as info:
        engine.generate([GenerationRequest(chat("hi"), SamplingParams(max_tokens=10_000))])
    assert info.value.code == "context_length_exceeded"


def test_served_through_the_openai_api(engine):
    openai = pytest.importorskip("openai")
    pytest.importorskip("uvicorn")
    from vistune.serving.app import create_app
    from vistune.serving.server import ServerThread

    config = RunConfig(task="serve")
    with ServerThread(create_app(engine, config, model_name="tiny", owns_engine=False)) as server:
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="x", max_retries=0, timeout=120)
        messages = [{"role": "user", "content": PROMPTS[0]}]
        answer = client.chat.completions.create(model="tiny", messages=messages, max_tokens=8, temperature=0)
        stream = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=8, temperature=0, stream=True
        )
        assert (
            "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == answer.choices[0].message.content
        )
    expected = asyncio.run(collect(engine.stream(GenerationRequest(chat(PROMPTS[0]), SamplingParams(max_tokens=8)))))
    assert answer.choices[0].message.content == expected.text
