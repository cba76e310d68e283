"""vistune requests and config in SGLang's terms.  Pure functions: no sglang import, testable anywhere.

The names follow sglang 0.5's offline API: ``sglang.Engine(**server_args)`` (fields of
``ServerArgs``), ``Engine.async_generate(input_ids=..., sampling_params={...},
image_data=..., lora_path=..., stream=...)``, sampling parameters as a dict of
``SamplingParams`` fields, and outputs as dicts ``{"text", "output_ids", "meta_info":
{"finish_reason": {"type": ...}, "prompt_tokens", "completion_tokens"}}``.

A request for ``n`` completions is sent as ``n`` requests of one completion each,
completion ``i`` seeded with ``seed + i`` (vistune's rule for every backend); SGLang's
prefix cache shares their prompt.
"""

from __future__ import annotations

from typing import Any

from vistune.errors import ConfigError

#: vistune quantization names -> SGLang's ``quantization`` server argument.
QUANTIZATION = {
    "none": None,
    "awq": "awq",
    "gptq": "gptq",
    "fp8": "fp8",
    "nf4": "bitsandbytes",
    "q4_k_m": "bitsandbytes",
}
#: vistune dtype -> SGLang's ``dtype`` choices.
DTYPES = {"auto": "auto", "float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def quantization(name: str) -> str | None:
    """SGLang's ``quantization`` for a vistune ``quantization`` value.

    :raises ConfigError: for schemes SGLang cannot load.
    """
    if name not in QUANTIZATION:
        raise ConfigError(f"quantization {name!r} is not supported by the sglang backend; supported: "
                          f"{', '.join(k for k in QUANTIZATION if k != 'none')}",
                          hint="use quantization: nf4, a prequantized awq/gptq/fp8 checkpoint, or backend: transformers")  # fmt: skip
    return QUANTIZATION[name]


def sampling_params(sampling: Any, index: int = 0) -> dict[str, Any]:
    """SGLang's ``sampling_params`` dict for completion ``index`` of a vistune request."""
    return {
        "max_new_tokens": sampling.max_tokens,
        "temperature": float(sampling.temperature),
        "top_p": float(sampling.top_p),
        "stop": list(sampling.stop) or None,
        "ignore_eos": sampling.ignore_eos,
        "skip_special_tokens": True,
        "n": 1,
        "sampling_seed": None if sampling.seed is None else sampling.seed + index,
    }


def generate_kwargs(input_ids: list[int], images: list[Any], lora_path: str | None, *, stream: bool) -> dict[str, Any]:
    """Keyword arguments of ``sglang.Engine.async_generate`` for one completion (sampling params apart)."""
    kwargs: dict[str, Any] = {"input_ids": list(input_ids), "stream": stream}
    if images:
        kwargs["image_data"] = list(images)
    if lora_path is not None:
        kwargs["lora_path"] = lora_path
    return kwargs


def engine_kwargs(
    model_path: str, config: Any, *, context_length: int | None, lora_paths: dict[str, str]
) -> dict[str, Any]:
    """``sglang.Engine(**kwargs)`` (``ServerArgs`` fields) from a run config."""
    kwargs: dict[str, Any] = {
        "model_path": model_path,
        "tp_size": config.tensor_parallel_size,
        "mem_fraction_static": config.gpu_memory_utilization,
        "dtype": DTYPES[config.dtype],
        "quantization": quantization(config.quantization),
        "trust_remote_code": config.trust_remote_code,
        "random_seed": config.seed,
        "log_level": "error",
    }
    if config.max_batch_size != "auto":  # auto: SGLang sizes its batches from the memory its KV cache gets
        kwargs["max_running_requests"] = max(config.max_batch_size, 1)
    if context_length is not None:
        kwargs["context_length"] = context_length
    if lora_paths:
        kwargs["enable_lora"] = True
        kwargs["lora_paths"] = [f"{name}={path}" for name, path in lora_paths.items()]
    return kwargs


def finish_reason(meta_info: dict[str, Any]) -> str | None:
    """``"stop"``/``"length"`` from an output's ``meta_info`` (``None`` while it runs).

    :raises RuntimeError: for an aborted request.
    """
    reason = meta_info.get("finish_reason")
    if reason is None:
        return None
    kind = reason.get("type") if isinstance(reason, dict) else str(reason)
    if kind == "abort":
        message = reason.get("message") if isinstance(reason, dict) else None
        raise RuntimeError(f"SGLang aborted the request: {message or reason}")
    return "length" if kind == "length" else "stop"


class CumulativeOutput:
    """Turns SGLang's streamed outputs (cumulative ``text`` and ``output_ids``) into deltas."""

    def __init__(self) -> None:
        self.text = ""
        self.token_ids: list[int] = []

    def delta(self, output: dict[str, Any]) -> tuple[str, list[int]]:
        text = output.get("text") or ""
        ids = list(output.get("output_ids") or [])
        if text.startswith(self.text) and ids[: len(self.token_ids)] == self.token_ids:
            new_text, new_ids = text[len(self.text) :], ids[len(self.token_ids) :]
            self.text, self.token_ids = text, ids
        else:  # an incremental chunk (incremental_streaming_output)
            new_text, new_ids = text, ids
            self.text, self.token_ids = self.text + text, self.token_ids + ids
        return new_text, new_ids
