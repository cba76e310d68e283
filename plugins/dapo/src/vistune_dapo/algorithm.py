"""DAPO as a :class:`vistune.rl.algorithm.RLAlgorithm` (Yu et al. 2025, arXiv:2503.14476).

The four techniques of the paper, each in one place:

* **Clip-higher**: decoupled clipping ``clip(r, 1 - eps_low, 1 + eps_high)`` with
  ``eps_low = 0.2``, ``eps_high = 0.28`` (the spec's ``defaults``; ``epsilon`` and
  ``epsilon_high`` in the config override them).
* **Dynamic sampling** (:meth:`DAPO.select_groups`): a prompt whose completions all got
  the same reward has zero advantage everywhere and only dilutes the batch; such groups
  are dropped and the trainer samples more prompts (``refill_groups``) until the batch is
  full again or ``max_sampling_rounds`` rounds have been drawn.
* **Token-level policy-gradient loss**: ``sum_i sum_t l_it / sum_i |o_i|``, every token of
  the batch weighing the same, so long answers are not under-weighted.
* **Overlong reward shaping** (:meth:`DAPO.shape_rewards`, the paper's eq. 13): with
  ``L_max = max_completion_length`` and a buffer ``L_cache``, a completion of length
  ``|y|`` gets ``0`` if ``|y| <= L_max - L_cache``, ``((L_max - L_cache) - |y|) / L_cache``
  inside the buffer, and ``-1`` beyond ``L_max``, added to its reward (times
  ``overlong_penalty``).

Advantages are GRPO's group-normalised rewards ``(r_i - mean(r)) / std(r)``; there is no
KL term (``beta: 0`` by default).
"""

from __future__ import annotations

from typing import Any, ClassVar

from vistune.errors import ConfigError
from vistune.rl.algorithm import PolicyBatch, PolicyLoss, RLAlgorithm, RolloutStats, read_options
from vistune.rl.objectives import clipped_policy_loss, group_normalised_advantages
from vistune_dapo.options import DAPO_OPTIONS

__all__ = ["DAPO", "overlong_penalty"]

#: The paper's buffer: 4096 of 20480 tokens.
DEFAULT_BUFFER_FRACTION = 0.2


def overlong_penalty(lengths: Any, max_length: int, buffer: int, factor: float = 1.0) -> Any:
    """The soft overlong punishment of each completion length (0 or negative)."""
    import torch

    expected = max_length - buffer
    penalty = (expected - lengths.to(torch.float32)) / buffer * factor
    return torch.clamp(penalty, min=-factor, max=0.0)


class DAPO(RLAlgorithm):
    """Decoupled Clip and Dynamic sAmpling Policy Optimization.

    :param config: the run's :class:`vistune.config.RunConfig`; reads ``epsilon``,
        ``epsilon_high``, ``beta``, ``max_completion_length`` and ``algorithm_options``
        (see ``OPTIONS``).
    """

    name = "dapo"
    #: Options and their defaults (declared, with their help, in :mod:`vistune_dapo.options`).
    OPTIONS: ClassVar[dict[str, Any]] = {option.name: option.default for option in DAPO_OPTIONS}

    def __init__(self, config: Any):
        options = read_options(self.name, config, self.OPTIONS)
        self.beta = float(config.beta)
        self.epsilon_low = float(config.epsilon)
        self.epsilon_high = float(config.epsilon_high if config.epsilon_high is not None else config.epsilon)
        self.refill_groups = options["dynamic_sampling"]
        self.max_sampling_rounds = options["max_sampling_rounds"] if self.refill_groups else 1
        self.overlong_shaping = options["overlong_shaping"]
        self.max_completion_length = int(config.max_completion_length)
        buffer = options["overlong_buffer"]
        if buffer is None:
            buffer = max(1, round(DEFAULT_BUFFER_FRACTION * self.max_completion_length))
        if isinstance(buffer, bool) or not isinstance(buffer, int) or not 1 <= buffer <= self.max_completion_length:
            raise ConfigError(
                f"algorithm_options: overlong_buffer of dapo must be a whole number of tokens in "
                f"1..max_completion_length ({self.max_completion_length}), got {buffer!r}"
            )
        self.overlong_buffer = buffer
        self.overlong_factor = options["overlong_penalty"]
        self.std_epsilon = options["std_epsilon"]
        self.num_iterations = options["num_iterations"]
        if self.num_iterations < 1 or self.max_sampling_rounds < 1:
            raise ConfigError("algorithm_options: num_iterations and max_sampling_rounds of dapo must be at least 1")

    def __repr__(self) -> str:
        return (f"DAPO(epsilon=({self.epsilon_low}, {self.epsilon_high}), dynamic_sampling={self.refill_groups}, "
                f"max_sampling_rounds={self.max_sampling_rounds}, overlong_buffer={self.overlong_buffer if self.overlong_shaping else None}, "
                f"beta={self.beta}, num_iterations={self.num_iterations})")  # fmt: skip

    def shape_rewards(self, rewards: Any, rollout: RolloutStats) -> Any:
        if not self.overlong_shaping:
            return rewards
        penalty = overlong_penalty(
            rollout.completion_lengths.to(rewards.device), rollout.max_completion_length, self.overlong_buffer,
            self.overlong_factor,
        )  # fmt: skip
        return rewards + penalty.to(rewards.dtype)

    def select_groups(self, rewards: Any) -> Any:
        import torch

        if not self.refill_groups:
            return torch.ones(rewards.shape[0], dtype=torch.bool, device=rewards.device)
        # keep a group when at least two of its rewards differ; all equal (or fewer than two scored) -> no signal
        low = torch.where(torch.isnan(rewards), torch.full_like(rewards, float("inf")), rewards).min(dim=1).values
        high = torch.where(torch.isnan(rewards), torch.full_like(rewards, float("-inf")), rewards).max(dim=1).values
        return torch.isfinite(low) & torch.isfinite(high) & (high > low)

    def advantages(self, rewards: Any) -> Any:
        return group_normalised_advantages(rewards, self.std_epsilon)

    def loss(self, batch: PolicyBatch) -> PolicyLoss:
        # per-token ratios clipped with clip-higher's range; every token of the batch weighs the same
        loss, metrics = clipped_policy_loss(batch, epsilon_low=self.epsilon_low, epsilon_high=self.epsilon_high,
                                            ratio_level="token", normalisation="token", beta=self.beta)  # fmt: skip
        return PolicyLoss(loss, metrics)
