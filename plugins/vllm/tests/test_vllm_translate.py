"""How vistune requests and config become vLLM's: checked without vLLM installed."""

from __future__ import annotations

import pytest
from vistune.config import RunConfig
from vistune.errors import ConfigError
from vistune.inference import SamplingParams
from vistune.inference.prompts import collapse_image_tokens, image_token_id
from vistune_vllm.translate import engine_kwargs, quantization, sampling_kwargs


def test_backend_is_registered(plugin_manager):
    backend = plugin_manager.registries.backends.get("vllm")
    assert backend.requires == ("vllm",) and not backend.requires_cuda and backend.tensor_parallel
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
    kwargs = engine_kwargs("/models/llava", config, max_model_len=4096, max_lora_rank=16)
    assert kwargs["tensor_parallel_size"] == 2 and kwargs["gpu_memory_utilization"] == 0.8
    assert kwargs["quantization"] == "awq" and kwargs["dtype"] == "bfloat16" and kwargs["max_num_seqs"] == 16
    assert kwargs["max_model_len"] == 4096 and kwargs["enable_lora"] is True and kwargs["max_lora_rank"] == 16
    without_lora = engine_kwargs("/models/llava", config, max_model_len=None, max_lora_rank=None)
    assert without_lora["enable_lora"] is False and "max_lora_rank" not in without_lora
    assert "max_model_len" not in without_lora
    assert kwargs["enforce_eager"] is False and kwargs["max_loras"] == 4  # the backend's declared defaults


def test_max_batch_size_auto_leaves_vllm_its_own_max_num_seqs():
    auto = engine_kwargs("/models/llava", RunConfig(task="serve"), max_model_len=None, max_lora_rank=None)
    assert "max_num_seqs" not in auto
    config = RunConfig(task="serve", max_batch_size=3)
    explicit = engine_kwargs("/models/llava", config, max_model_len=None, max_lora_rank=None)
    assert explicit["max_num_seqs"] == 3


def test_the_backends_own_options_reach_the_engine_arguments(plugin_manager):
    from vistune.config import load_config
    from vistune.testing import check_options

    assert [o.name for o in check_options(plugin_manager.registries.backends.get("vllm"))] == ["enforce_eager",
                                                                                             "max_loras"]  # fmt: skip
    config = load_config(None, ["--backend", "vllm", "--vllm.enforce_eager", "--vllm.max_loras", "2"],
                         task="serve").config  # fmt: skip
    kwargs = engine_kwargs("/models/llava", config, max_model_len=None, max_lora_rank=8)
    assert kwargs["enforce_eager"] is True and kwargs["max_loras"] == 2
    with pytest.raises(ConfigError, match=r"vllm.max_loras must be at least 1, got 0"):
        load_config(None, ["--vllm.max_loras", "0"], task="serve")
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


# -- RL: what the policy hands vLLM (weights only; vLLM itself is in test_vllm_rl.py) -------------


def _policy(tiny_llama, **lora):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_llama, dtype=torch.float32)
    if not lora:
        return model
    config = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, **lora)
    return get_peft_model(model, config)


def test_which_policies_sync_as_a_vllm_lora_adapter(tiny_llama):
    from vistune_vllm.engine import _syncs_as_lora

    assert _syncs_as_lora(_policy(tiny_llama, lora_dropout=0.1))
    assert not _syncs_as_lora(_policy(tiny_llama, use_dora=True))  # vLLM has no DoRA
    assert not _syncs_as_lora(_policy(tiny_llama, modules_to_save=["lm_head"]))
    assert not _syncs_as_lora(_policy(tiny_llama))


def test_merged_weights_carry_the_checkpoint_names_and_peft_merge(tiny_llama):
    import copy

    import torch
    from vistune_vllm.engine import _merged_state_dict

    model = _policy(tiny_llama, modules_to_save=["lm_head"])
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(2.0)
    ids = torch.tensor([[1, 5, 9, 13]])
    before = model(ids).logits
    state = _merged_state_dict(model)
    expected = copy.deepcopy(model).merge_and_unload().state_dict()
    assert state.keys() == _policy(tiny_llama).state_dict().keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(state[name], tensor, msg=name)
    assert not torch.equal(state["model.layers.0.self_attn.q_proj.weight"],
                           _policy(tiny_llama).state_dict()["model.layers.0.self_attn.q_proj.weight"])  # fmt: skip
    torch.testing.assert_close(model(ids).logits, before)  # the policy itself is left unmerged
