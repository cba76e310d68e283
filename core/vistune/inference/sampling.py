"""Choosing the next token of every row of a batch, each row with its own parameters.

Rows in one batch belong to different requests: each has its temperature, top-p and
random stream.  The random numbers come from a per-row CPU ``torch.Generator``, so a
seeded request draws the same tokens whatever else shares its batch and whichever
device the model runs on.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import attrs


@attrs.define
class RowSampler:
    """Sampling state of one completion."""

    temperature: float
    top_p: float
    generator: Any = None  # torch.Generator on the CPU, for sampled rows

    @classmethod
    def make(cls, temperature: float, top_p: float, seed: int | None) -> RowSampler:
        import torch

        generator = None
        if temperature > 0:
            generator = torch.Generator(device="cpu")
            # Wrapped to 64 bits: completion i of n is seeded seed + i, which may pass the range
            # torch accepts, and a failure here would fail every request prefilled with this one.
            generator.manual_seed(seed % 2**64 if seed is not None else random.SystemRandom().randrange(2**63))
        return cls(temperature, top_p, generator)


def top_p_filter(probs: Any, top_p: Any) -> Any:
    """Zero all but the smallest set of most likely tokens whose mass reaches ``top_p`` (per row).

    :param probs: ``(rows, vocab)`` probabilities.
    :param top_p: ``(rows, 1)`` thresholds in (0, 1].
    """
    import torch

    sorted_probs, order = probs.sort(dim=-1, descending=True)
    mass_before = sorted_probs.cumsum(dim=-1) - sorted_probs
    sorted_probs = sorted_probs.masked_fill(mass_before >= top_p, 0.0)  # the most likely token always stays
    return torch.zeros_like(probs).scatter(-1, order, sorted_probs)


def sample_next(logits: Any, rows: Sequence[RowSampler]) -> list[int]:
    """The next token id of each row of ``logits`` ``(rows, vocab)``: argmax, or a draw from
    the temperature-scaled, top-p-filtered distribution."""
    import torch

    choice = logits.argmax(dim=-1)
    sampled = [i for i, row in enumerate(rows) if row.temperature > 0]
    if sampled:
        index = torch.tensor(sampled, device=logits.device)
        temperature = torch.tensor([rows[i].temperature for i in sampled], device=logits.device).unsqueeze(1)
        top_p = torch.tensor([rows[i].top_p for i in sampled], device=logits.device).unsqueeze(1)
        probs = torch.softmax(logits[index].float() / temperature, dim=-1)
        if any(rows[i].top_p < 1 for i in sampled):
            probs = top_p_filter(probs, top_p)
        # Inverse-CDF sampling with one CPU uniform per row: reproducible on any device.
        uniforms = torch.cat([torch.rand(1, generator=rows[i].generator) for i in sampled]).to(logits.device)
        cdf = probs.cumsum(dim=-1)
        drawn = torch.searchsorted(cdf, (uniforms * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
        drawn = drawn.clamp(max=probs.shape[-1] - 1)
        choice = choice.index_put((index,), drawn)
    return choice.tolist()
