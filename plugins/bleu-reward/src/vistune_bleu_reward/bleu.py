"""The ``bleu`` reward: ``nltk.translate.bleu_score.sentence_bleu`` of each completion.

Options (declared on the spec as :data:`OPTIONS`; set in a ``bleu:`` section of the config,
or in a ``rewards:`` entry's ``options:``, which wins):

``column``
    the record column holding the reference: one string or a list of strings (several
    references).  Default: the first of ``reference``, ``references``, ``caption``,
    ``answer`` that the batch has.  (The ``rl`` pipeline gives a record's final
    assistant message as ``answer``.)
``smoothing``
    an ``nltk.translate.bleu_score.SmoothingFunction`` method name, ``method0`` (none)
    to ``method7``; default ``method1`` (Chen & Cherry's epsilon smoothing: short
    captions have no matching 4-grams, and without smoothing BLEU would be 0 for all).
``max_order``
    longest n-gram, with uniform weights ``1/max_order``; default 4.
``lowercase``
    compare case-insensitively (default true).
``tokenizer``
    ``whitespace`` (default: ``str.split``) or ``words`` (runs of word characters,
    each punctuation mark a token of its own, so "circle." matches "circle").  nltk's
    ``word_tokenize`` is not used: it needs the punkt data, which is not installed
    offline.

A record without a reference (column absent, ``None`` or empty) scores ``None``.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from typing import Any

from vistune.errors import ConfigError
from vistune.specs import Option

DEFAULT_COLUMNS = ("reference", "references", "caption", "answer")
TOKENIZERS = ("whitespace", "words")
#: nltk's SmoothingFunction methods.
SMOOTHINGS = tuple(f"method{i}" for i in range(8))

#: The options of the reward, with :func:`make_bleu`'s defaults (a test keeps the two equal).
OPTIONS = (
    Option("column", "str", None, "record column holding the reference (default: reference, references, caption "
           "or answer, the first the batch has)"),  # fmt: skip
    Option("smoothing", "str", "method1", "nltk SmoothingFunction method (method0: none)", choices=SMOOTHINGS),
    Option("max_order", "int", 4, "longest n-gram, weighted uniformly", minimum=1),
    Option("lowercase", "bool", True, "compare case-insensitively"),
    Option("tokenizer", "str", "whitespace", "whitespace (str.split) or words (punctuation split off)",
           choices=TOKENIZERS),  # fmt: skip
)
_WORDS = re.compile(r"\w+|[^\w\s]")


def tokenize(text: str, tokenizer: str = "whitespace", lowercase: bool = True) -> list[str]:
    """The tokens BLEU compares."""
    if lowercase:
        text = text.lower()
    if tokenizer == "words":
        return _WORDS.findall(text)
    return text.split()


def _references(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value] if value.strip() else []
    if isinstance(value, Sequence):
        return [v for v in value if isinstance(v, str) and v.strip()]
    return [str(value)]


def make_bleu(
    column: str | None = None,
    smoothing: str = "method1",
    max_order: int = 4,
    lowercase: bool = True,
    tokenizer: str = "whitespace",
):
    """Build the reward ``bleu(prompts, completions, **columns) -> list[float | None]``."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu

    if tokenizer not in TOKENIZERS:
        raise ConfigError(f"bleu reward: tokenizer must be one of {', '.join(TOKENIZERS)}, got {tokenizer!r}")
    if isinstance(max_order, bool) or not isinstance(max_order, int) or max_order < 1:
        raise ConfigError(f"bleu reward: max_order must be a positive integer, got {max_order!r}")
    smoother = getattr(SmoothingFunction(), smoothing, None) if isinstance(smoothing, str) else None
    if not isinstance(smoothing, str) or not smoothing.startswith("method") or smoother is None:
        raise ConfigError(f"bleu reward: smoothing must be one of method0 ... method7, got {smoothing!r}")
    weights = (1.0 / max_order,) * max_order

    def bleu(prompts, completions, **columns):
        name = column
        if name is None:
            name = next((c for c in DEFAULT_COLUMNS if c in columns), None)
        if name is None or name not in columns:
            return [None] * len(completions)
        scores: list[float | None] = []
        for completion, value in zip(completions, columns[name]):
            references = [tokenize(r, tokenizer, lowercase) for r in _references(value)]
            if not references:
                scores.append(None)
                continue
            hypothesis = tokenize(completion or "", tokenizer, lowercase)
            if not hypothesis:
                scores.append(0.0)
                continue
            with warnings.catch_warnings():
                # without smoothing nltk warns on every n-gram order with no match; the score says it already
                warnings.simplefilter("ignore", UserWarning)
                score = sentence_bleu(references, hypothesis, weights=weights, smoothing_function=smoother)
            scores.append(float(score))
        return scores

    bleu.__name__ = "bleu"
    return bleu
