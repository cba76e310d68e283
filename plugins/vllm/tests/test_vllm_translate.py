"""How vistune requests and config become vLLM's: checked without vLLM installed."""

from __future__ import annotations

import pytest
from vistune.config import RunConfig
from vistune.errors import ConfigError
from vistune.inference import SamplingParams
from vistune_vllm.translate import collapse_image_tokens, engine_kwargs, image_token_id, quantization, sampling_kwargs


def test_backend_is_registered(plugin_manager):
    backend = plugin_manager.registries.backends.get("vllm")
    assert backend.requires == ("vllm",) and not backend.requires_cuda
    assert plugin_manager.registries.backends.owner("vllm").distribution == "vistune-vllm"


def test_sampling_parameters_map_one_to_one():
    params = SamplingParams(
        max_tokens=7, temperature=0.5, top_p=0.9, n=3, stop=["\n\n", "END"], seed=11, ignore_eos=True
    )
    assert sampling_kwargs(params, stream=True) == {
        "n": 3, "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "stop": ["\n\n", "END"], "seed": 11,
        "ignore_eos": True, "skip_special_tokens": True, "output_kind": "DELTA",
    }  # fmt: skip
    greedy = sampling_kwargs(SamplingParams(), stream=False)
    assert greedy["temperature"] == 0.0 and greedy["stop"] is None and greedy["output_kind"] == "FINAL_ONLY"


def test_engine_arguments_follow_the_config():
    config = RunConfig(task="serve", tensor_parallel_size=2, gpu_memory_utilization=0.8, quantization="awq",
                       dtype="bfloat16", max_batch_size=16)  # fmt: skip
    kwargs = engine_kwargs("/models/llava", config, max_model_len=4096, enable_lora=True)
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["gpu_memory_utilization"] == 0.8
    assert kwargs["quantization"] == "awq" and kwargs["dtype"] == "bfloat16" and kwargs["max_num_seqs"] == 16
    assert kwargs["max_model_len"] == 4096 and kwargs["enable_lora"] is True
    assert quantization("nf4") == quantization("q4_k_m") == "bitsandbytes" and quantization("none") is None
    with pytest.raises(ConfigError, match="not supported by the vllm backend"):
        quantization("int8")


def test_expanded_image_tokens_collapse_to_the_processors_placeholders(tiny_llava):
    """The template's expanded prompt, collapsed, is what the checkpoint's processor writes before expansion."""
    pytest.importorskip("vistune_llava")
    import json

    from PIL import Image
    from transformers import AutoProcessor
    from vistune.templates import Sample
    from vistune_llava.encoder import llava_1_5_encoder

    processor = AutoProcessor.from_pretrained(tiny_llava)
    token = image_token_id(json.loads((tiny_llava / "config.json").read_text()))
    assert token == processor.tokenizer.convert_tokens_to_ids("<image>")
    sample = Sample([{"role": "user", "content": "<image>\nWhat is this?"}], [Image.new("RGB", (32, 32))])
    expanded = llava_1_5_encoder(processor).encode_prompt(sample)["input_ids"]
    assert expanded.count(token) == 16
    collapsed = collapse_image_tokens(expanded, token)
    text = processor.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
                                         add_generation_prompt=True)  # fmt: skip
    assert collapsed == processor.tokenizer(text)["input_ids"]
    assert collapse_image_tokens([1, 2, 3], None) == [1, 2, 3]
