"""Loaders of the ``qwen2-vl`` and ``qwen2.5-vl`` model types: ``(path, LoadOptions) -> (model, processor)``."""

from __future__ import annotations

from typing import Any

from vistune.models import LoadOptions

MODEL_CLASSES = {"qwen2-vl": "Qwen2VLForConditionalGeneration", "qwen2.5-vl": "Qwen2_5_VLForConditionalGeneration"}

#: Never quantized by bitsandbytes: the vision encoder with its merger, and the output layer.
#: transformers matches these from the start of a module's full name (or as its last
#: part): the encoder is ``model.visual`` in transformers 5, which a bare "visual" misses.
KEEP_FULL_PRECISION = ("model.visual", "lm_head")


def load_qwen_vl(kind: str, path: str, options: LoadOptions | None = None) -> tuple[Any, Any]:
    """Load a ``kind`` (``qwen2-vl`` or ``qwen2.5-vl``) checkpoint and its image-only processor."""
    import transformers
    from vistune.causal_lm import ensure_pad_token, prepare_loaded_model, pretrained_kwargs

    from vistune_qwen_vl.processor import load_processor

    options = options or LoadOptions()
    kwargs = pretrained_kwargs(options, keep_full_precision=KEEP_FULL_PRECISION)
    model = getattr(transformers, MODEL_CLASSES[kind]).from_pretrained(path, **kwargs)
    processor = load_processor(kind, path, trust_remote_code=options.trust_remote_code)
    ensure_pad_token(processor.tokenizer, model)
    return prepare_loaded_model(model, options), processor


def load_qwen2_vl(path: str, options: LoadOptions | None = None) -> tuple[Any, Any]:
    """Loader of the ``qwen2-vl`` model type (``Qwen2VLForConditionalGeneration``)."""
    return load_qwen_vl("qwen2-vl", path, options)


def load_qwen2_5_vl(path: str, options: LoadOptions | None = None) -> tuple[Any, Any]:
    """Loader of the ``qwen2.5-vl`` model type (``Qwen2_5_VLForConditionalGeneration``)."""
    return load_qwen_vl("qwen2.5-vl", path, options)
