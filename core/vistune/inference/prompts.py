"""The prompt of a :class:`vistune.inference.GenerationRequest` as the model sees it.

Every engine encodes prompts the same way, so all backends accept the same prompts and
count their tokens alike: a conversation with the model's template (as in training), raw
text with the tokenizer as it is, token ids as given (:func:`encode_prompt`).

Engines with their own multimodal processors (vLLM, SGLang) load the checkpoint
themselves and take the images apart from the ids.  vistune's template encoders expand
each image into as many image tokens as the model has features for it, while these
engines expand it themselves, from one placeholder per image: :func:`prompt_ids_and_images`
gives them the ids and the images, and :func:`collapse_image_tokens` turns each run of
image tokens back into the single placeholder the checkpoint's processor writes.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def tokenizer_of(processor: Any) -> Any:
    """The tokenizer of a multimodal processor, or the processor itself if it is a tokenizer."""
    return getattr(processor, "tokenizer", None) or processor


def template_encoder(processor: Any, template_name: str, max_length: int, config: Any = None) -> Any:
    """The :class:`vistune.templates.Encoder` of a registered template; longer prompts are refused.

    The template's own options come from ``config`` (their defaults without one).
    """
    from vistune.options import spec_option_values
    from vistune.plugins import get_plugin_manager
    from vistune.specs import load_ref
    from vistune.templates import TemplateOptions

    template = get_plugin_manager().registries.templates.get(template_name)
    options = TemplateOptions(max_length=max_length, truncation="error",
                              plugin_options=spec_option_values(config, template))  # fmt: skip
    return load_ref(template.factory)(processor, options)


def encode_prompt(prompt: Any, encoder: Any, tokenizer: Any) -> dict[str, Any]:
    """Model inputs of a request's prompt: ``input_ids`` (a list), plus a conversation's image tensors.

    A :class:`vistune.templates.Sample` is encoded with the template ``encoder``, a string
    with ``tokenizer`` as is (no chat template), token ids are checked against the vocabulary.

    :raises vistune.inference.RequestError: for an empty or malformed prompt.
    """
    from vistune.inference.engine import RequestError
    from vistune.templates import Sample

    if isinstance(prompt, Sample):
        inputs = dict(encoder.encode_prompt(prompt))
        inputs["input_ids"] = list(inputs["input_ids"])
        return inputs
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("the prompt is empty", param="prompt")
        return {"input_ids": list(tokenizer(prompt)["input_ids"])}
    if isinstance(prompt, (list, tuple)) and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        vocab = len(tokenizer)
        if not prompt or any(not 0 <= t < vocab for t in prompt):
            raise RequestError(f"prompt token ids must be a non-empty list of ids in [0, {vocab})", param="prompt")
        return {"input_ids": list(prompt)}
    raise RequestError(f"a prompt must be a Sample, a string or token ids, got {type(prompt).__name__}", param="prompt")


# -- engines with their own multimodal processors (vLLM, SGLang) -----------------------------


def load_processor(model_path: str, trust_remote_code: bool) -> Any:
    """The checkpoint's processor (vision models) or tokenizer, without loading weights."""
    from transformers import AutoProcessor, AutoTokenizer

    try:
        return AutoProcessor.from_pretrained(model_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, ImportError, TypeError):
        # e.g. processors that insist on a video processor (torchvision) for an image-only use
        return AutoTokenizer.from_pretrained(model_path, trust_remote_code=trust_remote_code)


def context_length(hf_config: dict[str, Any], max_length: int) -> int:
    """``max_length`` capped by the ``max_position_embeddings`` of a checkpoint's ``config.json``."""
    text_config = hf_config.get("text_config") or hf_config
    model_len = text_config.get("max_position_embeddings") or hf_config.get("max_position_embeddings")
    return min(max_length, model_len) if model_len else max_length


def image_token_id(hf_config: dict[str, Any]) -> int | None:
    """The image placeholder token of a checkpoint's ``config.json`` (Llava: ``image_token_index``)."""
    for key in ("image_token_id", "image_token_index"):
        value = hf_config.get(key)
        if isinstance(value, int):
            return value
    return None


def collapse_image_tokens(input_ids: Sequence[int], token_id: int | None) -> list[int]:
    """``input_ids`` with every run of ``token_id`` replaced by one ``token_id``."""
    if token_id is None:
        return list(input_ids)
    out: list[int] = []
    for token in input_ids:
        if token == token_id and out and out[-1] == token_id:
            continue
        out.append(token)
    return out


def prompt_ids_and_images(prompt: Any, encoder: Any, tokenizer: Any) -> tuple[list[int], list[Any]]:
    """Token ids of a request's prompt (images expanded, as :func:`encode_prompt` gives them),
    and the conversation's images as RGB PIL images.

    :raises vistune.inference.RequestError: for an empty or malformed prompt.
    """
    from vistune.data.readers import open_image
    from vistune.templates import Sample

    ids = encode_prompt(prompt, encoder, tokenizer)["input_ids"]
    if not isinstance(prompt, Sample):
        return ids, []
    return ids, [open_image(image, where=prompt.source).convert("RGB") for image in prompt.images]


class CheckpointPrompts:
    """Prompt encoding for an engine that loads a checkpoint directory itself (vLLM, SGLang).

    :param encoder: the template encoder to use (RL hands over the policy's); default: the
        config's template, or the model type's.
    """

    def __init__(self, model_path: str, model_type: Any, config: Any, encoder: Any = None):
        hf_config = json.loads((Path(model_path) / "config.json").read_text())
        #: ``max_length`` capped by the checkpoint's own context.
        self.max_model_len = context_length(hf_config, config.max_length)
        self.image_token = image_token_id(hf_config)
        processor = load_processor(str(model_path), config.trust_remote_code)
        self.tokenizer = tokenizer_of(processor)
        if encoder is None:
            encoder = template_encoder(processor, config.template or model_type.default_template, self.max_model_len,
                                       config)  # fmt: skip
        self.encoder = encoder

    def encode(self, request: Any, adapters: Any, max_model_len: int) -> tuple[list[int], list[Any], int]:
        """``(ids for the engine, images, prompt length)`` of a request, checked against the
        engine's adapters and context; each image's run of tokens is one placeholder in the ids.

        :raises vistune.inference.RequestError: for a bad prompt, an unknown adapter, or a
            prompt that leaves no room for ``max_tokens``.
        """
        from vistune.inference.engine import check_adapter, check_context

        ids, images = prompt_ids_and_images(request.prompt, self.encoder, self.tokenizer)
        check_adapter(request.adapter, adapters)
        check_context(len(ids), request.sampling, max_model_len)
        return (collapse_image_tokens(ids, self.image_token) if images else ids), images, len(ids)
