"""Loading text causal LMs, and the ``from_pretrained`` options every model type's loader shares.

:func:`pretrained_kwargs` turns a :class:`vistune.models.LoadOptions` into the keyword
arguments of ``from_pretrained`` (dtype, device placement, attention kernel,
bitsandbytes quantization), so vision model types load exactly like text ones.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from typing import Any

from vistune.errors import ConfigError
from vistune.models import LoadOptions

DEFAULT_ATTN_IMPLEMENTATION = "sdpa"

_DTYPES = ("float32", "bfloat16", "float16")


def resolve_device(device: str) -> str:
    """``"cuda"`` or ``"cpu"``: ``auto`` picks CUDA when a GPU is visible.

    :raises ConfigError: for ``cuda`` on a machine without one.
    """
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device is cuda but torch sees no CUDA GPU", hint="set device: cpu (or auto)")
    if device not in ("cpu", "cuda"):
        raise ConfigError(f"device must be auto, cpu or cuda, got {device!r}")
    return device


def resolve_dtype(dtype: str, device: str) -> Any:
    """The ``torch.dtype`` to load weights in: ``auto`` is bfloat16 on a GPU that supports it, else float32."""
    import torch

    if dtype == "auto":
        if device == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if dtype not in _DTYPES:
        raise ConfigError(f"dtype must be auto, float32, bfloat16 or float16, got {dtype!r}")
    return getattr(torch, dtype)


def _cuda_device_map() -> dict[str, int]:
    # One full copy per process: under torchrun/accelerate each rank loads onto its own GPU.
    return {"": int(os.environ.get("LOCAL_RANK", "0"))}


def _quantization_config(options: LoadOptions, device: str, dtype: Any, keep_full_precision: Sequence[str]) -> Any:
    scheme = options.quantization
    if scheme is None or scheme.method == "prequantized":
        return None
    if scheme.requires_cuda and device != "cuda":
        raise ConfigError(
            f"quantization {scheme.name!r} ({scheme.description}) needs a CUDA GPU, but the model loads on {device}",
            hint="run on a GPU machine, or set quantization: none",
        )
    missing = [module for module in scheme.requires if importlib.util.find_spec(module) is None]
    if missing:
        raise ConfigError(f"quantization {scheme.name!r} needs {', '.join(missing)}, which is not installed",
                          hint=f"pip install {' '.join(missing)}")  # fmt: skip
    from transformers import BitsAndBytesConfig

    kwargs = scheme.bnb_kwargs(options.quantization_options)
    if scheme.method == "bnb-4bit":
        kwargs["bnb_4bit_compute_dtype"] = dtype
    if keep_full_precision:
        # Named modules stay in the load dtype: quantizing the vision tower or the output layer costs accuracy
        # and saves little memory.
        kwargs["llm_int8_skip_modules"] = list(keep_full_precision)
    return BitsAndBytesConfig(**kwargs)


def pretrained_kwargs(options: LoadOptions, *, keep_full_precision: Sequence[str] = ("lm_head",)) -> dict[str, Any]:
    """Keyword arguments for a model class's ``from_pretrained`` that honour ``options``.

    :param keep_full_precision: module names bitsandbytes must not quantize (the output
        layer; for vision models also the vision tower and projector).
    :raises ConfigError: for an unusable device, dtype or quantization on this machine.
    """
    device = resolve_device(options.device)
    dtype = resolve_dtype(options.dtype, device)
    attn = options.attn_implementation or DEFAULT_ATTN_IMPLEMENTATION
    if attn.startswith("flash_attention") and importlib.util.find_spec("flash_attn") is None:
        raise ConfigError(f"attn_implementation {attn!r} needs the flash-attn package, which is not installed",
                          hint="pip install flash-attn, or use attn_implementation: sdpa")  # fmt: skip
    kwargs: dict[str, Any] = {
        "dtype": dtype,
        "attn_implementation": attn,
        "trust_remote_code": options.trust_remote_code,
    }
    quantization_config = _quantization_config(options, device, dtype, keep_full_precision)
    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    if device == "cuda":
        kwargs["device_map"] = _cuda_device_map()
    return kwargs


def disable_cache(model: Any) -> None:
    """``use_cache = False`` on the model's config and on its language model's sub-config.

    With a cache, transformers builds the plain causal mask and packed samples would see
    each other.  Generation is unaffected: ``generate`` reads its own generation config.
    """
    config = getattr(model, "config", None)
    sub_configs = (getattr(config, attr, None) for attr in ("text_config", "language_config", "llm_config"))
    for cfg in (config, *sub_configs):
        if cfg is not None:
            cfg.use_cache = False


def prepare_loaded_model(model: Any, options: LoadOptions) -> Any:
    """What every loader does after ``from_pretrained``: eval mode, or training set-up.

    Training turns the KV cache off (it is useless there and breaks packed sequences) and
    makes the input embeddings require grads, which reentrant gradient checkpointing on a
    frozen base model needs.
    """
    if options.for_training:
        disable_cache(model)
        model.enable_input_require_grads()
    else:
        model.eval()
    return model


def ensure_pad_token(tokenizer: Any, model: Any = None) -> None:
    """Give a tokenizer without a pad token one (its end-of-sequence token), and tell the model."""
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is not None:
            tokenizer.pad_token = tokenizer.eos_token
        elif tokenizer.unk_token is not None:
            tokenizer.pad_token = tokenizer.unk_token
        else:
            raise ConfigError(
                f"the tokenizer {tokenizer.name_or_path!r} has neither a pad, an end-of-sequence nor an unknown token",
                hint="add pad_token to the checkpoint's tokenizer_config.json",
            )
    if model is not None:
        generation_config = getattr(model, "generation_config", None)
        if generation_config is not None and generation_config.pad_token_id is None:
            generation_config.pad_token_id = tokenizer.pad_token_id


def load_causal_lm(path: str, options: LoadOptions | None = None) -> tuple[Any, Any]:
    """Load a text causal LM and its tokenizer from a local directory.

    :returns: ``(model, tokenizer)``; the tokenizer always has a pad token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    options = options or LoadOptions()
    kwargs = pretrained_kwargs(options)
    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=options.trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    ensure_pad_token(tokenizer, model)
    return prepare_loaded_model(model, options), tokenizer
