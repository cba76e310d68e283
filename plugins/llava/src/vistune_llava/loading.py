"""Loaders of the ``llava`` and ``llava-next`` model types: ``(path, LoadOptions) -> (model, processor)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vistune.models import LoadOptions

from vistune_llava.plugin import PROJECTOR, VISION_TOWER

MODEL_CLASSES = {"llava": "LlavaForConditionalGeneration", "llava-next": "LlavaNextForConditionalGeneration"}

#: Never quantized by bitsandbytes: the vision tower, the projector and the output layer.
#: Quantizing them saves little memory and costs accuracy; the projector is usually
#: trained.  transformers matches these from the start of a module's full name (or as
#: its last part), so the towers are named by their full prefixes: a bare
#: "vision_tower" would match nothing under ``model.``.
KEEP_FULL_PRECISION = (*VISION_TOWER, *PROJECTOR, "lm_head")

#: Vision towers with a class token in front of the patch features.
_TOWERS_WITH_CLS = ("clip_vision_model",)


def complete_processor(processor: Any, config: Any) -> Any:
    """Fill in what older Llava processor configs leave out, from the model's config.

    Checkpoints converted before processors expanded ``<image>`` themselves have no
    ``patch_size`` or ``vision_feature_select_strategy`` in ``processor_config.json``;
    the processor then cannot count image tokens.  The model's config knows both.
    """
    if getattr(processor, "patch_size", None) is None:
        vision = config.vision_config
        processor.patch_size = vision.patch_size
        processor.num_additional_image_tokens = 1 if getattr(vision, "model_type", "") in _TOWERS_WITH_CLS else 0
    if getattr(processor, "vision_feature_select_strategy", None) is None:
        processor.vision_feature_select_strategy = config.vision_feature_select_strategy
    return processor


def load_llava_model(
    kind: str, path: str, options: LoadOptions | None = None, *, adjust_config: Callable[[Any], None] | None = None
) -> tuple[Any, Any]:
    """Load a Llava (``kind="llava"``) or Llava-NeXT (``"llava-next"``) checkpoint and its processor.

    Honours ``options``: dtype (``auto`` is bfloat16 on a CUDA GPU that supports it,
    else float32), device, attention kernel (default ``sdpa``), bitsandbytes quantization
    (vision tower, projector and ``lm_head`` stay unquantized; needs CUDA) and
    ``trust_remote_code``.

    :param adjust_config: called with the checkpoint's config before the weights are
        loaded, to load a variant (plugins that extend this one use it).
    :raises vistune.errors.ConfigError: for a device, dtype or quantization this machine
        cannot provide (quantization on CPU, for one).
    """
    import transformers
    from vistune.causal_lm import ensure_pad_token, prepare_loaded_model, pretrained_kwargs

    options = options or LoadOptions()
    kwargs = pretrained_kwargs(options, keep_full_precision=KEEP_FULL_PRECISION)
    if adjust_config is not None:
        config = transformers.AutoConfig.from_pretrained(path, trust_remote_code=options.trust_remote_code)
        adjust_config(config)
        kwargs["config"] = config
    model = getattr(transformers, MODEL_CLASSES[kind]).from_pretrained(path, **kwargs)
    processor = transformers.AutoProcessor.from_pretrained(path, trust_remote_code=options.trust_remote_code)
    complete_processor(processor, model.config)
    ensure_pad_token(processor.tokenizer, model)
    return prepare_loaded_model(model, options), processor


def load_llava(path: str, options: LoadOptions | None = None) -> tuple[Any, Any]:
    """Loader of the ``llava`` model type (``LlavaForConditionalGeneration``)."""
    return load_llava_model("llava", path, options)


def load_llava_next(path: str, options: LoadOptions | None = None) -> tuple[Any, Any]:
    """Loader of the ``llava-next`` model type (``LlavaNextForConditionalGeneration``)."""
    return load_llava_model("llava-next", path, options)
