"""The Prometheus text exposition format (version 0.0.4) for ``GET /metrics``.

Written by hand: the format is a few lines per metric, and the server should not need
``prometheus_client`` for it.  Counters are named ``..._total`` (``..._seconds_total``
for seconds), as Prometheus' naming conventions ask; values are the server's and the
engine's cumulative counters, which a scraper turns into rates.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping

import attrs

#: The ``Content-Type`` of the text format.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Prefix of the metrics made from an engine's ``stats()``.
ENGINE_PREFIX = "vistune_engine_"

_INVALID = re.compile(r"[^a-zA-Z0-9_:]")


@attrs.frozen
class Metric:
    """One sample without labels: ``kind`` is ``counter`` or ``gauge``."""

    name: str
    kind: str
    help: str
    value: float


def engine_metrics(stats: Mapping[str, object], descriptions: Mapping[str, str]) -> list[Metric]:
    """Counters from an engine's ``stats()`` snapshot: ``requests`` becomes ``vistune_engine_requests_total``,
    ``prefill_seconds`` ``vistune_engine_prefill_seconds_total``.  Values that are not numbers are left out."""
    metrics = []
    for key, value in stats.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        name = ENGINE_PREFIX + _INVALID.sub("_", key) + "_total"
        metrics.append(Metric(name, "counter", descriptions.get(key, key), value))
    return metrics


def _value(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def render(metrics: Iterable[Metric]) -> str:
    """The exposition text of ``metrics``: ``# HELP``, ``# TYPE`` and the sample of each, newline-terminated."""
    lines = []
    for metric in metrics:
        if metric.kind not in ("counter", "gauge"):
            raise ValueError(f"metric {metric.name}: kind must be counter or gauge, got {metric.kind!r}")
        lines += [f"# HELP {metric.name} {_help(metric.help)}", f"# TYPE {metric.name} {metric.kind}",
                  f"{metric.name} {_value(metric.value)}"]  # fmt: skip
    return "\n".join(lines) + "\n"
