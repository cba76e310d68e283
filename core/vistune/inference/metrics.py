"""Scores of generated answers against references, for ``vistune infer``'s ``metrics``.

``bleu``
    ``nltk``'s ``sentence_bleu`` per sample (references and prediction split on
    whitespace, lower-cased; smoothing method 1, so short answers without a matching
    4-gram do not all score 0), averaged over the samples that have a reference.
``exact_match``
    1 when the prediction equals a reference after stripping and collapsing whitespace
    (case-sensitive), else 0; averaged likewise.

A reference may be one string or a list of strings (any of them counts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from vistune.errors import ConfigError


def _references(reference: Any) -> list[str]:
    if reference is None:
        return []
    if isinstance(reference, str):
        return [reference] if reference.strip() else []
    return [r for r in reference if isinstance(r, str) and r.strip()]


def bleu(prediction: str, references: Sequence[str]) -> float:
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    return float(sentence_bleu([r.lower().split() for r in references], prediction.lower().split(),
                               smoothing_function=SmoothingFunction().method1))  # fmt: skip


def exact_match(prediction: str, references: Sequence[str]) -> float:
    normal = " ".join(prediction.split())
    return float(any(normal == " ".join(r.split()) for r in references))


METRICS: dict[str, Callable[[str, Sequence[str]], float]] = {"bleu": bleu, "exact_match": exact_match}


def check_metrics(names: Sequence[str]) -> None:
    """:raises ConfigError: for a metric name vistune does not know."""
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise ConfigError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}",
                          hint="rewards: can score outputs with any registered reward too")  # fmt: skip


def score(names: Sequence[str], predictions: Sequence[str], references: Sequence[Any]) -> dict[str, list[float | None]]:
    """Per metric, the score of each prediction (``None`` where it has no reference)."""
    check_metrics(names)
    out = {}
    for name in names:
        metric = METRICS[name]
        scores = []
        for prediction, reference in zip(predictions, references):
            refs = _references(reference)
            scores.append(metric(prediction, refs) if refs else None)
        out[name] = scores
    return out
