"""The interface between the RL trainer and an RL algorithm plugin.

The trainer owns everything that is the same for every group-relative policy-gradient
method: sampling ``num_generations`` completions per prompt, computing their per-token
log-probabilities under the policy, the behaviour policy and (when asked) a reference
model, calling the rewards, and running the optimizer.  The algorithm decides the rest,
at five points of each step:

1. :meth:`RLAlgorithm.shape_rewards`: turn the combined reward of each completion into
   the reward the algorithm trains on (DAPO's overlong punishment, RLOO's KL penalty).
2. :meth:`RLAlgorithm.select_groups`: which prompt groups to train on (DAPO's dynamic
   sampling drops groups whose rewards are all equal).  When ``refill_groups`` is true the
   trainer samples more prompts, up to ``max_sampling_rounds`` times, until the batch
   holds as many groups as it was asked for.
3. :meth:`RLAlgorithm.advantages`: rewards grouped per prompt -> advantages.
4. :meth:`RLAlgorithm.needs_reference_model`: whether reference log-probabilities are
   computed (a KL term).
5. :meth:`RLAlgorithm.loss`: the policy loss from per-token log-probabilities, with its
   clipping, importance-ratio level, KL term and normalisation.

The building blocks in :mod:`vistune.rl.objectives` make each of these a few lines.
An algorithm is constructed by its :class:`vistune.specs.Algorithm` factory from the
run's :class:`vistune.config.RunConfig`; algorithm-specific settings are the spec's
declared ``options``, set in the algorithm's section of the config (or its
``algorithm_options``) and read with :func:`read_options`.

Tensors: ``N`` completions = ``G`` groups x ``n`` completions per group, in group
order; ``T`` completion tokens (right-padded, ``mask`` marks real tokens).  A reward
is ``NaN`` for a completion no reward applied to (see :mod:`vistune.rl.rewards`);
advantages must come out finite (the trainer also zeroes the advantage of such
completions, so they never move the policy).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Protocol, runtime_checkable

import attrs

from vistune.errors import ConfigError
from vistune.specs import Option

__all__ = ["PolicyBatch", "PolicyLoss", "RLAlgorithm", "RolloutStats", "read_options"]


@attrs.frozen
class RolloutStats:
    """What the trainer knows about each sampled completion when rewards are shaped.

    :ivar completion_lengths: ``(N,)`` number of generated tokens (end-of-sequence included).
    :ivar truncated: ``(N,)`` bool, the completion hit ``max_completion_length`` without ending.
    :ivar max_completion_length: the generation limit of the run.
    :ivar kl: ``(N,)`` per-sequence ``sum_t log pi_old - log pi_ref`` (the sampled estimate
        of KL(pi_old || pi_ref)), or ``None`` when the algorithm needs no reference model.
    """

    completion_lengths: Any
    truncated: Any
    max_completion_length: int
    kl: Any = None


@attrs.frozen
class PolicyBatch:
    """Everything a policy loss needs for one micro-batch of completions.

    :ivar logps: ``(B, T)`` log-probabilities of the completion tokens under the policy
        being trained (carries gradients).
    :ivar old_logps: ``(B, T)`` the same under the policy that sampled them (detached).
        Equal to ``logps.detach()`` while each rollout is used for one update.
    :ivar ref_logps: ``(B, T)`` under the reference model, or ``None`` when
        :meth:`RLAlgorithm.needs_reference_model` is false.
    :ivar mask: ``(B, T)`` float, 1.0 on real completion tokens.
    :ivar advantages: ``(B,)`` one advantage per completion.
    :ivar num_sequences: completions in the batch the loss is normalised over.
    :ivar num_tokens: completion tokens in that batch.  Given the counts of a whole
        batch, a loss normalised "over the batch" gives the same gradient however the
        batch is split into micro-batches.  vistune's trainer passes each micro-batch's
        own counts (the later micro-batches of an accumulated step are not sampled yet)
        and averages the micro-batches' losses.
    :ivar max_completion_length: the generation limit (Dr. GRPO's constant normaliser).
    """

    logps: Any
    old_logps: Any
    ref_logps: Any
    mask: Any
    advantages: Any
    num_sequences: int
    num_tokens: int
    max_completion_length: int


@attrs.frozen
class PolicyLoss:
    """The scalar to minimise and the numbers to log for it.

    ``metrics`` values are floats averaged over the micro-batch.  Conventional names the
    trainer logs as they are: ``kl``, ``clip_fraction/low``, ``clip_fraction/high``,
    ``clip_fraction/region``, ``importance_ratio``.
    """

    loss: Any
    metrics: Mapping[str, float] = attrs.field(factory=dict)


@runtime_checkable
class RLAlgorithm(Protocol):
    """What an algorithm plugin's factory returns.

    Subclass it explicitly to inherit the defaults below (no reward shaping, every
    group kept, a reference model exactly when ``beta > 0``) and override what differs.
    """

    #: The registered name, for logs and error messages.
    name: str = "rl-algorithm"
    #: Coefficient of the KL term against the reference model.
    beta: float = 0.0
    #: Optimizer steps taken on each rollout batch (GRPO's mu); above 1 the importance
    #: ratio differs from 1 and clipping becomes active.
    num_iterations: int = 1
    #: Sample more prompts to replace the groups :meth:`select_groups` drops (DAPO).
    refill_groups: bool = False
    #: Sampling rounds per batch when refilling (the first round included).
    max_sampling_rounds: int = 1

    def needs_reference_model(self) -> bool:
        """Whether the trainer must compute reference log-probabilities (default: ``beta > 0``)."""
        return self.beta > 0

    def shape_rewards(self, rewards: Any, rollout: RolloutStats) -> Any:
        """``(N,)`` combined rewards -> the ``(N,)`` rewards advantages are computed from.

        Default: unchanged.  Keep ``NaN`` (no reward applied) as ``NaN``.
        """
        return rewards

    def select_groups(self, rewards: Any) -> Any:
        """``(G, n)`` rewards as the reward functions gave them (before shaping) -> ``(G,)`` bool,
        the groups to train on (default: all)."""
        import torch

        return torch.ones(rewards.shape[0], dtype=torch.bool, device=rewards.device)

    def advantages(self, rewards: Any) -> Any:
        """``(G, n)`` shaped rewards -> ``(G, n)`` finite advantages."""
        raise NotImplementedError

    def loss(self, batch: PolicyBatch) -> PolicyLoss:
        """The policy loss of one micro-batch (see :class:`PolicyBatch`)."""
        raise NotImplementedError


def read_options(algorithm: str, config: Any, defaults: Mapping[str, Any] | Sequence[Option]) -> dict[str, Any]:
    """The algorithm's options from the config over ``defaults``; an unknown key is a ConfigError.

    The options come from the algorithm's section (``grpo: {num_iterations: 2}``) and from
    ``algorithm_options``, its older spelling.  ``defaults`` is the spec's declared
    :class:`~vistune.specs.Option` tuple, whose values the config has already checked, or
    a mapping of defaults; a value is then converted to the type of its default (an int
    where a float is expected is fine; a string where a number is expected is not).
    """
    if not isinstance(defaults, Mapping):
        defaults = {option.name: option.default for option in defaults}
    given = dict(getattr(config, "algorithm_options", None) or {})
    given.update((getattr(config, "options", None) or {}).get(algorithm, {}))
    unknown = sorted(set(given) - set(defaults))
    if unknown:
        allowed = ", ".join(sorted(defaults)) or "none"
        raise ConfigError(
            f"algorithm_options: {', '.join(map(repr, unknown))} not understood by algorithm {algorithm!r}",
            hint=f"options of {algorithm}: {allowed}",
        )
    options = dict(defaults)
    for key, value in given.items():
        default = defaults[key]
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            if ok and isinstance(default, int):
                ok = float(value).is_integer()  # false for 2.5, and for YAML's .inf and .nan
            if ok:
                value = type(default)(value)
        elif isinstance(default, str):
            ok = isinstance(value, str)
        else:
            ok = True
        if not ok:
            raise ConfigError(
                f"algorithm_options: {key} of algorithm {algorithm!r} must be like {default!r}, got {value!r}"
            )
        options[key] = value
    return options
