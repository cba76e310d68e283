"""Running a dataset's ``builder`` with the dataset's option values, and naming the copy it builds.

A :class:`vistune.specs.Dataset`'s options change what its builder writes (how many
samples, which seed), so a copy built with values other than the defaults gets a
directory of its own: the dataset's name and a short hash of the values that differ from
the defaults.  A run with other values never reads a copy built for different ones, and
the defaults keep the plain name, so copies built before datasets took options stay valid
(an option added later with a default leaves existing names as they are).

A builder receives the values as ``options=`` when its signature has that parameter (or
``**kwargs``); ``builder(directory, spec)`` builders written before options existed are
called as before.
"""

from __future__ import annotations

import hashlib
import inspect
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vistune.specs import Dataset, load_ref

#: Hex digits of the hash that keys a copy built with non-default options.
DIGEST_LENGTH = 10


def changed_options(spec: Dataset, values: Mapping[str, Any]) -> dict[str, Any]:
    """The option ``values`` that differ from the defaults ``spec`` declares, by option name."""
    return {o.name: values[o.name] for o in spec.options if o.name in values and values[o.name] != o.default}


def copy_name(spec: Dataset, values: Mapping[str, Any]) -> str:
    """The directory name of the copy built with ``values``: ``shapes-captions``, or ``shapes-captions-<hash>``."""
    changed = changed_options(spec, values)
    if not changed:
        return spec.name
    text = json.dumps(changed, sort_keys=True, separators=(",", ":"), default=str)
    return f"{spec.name}-{hashlib.sha256(text.encode()).hexdigest()[:DIGEST_LENGTH]}"


def takes_options(builder: Any) -> bool:
    """Whether ``builder`` accepts ``options=`` (a parameter of that name, or ``**kwargs``)."""
    try:
        parameters = inspect.signature(builder).parameters.values()
    except (TypeError, ValueError):  # no signature to read: called the way every builder can be
        return False
    keyword = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return any(p.kind is inspect.Parameter.VAR_KEYWORD or (p.name == "options" and p.kind in keyword)
               for p in parameters)  # fmt: skip


def run_builder(spec: Dataset, directory: str | Path, values: Mapping[str, Any]) -> Any:
    """``spec.builder(directory, spec, options=values)``, or ``(directory, spec)`` for a builder without options."""
    builder = load_ref(spec.builder)
    if takes_options(builder):
        return builder(directory, spec, options=dict(values))
    return builder(directory, spec)
