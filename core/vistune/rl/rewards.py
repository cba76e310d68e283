"""Rewards as a run calls them: loaded from plugins or local files, scored, weighted and combined.

A reward returns one score per completion, ``list[float | None]`` (``None``: it does not
apply to that sample).  It is called with keyword arguments, as TRL's ``GRPOTrainer`` and
ms-swift call theirs, each a list with one entry per completion:

* ``prompts``: the completion's prompt, a conversation (a list of ``{"role", "content"}``
  messages whose text marks images with ``<image>``), as in TRL's conversational format;
* ``completions``: the completion's text, a plain string (what TRL passes for
  standard-format datasets and ms-swift always passes; not TRL's list of messages);
* ``completion_ids``: the completion's token ids (``rl`` only);
* every other field of the dataset record by name (``answer``, ``solution``...) and
  ``images``, the record's opened images;

and ``trainer_state``, the ``rl`` run's ``transformers.TrainerState`` (``None`` elsewhere).
A reward names the arguments it uses and takes ``**kwargs`` for the rest
(``def reward(completions, solution, **kwargs)``); one without ``**kwargs`` is given only
the arguments it names.  vistune's positional form ``reward(prompts, completions,
**columns)`` is the same call.  Written positionally under names of its own
(``def reward(ps, cs, **columns)``), a reward whose first two parameters are not named
after other arguments of the call gets the prompts and completions as those two.  A
reward may be a coroutine function; the async rewards of a batch run concurrently.

Where a reward comes from (a config ``rewards`` entry, see :class:`vistune.plan.RewardUse`):

* a registered name: the plugin's ``Reward.factory(**options)`` builds it;
* ``path/to/file.py:Name``: the file is imported and ``Name`` is taken from it, or, when
  the file has no such name, from its ms-swift ``orms`` dict (``orms = {"Name": Class}``);
  ``path/to/file.py`` alone takes the one entry of that dict.  A class is instantiated
  with ``Name(**options)`` (with no options, as TRL and ms-swift users write them), a
  function is given the options as extra keyword arguments, any other callable is used as is.

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
Under ``skip``, ``vistune rl`` also stops on a reward that fails on every sample of
:data:`FAILED_BATCHES_LIMIT` scoring batches in a row (or of every batch of a run that
ends sooner): skipping its samples would leave it nothing to say, and a run with only
that reward would train on nothing.  :attr:`RewardScorer.failures` keeps each reward's
failure count and first error for the run's summary (``vistune infer`` reports them,
and exits non-zero).
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import inspect
import math
import numbers
import sys
import threading
import traceback
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from vistune.errors import PluginError, VistuneError
from vistune.specs import load_ref

__all__ = ["LoadedReward", "RewardError", "RewardFailures", "RewardScorer", "call_reward", "combine", "load_reward",
           "load_rewards"]  # fmt: skip

#: Scoring batches in a row on which a reward may fail every sample before ``rl`` stops (see the module docstring).
FAILED_BATCHES_LIMIT = 3

#: The arguments a reward is given besides the dataset record's fields.
CALL_ARGUMENTS = ("prompts", "completions", "completion_ids", "trainer_state")


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


def _file_attribute(module: Any, file: Path, attribute: str | None) -> tuple[str, Any]:
    """``(name, object)`` a reward file offers under ``attribute``.

    A top-level name first, else an entry of the file's ms-swift ``orms`` dict; with no
    attribute (``file.py`` alone) the dict's one entry.
    """
    orms = getattr(module, "orms", None)
    orms = orms if isinstance(orms, Mapping) else {}
    if attribute is None:
        if len(orms) == 1:
            return next(iter(orms.items()))
        found = f"an orms dict with {len(orms)} entries ({', '.join(map(str, orms))})" if orms else "no orms dict"
        raise PluginError(f"reward file {file} names no reward and has {found}",
                          hint=f"name the reward: {file}:Name")  # fmt: skip
    if hasattr(module, attribute):
        return attribute, getattr(module, attribute)
    if attribute in orms:
        return attribute, orms[attribute]
    entries = f" (its orms dict holds {', '.join(map(str, orms))})" if orms else ""
    raise PluginError(f"reward file {file} defines no {attribute!r}{entries}")


def _from_object(obj: Any, options: Mapping[str, Any], where: str) -> Any:
    if inspect.isclass(obj):
        try:
            return obj(**options)
        except TypeError as exc:
            raise PluginError(f"{where}: cannot instantiate {obj.__name__}(**{dict(options)!r}): {exc}") from exc
    if inspect.isfunction(obj) or inspect.ismethod(obj):
        # a partial keeps the function's signature (less the options), which call_reward reads
        return functools.partial(obj, **options) if options else obj
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
        attribute, obj = _file_attribute(module, Path(use.file), use.attribute)
        function = _from_object(obj, options, f"reward {use.name!r}")
        return LoadedReward(f"{Path(use.file).stem}:{attribute}", use.weight, function, f"file {use.file}")
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


_POSITIONAL = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
_BY_NAME = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)


def _parameters(function: Any) -> Mapping[str, inspect.Parameter] | None:
    """``function``'s parameters, or None when Python cannot tell them (some built-in callables)."""
    try:
        return inspect.signature(function).parameters
    except (TypeError, ValueError):
        return None


def _takes_pair_by_position(parameters: Mapping[str, inspect.Parameter], arguments: Mapping[str, Any]) -> bool:
    """Whether prompts and completions go to the reward's first two parameters by position.

    They do when those parameters are positional and neither is named after another argument
    of the call: vistune's positional form under names of its own (``reward(ps, cs, **columns)``).
    Named ``prompts`` and ``completions`` they bind the same either way.
    """
    first, second, *_ = [p.name for p in parameters.values() if p.kind in _POSITIONAL] + [None, None]
    if first is None or second is None:
        return False
    return (first == "prompts" or first not in arguments) and (second == "completions" or second not in arguments)


def call_reward(function: Any, prompts: list[Any], completions: list[Any], **arguments: Any) -> Any:
    """Call ``function`` as a reward, by keyword (see the module docstring).

    :param arguments: ``completion_ids``, ``trainer_state`` and the dataset record's fields.
    :returns: what the reward returns: its scores, or an awaitable of them.
    """
    arguments = {"prompts": prompts, "completions": completions, **arguments}
    parameters = _parameters(function)
    if parameters is None:
        return function(**arguments)
    by_position = _takes_pair_by_position(parameters, arguments)
    if by_position:
        arguments = {k: v for k, v in arguments.items() if k not in ("prompts", "completions")}
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters.values()):
        arguments = {k: v for k, v in arguments.items() if k in parameters and parameters[k].kind in _BY_NAME}
    return function(prompts, completions, **arguments) if by_position else function(**arguments)


def _valid_score(score: Any) -> bool:
    if score is None:
        return True
    return isinstance(score, numbers.Real) and not isinstance(score, bool) and math.isfinite(score)


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


@attrs.define
class RewardFailures:
    """One reward's failures under ``skip``, over the scorer's life."""

    #: Samples it failed on.
    samples: int = 0
    #: The first failure, one line: what the reward raised or returned, and on which sample.
    first_error: str = ""
    #: Scoring batches so far, and the latest of them in a row in which it failed every sample.
    batches: int = 0
    failed_batches_in_a_row: int = 0


class RewardScorer:
    """Scores batches of completions with a run's rewards.

    :param rewards: the loaded rewards.
    :param error_policy: ``raise`` or ``skip`` (see the module docstring).
    :param max_failed_batches: under ``skip``, stop (:class:`RewardError`) once a reward has
        failed on every sample of this many batches in a row; None to go on regardless (a
        caller that reports :attr:`failures` itself).
    """

    def __init__(
        self, rewards: Sequence[LoadedReward], error_policy: str = "raise", max_failed_batches: int | None = None
    ):
        if error_policy not in ("raise", "skip"):
            raise ValueError(f"error_policy must be raise or skip, got {error_policy!r}")
        self.rewards = list(rewards)
        self.error_policy = error_policy
        self.max_failed_batches = max_failed_batches
        #: reward name -> samples skipped after an error, since the last :meth:`pop_error_counts`.
        self.error_counts: dict[str, int] = {}
        #: reward name -> its failures since the scorer was made.
        self.failures: dict[str, RewardFailures] = {r.name: RewardFailures() for r in self.rewards}

    @property
    def names(self) -> list[str]:
        return [r.name for r in self.rewards]

    @property
    def weights(self) -> dict[str, float]:
        return {r.name: r.weight for r in self.rewards}

    def pop_error_counts(self) -> dict[str, int]:
        counts, self.error_counts = self.error_counts, {}
        return counts

    def raise_if_failing_throughout(self, finished: bool = False) -> None:
        """Raise :class:`RewardError` for a reward that failed on every sample of the latest
        ``max_failed_batches`` batches or, once the run is ``finished``, of every batch it scored."""
        for reward in self.rewards:
            record = self.failures.setdefault(reward.name, RewardFailures())
            streak = record.failed_batches_in_a_row
            whole_run = finished and streak == record.batches
            too_long = self.max_failed_batches is not None and streak >= self.max_failed_batches
            if not streak or not (whole_run or too_long):
                continue
            raise RewardError(
                f"reward {reward.name!r} ({reward.origin}) failed on every sample of {streak} scoring batch(es) in a "
                f"row ({record.samples} failed sample(s) in all); first error: {record.first_error}",
                hint="fix the reward: reward_error_policy: skip leaves out the samples a reward fails on, and this "
                "one fails on all of them, which would train on nothing",
            )

    def _count_batch(self, reward: LoadedReward, failed: int, n: int) -> None:
        """Count a scored batch of ``n`` samples, ``failed`` of them failed, and stop a reward that fails throughout."""
        record = self.failures.setdefault(reward.name, RewardFailures())
        record.batches += 1
        record.failed_batches_in_a_row = record.failed_batches_in_a_row + 1 if n and failed == n else 0
        self.raise_if_failing_throughout()

    def score(
        self,
        prompts: Sequence[Any],
        completions: Sequence[str],
        columns: Mapping[str, Sequence[Any]] | None = None,
        sources: Sequence[str] | None = None,
        *,
        completion_ids: Sequence[Sequence[int]] | None = None,
        trainer_state: Any = None,
    ) -> dict[str, list[float | None]]:
        """Every reward's scores (unweighted): reward name -> one score or ``None`` per completion.

        :param columns: the dataset records' fields, each a list with one value per completion.
        :param completion_ids: each completion's token ids, when known.
        :param trainer_state: the training run's ``TrainerState``, given to every reward.
        """
        columns = {key: list(values) for key, values in (columns or {}).items()}
        clash = sorted(set(columns) & set(CALL_ARGUMENTS))
        if clash:
            raise ValueError(f"the dataset's column(s) {clash} have the names of reward arguments {CALL_ARGUMENTS}")
        if completion_ids is not None:
            columns["completion_ids"] = [list(ids) for ids in completion_ids]
        n = len(completions)
        if len(prompts) != n or any(len(v) != n for v in columns.values()):
            raise ValueError("score() needs one prompt and one value of every column per completion")
        sources = list(sources) if sources is not None else [""] * n
        shared = {"trainer_state": trainer_state}
        results: dict[str, Any] = {}
        pending: list[tuple[LoadedReward, Any]] = []
        for reward in self.rewards:
            try:
                result = call_reward(reward.function, list(prompts), list(completions), **columns, **shared)
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
            scores[reward.name] = self._checked(
                reward, results[reward.name], prompts, completions, columns, sources, shared
            )
        return scores

    # -- failure handling ------------------------------------------------------------

    def _checked(self, reward, result, prompts, completions, columns, sources, shared) -> list[float | None]:
        n = len(completions)
        if isinstance(result, BaseException):
            # the batch call raised: score the samples one by one to find which, and keep the others
            outcomes = [self._score_one(reward, prompts[i], completions[i], {k: [v[i]] for k, v in columns.items()},
                                        shared) for i in range(n)]  # fmt: skip
        elif isinstance(result, (list, tuple)) and len(result) == n:
            outcomes = list(result)
        else:
            got = f"{len(result)} scores" if isinstance(result, (list, tuple)) else _short(result)
            raise RewardError(
                f"reward {reward.name!r} ({reward.origin}) returned {got} for {n} completions",
                hint="a reward returns a list with one float (or None) per completion",
            )
        out: list[float | None] = []
        failed = 0
        for i, outcome in enumerate(outcomes):
            if isinstance(outcome, BaseException) or not _valid_score(outcome):
                self._fail(reward, i, outcome, prompts, completions, sources)
                out.append(None)
                failed += 1
            else:
                out.append(None if outcome is None else float(outcome))
        if isinstance(result, BaseException) and self.error_policy == "raise":
            # the batch call raised, every sample alone succeeded: report the batch
            raise RewardError(
                f"reward {reward.name!r} ({reward.origin}) raised on a batch of {n} completions "
                f"(first sample {sources[0] or 'without source'}): {type(result).__name__}: {result}"
                f"{_where_raised(result)}"
            ) from result
        self._count_batch(reward, failed, n)
        return out

    def _score_one(self, reward, prompt, completion, columns, shared) -> Any:
        try:
            result = call_reward(reward.function, [prompt], [completion], **columns, **shared)
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
        record = self.failures.setdefault(reward.name, RewardFailures())
        record.samples += 1
        if not record.first_error:
            record.first_error = " ".join(f"{what} (sample {sources[i] or 'without source'})".split())[:500]


def combine(scores: Mapping[str, Sequence[float | None]], weights: Mapping[str, float]) -> list[float]:
    """Weighted total per completion: ``sum_k w_k r_k`` over the rewards that scored it, ``NaN`` if none did."""
    names = list(scores)
    n = len(next(iter(scores.values()))) if scores else 0
    totals = []
    for i in range(n):
        applied = [(weights[name], scores[name][i]) for name in names if scores[name][i] is not None]
        totals.append(sum(w * s for w, s in applied) if applied else math.nan)
    return totals
