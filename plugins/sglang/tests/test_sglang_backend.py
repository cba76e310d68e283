"""The SGLang backend without SGLang's engine: registration, the plan's refusal on CPU, and
the translation of vistune requests into SGLang's API (checked against sglang's own
classes where sglang is importable)."""

from __future__ import annotations

import importlib.util
import inspect

import pytest
from vistune.config import RunConfig, load_config
from vistune.errors import ConfigError
from vistune.inference import SamplingParams
from vistune.plan import make_plan
from vistune_sglang.translate import (
    CumulativeOutput,
    engine_kwargs,
    finish_reason,
    generate_kwargs,
    quantization,
    sampling_params,
)


def test_backend_is_registered_as_cuda_only(plugin_manager):
    backend = plugin_manager.registries.backends.get("sglang")
    assert backend.requires == ("sglang",) and backend.requires_cuda and backend.tensor_parallel
    assert plugin_manager.registries.backends.owner("sglang").distribution == "vistune-sglang"


def test_plan_refuses_sglang_without_a_gpu(tiny_llama, plugin_manager):
    loaded = load_config(None, ["--model", str(tiny_llama), "--backend", "sglang", "--device", "cpu"], task="serve")
    plan = make_plan(loaded, plugin_manager)
    messages = [str(p) for p in plan.problems if p.field == "backend"]
    assert any("backend sglang needs a CUDA GPU and this run has none" in m for m in messages), messages
    assert any("backend: transformers" in m for m in messages)  # the fix names a backend that runs here
    if importlib.util.find_spec("sglang") is None:
        assert any("needs the Python package(s) sglang" in m for m in messages)


def test_sampling_params_per_completion():
    params = SamplingParams(max_tokens=9, temperature=0.7, top_p=0.8, n=3, stop=["END"], seed=100, ignore_eos=True)
    assert [sampling_params(params, i) for i in range(3)] == [
        {"max_new_tokens": 9, "temperature": 0.7, "top_p": 0.8, "stop": ["END"], "ignore_eos": True,
         "skip_special_tokens": True, "n": 1, "sampling_seed": 100 + i}
        for i in range(3)
    ]  # fmt: skip
    assert sampling_params(SamplingParams())["sampling_seed"] is None
    assert sampling_params(SamplingParams())["stop"] is None


def test_generate_and_engine_arguments():
    assert generate_kwargs([1, 2], [], None, stream=False) == {"input_ids": [1, 2], "stream": False}
    assert generate_kwargs([1, 2], ["img"], "default", stream=True) == {
        "input_ids": [1, 2], "stream": True, "image_data": ["img"], "lora_path": "default"}  # fmt: skip
    config = RunConfig(
        task="serve", tensor_parallel_size=2, gpu_memory_utilization=0.85, quantization="awq", dtype="bfloat16"
    )
    kwargs = engine_kwargs("/models/llava", config, context_length=4096, lora_paths={"default": "/adapters/a"})
    assert kwargs["tp_size"] == 2 and kwargs["mem_fraction_static"] == 0.85 and kwargs["quantization"] == "awq"
    assert kwargs["context_length"] == 4096 and kwargs["dtype"] == "bfloat16"
    assert kwargs["enable_lora"] is True and kwargs["lora_paths"] == ["default=/adapters/a"]
    assert "enable_lora" not in engine_kwargs("/m", RunConfig(task="serve"), context_length=None, lora_paths={})
    with pytest.raises(ConfigError):
        quantization("int8")


def test_max_batch_size_auto_leaves_sglang_its_own_max_running_requests():
    assert "max_running_requests" not in engine_kwargs("/m", RunConfig(task="serve"), context_length=None, lora_paths={})
    config = RunConfig(task="serve", max_batch_size=3)
    assert engine_kwargs("/m", config, context_length=None, lora_paths={})["max_running_requests"] == 3


def test_outputs_become_deltas_and_finish_reasons():
    stream = CumulativeOutput()
    assert stream.delta({"text": "a r", "output_ids": [5, 6]}) == ("a r", [5, 6])
    assert stream.delta({"text": "a red", "output_ids": [5, 6, 7]}) == ("ed", [7])
    assert stream.delta({"text": "a red", "output_ids": [5, 6, 7]}) == ("", [])
    assert finish_reason({"finish_reason": None}) is None
    assert finish_reason({"finish_reason": {"type": "length", "length": 9}}) == "length"
    assert finish_reason({"finish_reason": {"type": "stop", "matched": 2}}) == "stop"
    with pytest.raises(RuntimeError, match="aborted"):
        finish_reason({"finish_reason": {"type": "abort", "message": "client gone"}})


def test_names_match_the_pinned_sglang_api():
    """Everywhere (CI too): the names the translation produces, against sglang 0.5.23's signatures read from its wheel."""
    from pinned_sglang_api import pinned

    api = pinned()
    assert api["version"] == "0.5.23"
    params = sampling_params(SamplingParams(max_tokens=4, temperature=0.5, top_p=0.9, n=2, seed=1, stop=["x"]), 1)
    assert set(params) <= set(api["SamplingParams"]), set(params) - set(api["SamplingParams"])
    sent = {"sampling_params", *generate_kwargs([1, 2], ["img"], "default", stream=True)}
    assert sent <= set(api["Engine"]["async_generate"]) and sent <= set(api["GenerateReqInput"])
    assert {"lora_name", "lora_path"} <= set(api["Engine"]["async_load_lora_adapter"])
    assert "shutdown" in api["Engine"]
    config = RunConfig(task="serve", tensor_parallel_size=2, quantization="awq", adapter_path="/a", max_batch_size=4)
    kwargs = engine_kwargs("/m", config, context_length=8, lora_paths={"a": "/a"})
    assert "max_running_requests" in kwargs
    assert set(kwargs) <= set(api["ServerArgs"]), set(kwargs) - set(api["ServerArgs"])


def test_pinned_api_is_sglang_s_own():
    """Only where sglang imports (a CUDA machine, never CI): the pinned copy is the installed sglang's API."""
    sglang = pytest.importorskip("sglang")
    import importlib.metadata

    from pinned_sglang_api import pinned, read_installed

    copy = pinned()
    if importlib.metadata.version("sglang") != copy["version"]:
        pytest.skip(f"sglang {importlib.metadata.version('sglang')} is installed, {copy['version']} is pinned: "
                    "pin it again (plugins/sglang/tests/pinned_sglang_api.py says how)")  # fmt: skip
    installed = read_installed(sglang.__path__[0])
    assert {k: v for k, v in copy.items() if k != "read_from"} == installed
    live = inspect.signature(sglang.Engine.async_generate).parameters
    assert set(live) - {"self"} == set(copy["Engine"]["async_generate"])


def test_names_match_sglangs_api():
    """Only where sglang imports (a CUDA machine): the keys we send are parameters SGLang accepts."""
    sglang = pytest.importorskip("sglang")
    from sglang.srt.sampling.sampling_params import SamplingParams as SglangSamplingParams
    from sglang.srt.server_args import ServerArgs

    from PIL import Image
    from sglang.srt.managers.io_struct import GenerateReqInput

    params = sampling_params(SamplingParams(max_tokens=4, temperature=0.5, top_p=0.9, n=2, seed=1, stop=["x"]), 1)
    checked = SglangSamplingParams(**params)
    checked.verify(vocab_size=1000)  # SGLang's own range checks
    assert checked.sampling_seed == 2 and checked.n == 1
    parameters = inspect.signature(sglang.Engine.async_generate).parameters
    assert {"input_ids", "sampling_params", "image_data", "lora_path", "stream"} <= set(parameters)
    # async_generate wraps its arguments in a GenerateReqInput: ours make one single request
    request = GenerateReqInput(sampling_params=params, **generate_kwargs([1, 2, 3], [Image.new("RGB", (8, 8))],
                                                                       "default", stream=True))  # fmt: skip
    request.normalize_batch_and_arguments()
    assert request.is_single and request.input_ids == [1, 2, 3] and request.lora_path == "default"
    assert len(request.image_data) == 1 and request.stream
    assert {"lora_name", "lora_path"} <= set(inspect.signature(sglang.Engine.async_load_lora_adapter).parameters)
    assert callable(sglang.Engine.shutdown)
    names = set(inspect.signature(ServerArgs).parameters) | set(dir(ServerArgs))
    kwargs = engine_kwargs("/m", RunConfig(task="serve"), context_length=8, lora_paths={"a": "/a"})
    assert set(kwargs) <= names, set(kwargs) - names
