"""The interface between datasets and models: samples in, token ids and tensors out.

A template's factory builds an :class:`Encoder` for one processor.  Everything a
pipeline feeds a model goes through ``encode`` (training) or ``encode_prompt``
(generation), so a new chat format is one plugin, not a change to the pipelines.
"""

from __future__ import annotations

from typing import Any, Protocol

import attrs

IMAGE_TAG = "<image>"
IGNORE_INDEX = -100


@attrs.define
class Sample:
    """One conversation, in vistune's normal form.

    ``messages`` are ``{"role": "system"|"user"|"assistant", "content": str}``;
    each ``<image>`` tag in a content string marks where the next image of ``images``
    goes.  ``images`` holds PIL images or paths.  ``columns`` keeps the record's other
    fields (reference answers for rewards, ids).  ``source`` is ``file:line`` for
    error messages.
    """

    messages: list[dict[str, str]]
    images: list[Any] = attrs.field(factory=list)
    columns: dict[str, Any] = attrs.field(factory=dict)
    source: str = ""


@attrs.frozen
class TemplateOptions:
    max_length: int = 2048
    #: "error" raises on a sample longer than max_length; "drop" makes encode return None.
    truncation: str = "error"
    #: The template's own declared options (its spec's ``options``) with the run's values, defaults filled in.
    plugin_options: dict[str, Any] = attrs.field(factory=dict, converter=dict)


class Encoder(Protocol):
    """What a template's factory returns."""

    def encode(self, sample: Sample) -> dict[str, Any] | None:
        """Encode a full conversation for training.

        Returns ``input_ids`` and ``labels`` (lists of ints; ``labels`` is -100
        everywhere but on assistant answers and their end-of-turn token) plus the
        model's image inputs as tensors (``pixel_values`` and, per model,
        ``image_sizes`` or ``image_grid_thw``).  Returns ``None`` for a sample dropped
        by ``truncation: drop``; raises :class:`vistune.errors.DataError` naming
        ``sample.source`` otherwise.
        """

    def encode_prompt(self, sample: Sample) -> dict[str, Any]:
        """Encode the conversation up to a generation prompt for the next assistant turn."""

    def decode(self, token_ids: list[int]) -> str:
        """Text of generated token ids, without special tokens."""
