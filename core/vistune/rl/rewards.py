"""Rewards as a run calls them: loaded from plugins or local files, scored, weighted and combined.

A reward is ``reward(prompts, completions, **columns) -> list[float | None]``:
``prompts`` holds each completion's prompt (its conversation, a list of
``{"role", "content"}`` messages), ``columns`` the dataset record's other fields and
``images``, each a list with one entry per completion.  A reward may be a coroutine
function; the async rewards of a batch run concurrently.

Where a reward comes from (a config ``rewards`` entry, see :class:`vistune.plan.RewardUse`):

* a registered name: the plugin's ``Reward.factory(**options)`` builds it;
* ``path/to/file.py:Name``: the file is imported; a class is instantiated with
  ``Name(**options)``, a function is called with the options as extra keyword
  arguments, any other callable is used as is.

Combining (the rule for ``None``): the total reward of a completion is the weighted sum
``sum_k w_k r_k`` over the rewards that scored it; a reward that returned ``None`` for it
is left out of the sum (it does not count as 0).  When no reward applies to a
completion its total is ``NaN``: the completion is left out of its group's statistics
and gets a zero advantage, so it neither helps nor hurts.

Errors: a reward that raises (or returns a non-finite score) for a sample is reported
with the reward's name, the sample's ``source`` (``file:line``), prompt and completion.
Under ``reward_error_policy: raise`` (the default) the run stops with a
:class:`RewardError`; under ``skip`` that sample's score from that reward is ``None``
and the run goes on (the count is logged as ``reward_errors/<name>``).  A reward that
returns a list of the wrong length is a bug in the reward and always stops the run.
"""

from __future__ import annotations

import asyncio
import importlib.util
import inspect
import math
import sys
import threading
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from vistune.errors import PluginError, VistuneError
from vistune.specs import load_ref

__all__ = ["LoadedReward", "RewardError", "RewardScorer", "combine", "load_reward", "load_rewards"]


class RewardError(VistuneError):
    """A reward failed on a sample (names the reward, the sample and what it raised)."""


@attrs.define
class LoadedReward:
    """A reward ready to call: its log name, weight and the callable."""

    name: str
    weight: float
    function: Any
    #: Where it came from, for error messages ("plugin vistune-bleu-reward", "file rewards.py").
    origin: str = ""


def _import_file(path: Path) -> Any:
    """Import a Python file as a module of its own (not on sys.path, so nothing else is shadowed)."""
    module_name = f"vistune_reward_file_{abs(hash(str(path.resolve())))}"
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise PluginError(f"reward file {path} cannot be imported")
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        del sys.modules[module_name]
        raise PluginError(f"reward file {path} raised on import: {type(exc).__name__}: {exc}") from exc
    return module


def _from_object(obj: Any, options: Mapping[str, Any], where: str) -> Any:
    if inspect.isclass(obj):
        try:
            return obj(**options)
        except TypeError as exc:
            raise PluginError(f"{where}: cannot instantiate {obj.__name__}(**{dict(options)!r}): {exc}") from exc
    if inspect.isfunction(obj) or inspect.ismethod(obj):
        if not options:
            return obj

        def with_options(prompts, completions, **columns):
            # an async function's coroutine is returned as it is: the scorer awaits whatever is awaitable
            return obj(prompts, completions, **columns, **options)

        return with_options
    if callable(obj):
        if options:
            raise PluginError(f"{where} is a callable object, which cannot take options {dict(options)!r}",
                              hint="make it a class (instantiated with the options) or a function")  # fmt: skip
        return obj
    raise PluginError(f"{where} is a {type(obj).__name__}, not a function or class")


def load_reward(use: Any, owner: str = "") -> LoadedReward:
    """Build one :class:`vistune.plan.RewardUse` into a callable reward."""
    options = dict(use.options or {})
    if use.file is not None:
        module = _import_file(Path(use.file))
        where = f"reward {use.name!r}"
        try:
            obj = getattr(module, use.attribute)
        except AttributeError:
            raise PluginError(f"reward file {use.file} defines no {use.attribute!r}") from None
        function = _from_object(obj, options, where)
        return LoadedReward(f"{Path(use.file).stem}:{use.attribute}", use.weight, function, f"file {use.file}")
    spec = use.spec
    origin = owner or f"reward {spec.name!r}"
    try:
        factory = load_ref(spec.factory)
    except (ImportError, AttributeError) as exc:
        raise PluginError(f"reward {spec.name!r} ({origin}): factory {spec.factory!r} cannot be loaded: {exc}") from exc
    try:
        function = factory(**options)
    except TypeError as exc:
        raise PluginError(f"reward {spec.name!r} ({origin}) rejected its options {options!r}: {exc}",
                          hint="check the reward's options: in the config") from exc  # fmt: skip
    if not callable(function):
        raise PluginError(f"reward {spec.name!r} ({origin}): factory returned {function!r}, which is not callable")
    return LoadedReward(spec.name, use.weight, function, origin)


def load_rewards(uses: Sequence[Any], plugin_manager: Any = None) -> list[LoadedReward]:
    """Build every reward of a plan; names used twice get ``#2``, ``#3`` suffixes in logs."""
    rewards = []
    seen: dict[str, int] = {}
    for use in uses:
        owner = ""
        if use.spec is not None and plugin_manager is not None and use.spec.name in plugin_manager.registries.rewards:
            owner = str(plugin_manager.registries.rewards.owner(use.spec.name))
        reward = load_reward(use, owner)
        seen[reward.name] = seen.get(reward.name, 0) + 1
        if seen[reward.name] > 1:
            reward.name = f"{reward.name}#{seen[reward.name]}"
        rewards.append(reward)
    return rewards


def _valid_score(score: Any) -> bool:
    if score is None:
        return True
    return isinstance(score, (int, float)) and not isinstance(score, bool) and math.isfinite(score)


def _run_coroutines(coroutines: list[Any]) -> list[Any]:
    """Await ``coroutines`` concurrently; results or exceptions, in order.

    Runs in a fresh event loop, in a helper thread when the caller already runs one
    (a notebook), since a loop cannot be nested.
    """

    async def gather():
        return await asyncio.gather(*coroutines, return_exceptions=True)

    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(gather())
    box: list[Any] = []
    thread = threading.Thread(target=lambda: box.append(asyncio.run(gather())))
    thread.start()
    thread.join()
    return box[0]


def _where_raised(exc: BaseException) -> str:
    frames = traceback.extract_tb(exc.__traceback__)
    return f" (at {frames[-1].filename}:{frames[-1].lineno})" if frames else ""


def _short(text: Any, limit: int = 200) -> str:
    text = repr(text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


class RewardScorer:
    """Scores batches of completions with a run's rewards.

    :param rewards: the loaded rewards.
    :param error_policy: ``raise`` or ``skip`` (see the module docstring).
    """

    def __init__(self, rewards: Sequence[LoadedReward], error_policy: str = "raise"):
        if error_policy not in ("raise", "skip"):
            raise ValueError(f"error_policy must be raise or skip, got {error_policy!r}")
        self.rewards = list(rewards)
        self.error_policy = error_policy
        #: reward name -> samples skipped after an error, since the last :meth:`pop_error_counts`.
        self.error_counts: dict[str, int] = {}

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards]

    @property
    def weights(self) -> dict[str, float]:
        return {r.name: r.weight for r in self.rewards}

    def pop_error_counts(self) -> dict[str, int]:
        counts, self.error_counts = self.error_counts, {}
        return counts

    def score(
        self,
        prompts: Sequence[Any],
        completions: Sequence[str],
        columns: Mapping[str, Sequence[Any]] | None = None,
        sources: Sequence[str] | None = None,
    ) -> dict[str, list[float | None]]:
        """Every reward's scores (unweighted): reward name -> one score or ``None`` per completion."""
        columns = {key: list(values) for key, values in (columns or {}).items()}
        n = len(completions)
        if len(prompts) != n or any(len(v) != n for v in columns.values()):
            raise ValueError("score() needs one prompt and one value of every column per completion")
        sources = list(sources) if sources is not None else [""] * n
        results: dict[str, Any] = {}
        pending: list[tuple[LoadedReward, Any]] = []
        for reward in self.rewards:
            try:
                result = reward.function(list(prompts), list(completions), **columns)
            except Exception as exc:  # noqa: BLE001 - a reward is user code: any failure is reported per sample
                results[reward.name] = exc
                continue
            if inspect.isawaitable(result):
                pending.append((reward, result))
            else:
                results[reward.name] = result
        if pending:
            for (reward, _), outcome in zip(pending, _run_coroutines([c for _, c in pending])):
                results[reward.name] = outcome
        scores = {}
        for reward in self.rewards:
            scores[reward.name] = self._checked(reward, results[reward.name], prompts, completions, columns, sources)
        return scores

    # -- failure handling ------------------------------------------------------------

    def _checked(self, reward, result, prompts, completions, columns, sources) -> list[float | None]:
        n = len(completions)
        if isinstance(result, BaseException):
            # the batch call raised: score the samples one by one to find which, and keep the others
            outcomes = [self._score_one(reward, prompts[i], completions[i], {k: [v[i]] for k, v in columns.items()})
                        for i in range(n)]  # fmt: skip
        elif isinstance(result, (list, tuple)) and len(result) == n:
            outcomes = list(result)
        else:
            got = f"{len(result)} scores" if isinstance(result, (list, tuple)) else _short(result)
            raise RewardError(
                f"reward {reward.name!r} ({reward.origin}) returned {got} for {n} completions",
                hint="a reward returns a list with one float (or None) per completion",
            )
        out: list[float | None] = []
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, BaseException) or not _valid_score(outcome):
                self._fail(reward, i, outcome, prompts, completions, sources)
                out.append(None)
            else:
                out.append(None if outcome is None else float(outcome))
        if isinstance(result, BaseException) and self.error_policy == "raise":
            # the batch call raised, every sample alone succeeded: report the batch
            raise RewardError(
                f"reward {reward.name!r} ({reward.origin}) raised on a batch of {n} completions "
                f"(first sample {sources[0] or 'without source'}): {type(result).__name__}: {result}"
                f"{_where_raised(result)}"
            ) from result
        return out

    def _score_one(self, reward, prompt, completion, columns) -> Any:
        try:
            result = reward.function([prompt], [completion], **columns)
            if inspect.isawaitable(result):
                result = _run_coroutines([result])[0]
        except Exception as exc:  # noqa: BLE001 - reported with the sample by the caller
            return exc
        if isinstance(result, BaseException):
            return result
        if not isinstance(result, (list, tuple)) or len(result) != 1:
            return ValueError(f"returned {_short(result)} for one completion")
        return result[0]

    def _fail(self, reward, i, outcome, prompts, completions, sources) -> None:
        if isinstance(outcome, BaseException):
            what = f"raised {type(outcome).__name__}: {outcome}{_where_raised(outcome)}"
        else:
            what = f"returned {outcome!r}, which is not a finite number or None"
        message = (
            f"reward {reward.name!r} ({reward.origin}) {what}\n"
            f"  sample: {sources[i] or '(no source)'}\n"
            f"  prompt: {_short(prompts[i])}\n"
            f"  completion: {_short(completions[i])}"
        )
        if self.error_policy == "raise":
            error = RewardError(
                message, hint="fix the reward, or set reward_error_policy: skip to score such samples None"
            )
            if isinstance(outcome, BaseException):
                raise error from outcome
            raise error
        self.error_counts[reward.name] = self.error_counts.get(reward.name, 0) + 1


def combine(scores: Mapping[str, Sequence[float | None]], weights: Mapping[str, float]) -> list[float]:
    """Weighted total per completion: ``sum_k w_k r_k`` over the rewards that scored it, ``NaN`` if none did."""
    names = list(scores)
    n = len(next(iter(scores.values()))) if scores else 0
    totals = []
    for i in range(n):
        applied = [(weights[name], scores[name][i]) for name in names if scores[name][i] is not None]
        totals.append(sum(w * s for w, s in applied) if applied else math.nan)
    return totals
