"""vistune requests and config in vLLM's terms.  Pure functions: no vllm import, testable anywhere.

Prompts reach vLLM as token ids from vistune's own template encoder, so a model is
prompted exactly as it was trained; for vision prompts each image's run of image tokens
is collapsed back to one placeholder (:func:`vistune.inference.prompts.collapse_image_tokens`)
and vLLM's multimodal processor expands it again from the image.
"""

from __future__ import annotations

from typing import Any

from vistune.errors import ConfigError
from vistune.options import option_values
from vistune.specs import Option

#: The backend's own settings (``vllm: {enforce_eager: true}`` in a config), passed to ``AsyncEngineArgs``.
OPTIONS = (
    Option("enforce_eager", "bool", False, "run without CUDA graphs: starts faster, decodes slower"),
    Option("max_loras", "int", 4, "LoRA adapters the engine holds at once (when adapters are served)", minimum=1),
)

#: vistune quantization names -> vLLM's ``quantization`` argument.  Checkpoints quantized
#: ahead of time load as saved; bitsandbytes NF4 is quantized by vLLM at load time.
QUANTIZATION = {
    "none": None,
    "awq": "awq",
    "gptq": "gptq",
    "fp8": "fp8",
    "nf4": "bitsandbytes",
    "q4_k_m": "bitsandbytes",
}


def quantization(name: str) -> str | None:
    """vLLM's ``quantization`` for a vistune ``quantization`` value.

    :raises ConfigError: for schemes vLLM cannot load (bitsandbytes 8-bit, FP4).
    """
    if name not in QUANTIZATION:
        raise ConfigError(f"quantization {name!r} is not supported by the vllm backend; supported: "
                          f"{', '.join(k for k in QUANTIZATION if k != 'none')}",
                          hint="use quantization: nf4, a prequantized awq/gptq/fp8 checkpoint, or backend: transformers")  # fmt: skip
    return QUANTIZATION[name]


def sampling_kwargs(sampling: Any, *, stream: bool) -> dict[str, Any]:
    """Keyword arguments of ``vllm.SamplingParams`` for a :class:`vistune.inference.SamplingParams`.

    Streams ask for deltas (``RequestOutputKind.DELTA``, given here as its name), blocking
    calls for the final output only.
    """
    return {
        "n": sampling.n,
        "max_tokens": sampling.max_tokens,
        "temperature": float(sampling.temperature),
        "top_p": float(sampling.top_p),
        "stop": list(sampling.stop) or None,
        "seed": sampling.seed,
        "ignore_eos": sampling.ignore_eos,
        "skip_special_tokens": True,
        "output_kind": "DELTA" if stream else "FINAL_ONLY",
    }


def engine_kwargs(model_path: str, config: Any, *, max_model_len: int | None, max_lora_rank: int | None
                  ) -> dict[str, Any]:  # fmt: skip
    """Keyword arguments of ``vllm.AsyncEngineArgs`` from a run config; LoRA is enabled with a ``max_lora_rank``."""
    options = option_values(config, "vllm", OPTIONS)
    kwargs: dict[str, Any] = {
        "model": model_path,
        "tokenizer": model_path,
        "dtype": config.dtype,
        "quantization": quantization(config.quantization),
        "tensor_parallel_size": config.tensor_parallel_size,
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "trust_remote_code": config.trust_remote_code,
        "seed": config.seed,
        "enable_lora": max_lora_rank is not None,
        "disable_log_stats": True,
        "enforce_eager": options["enforce_eager"],
    }
    if config.max_batch_size != "auto":  # auto: vLLM's default, whose scheduler takes what its KV cache holds
        kwargs["max_num_seqs"] = max(config.max_batch_size, 1)
    if max_model_len is not None:
        kwargs["max_model_len"] = max_model_len
    if max_lora_rank is not None:
        kwargs["max_lora_rank"] = max_lora_rank
        kwargs["max_loras"] = options["max_loras"]
    return kwargs
