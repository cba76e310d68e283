"""Prompts for engines with their own multimodal processors (vLLM, SGLang).

vistune's template encoders expand each image into as many image tokens as the model
has features for it.  Engines such as vLLM and SGLang do that expansion themselves,
from one placeholder per image: :func:`collapse_image_tokens` turns each run of image
tokens back into the single placeholder the checkpoint's processor writes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


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
    """Token ids of a :class:`vistune.inference.GenerationRequest` prompt, and its images as PIL images.

    A :class:`vistune.templates.Sample` is encoded with the template ``encoder`` (ids with
    images expanded), a string with ``tokenizer`` as is, token ids are checked.

    :raises vistune.inference.RequestError: for an empty or malformed prompt.
    """
    from vistune.inference.engine import RequestError
    from vistune.templates import Sample

    if isinstance(prompt, Sample):
        ids = list(encoder.encode_prompt(prompt)["input_ids"])
        return ids, [_as_pil(image, prompt.source) for image in prompt.images]
    if isinstance(prompt, str):
        if not prompt:
            raise RequestError("the prompt is empty", param="prompt")
        return list(tokenizer(prompt)["input_ids"]), []
    if (
        isinstance(prompt, (list, tuple))
        and prompt
        and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt)
    ):
        vocab = len(tokenizer)
        if any(not 0 <= t < vocab for t in prompt):
            raise RequestError(f"prompt token ids must be in [0, {vocab})", param="prompt")
        return list(prompt), []
    raise RequestError(f"a prompt must be a Sample, a string or token ids, got {type(prompt).__name__}", param="prompt")


def _as_pil(image: Any, source: str) -> Any:
    from PIL import Image

    if isinstance(image, Image.Image):
        return image.convert("RGB")
    from vistune.data.readers import open_image

    return open_image(image, where=source).convert("RGB")
