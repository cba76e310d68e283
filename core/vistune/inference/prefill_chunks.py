"""Where a long prompt's prefill is cut into chunks, so that running rows keep decoding.

A prefill of a few thousand tokens takes the GPU for tens to hundreds of milliseconds,
and every running row waits that long for its next token.  The engine therefore
prefills a prompt longer than its chunk budget a chunk at a time, with a decode step of
the running rows between chunks (vLLM and SGLang call this chunked prefill).

Images are the constraint: a model turns ``pixel_values`` into features and puts them
at the image placeholder tokens of the same call, so every placeholder must be in the
call that gets the pixels.  The first chunk therefore reaches past the last placeholder
and takes all the prompt's media; the chunks after it are text only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

#: Config fields that name a model's media placeholder tokens.
MEDIA_TOKEN_FIELDS = ("image_token_id", "image_token_index", "video_token_id", "video_token_index")
#: Encoded-prompt keys that are not media: anything else goes with the first chunk.
TEXT_KEYS = frozenset({"input_ids", "attention_mask", "labels"})


def media_token_ids(config: Any) -> set[int]:
    """The placeholder token ids a model's ``config`` declares (empty for a text model)."""
    found = set()
    for name in MEDIA_TOKEN_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and value >= 0:
            found.add(value)
    return found


def chunk_bounds(inputs: dict[str, Any], budget: int, media_tokens: set[int]) -> list[int] | None:
    """The ends of the chunks of an encoded prompt (the last is its length), or ``None``
    when it is prefilled in one call: it fits the ``budget``, or it has media the model's
    placeholders cannot locate (then only one call keeps features and tokens together)."""
    ids: Sequence[int] = inputs["input_ids"]
    length = len(ids)
    if length <= budget:
        return None
    first = budget
    if any(key not in TEXT_KEYS and inputs[key] is not None for key in inputs):
        placeholders = [i for i, token in enumerate(ids) if token in media_tokens]
        if not placeholders:
            return None
        first = max(first, placeholders[-1] + 1)
    bounds = [min(first, length)]
    while bounds[-1] < length:
        bounds.append(min(bounds[-1] + budget, length))
    return bounds if len(bounds) > 1 else None
