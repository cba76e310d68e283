"""GRPO and its relatives as :class:`vistune.rl.algorithm.RLAlgorithm` implementations.

* :class:`GRPO`, Shao et al. 2024 (DeepSeekMath), eq. 3: advantages ``(r_i - mean(r)) /
  std(r)`` within each prompt's group; the PPO-clipped per-token ratio; the token losses
  averaged over each sequence, then over sequences; plus ``beta`` times the k3 KL estimate
  against the reference model.
* :class:`DrGRPO`, Liu et al. 2025 ("Understanding R1-Zero-like training"): the same
  without dividing by the group std and with a constant normaliser
  (``sequences x max_completion_length``) instead of each sequence's length.
* :class:`GSPO`, Zheng et al. 2025: one importance ratio per sequence,
  ``s_i = exp(mean_t log(pi_theta / pi_old))``, clipped per sequence.
* :class:`RLOO`, Ahmadian et al. 2024: advantage ``r_i - mean_{j != i} r_j`` (leave-one-out
  baseline), REINFORCE on the whole sequence's log-probability, and the KL to the
  reference model subtracted from the reward (``r - beta * sum_t log pi_old/pi_ref``)
  rather than added to the loss.

The options each class understands (``grpo: {...}`` or ``algorithm_options``) are in its ``OPTIONS``; ``epsilon``,
``epsilon_high`` and ``beta`` are ordinary config keys.
"""

from __future__ import annotations

from typing import Any, ClassVar

from vistune.errors import ConfigError
from vistune.rl.algorithm import PolicyBatch, PolicyLoss, RLAlgorithm, RolloutStats, read_options
from vistune.rl.objectives import (
    NORMALISATIONS,
    clipped_policy_loss,
    group_normalised_advantages,
    leave_one_out_baseline,
)
from vistune_grpo.options import DR_GRPO_OPTIONS, GRPO_OPTIONS, defaults_of

__all__ = ["GRPO", "GSPO", "RLOO", "DrGRPO"]


class GRPO(RLAlgorithm):
    """Group Relative Policy Optimization.

    :param config: the run's :class:`vistune.config.RunConfig`; reads ``beta``,
        ``epsilon``, ``epsilon_high`` and ``algorithm_options`` (see ``OPTIONS``).
    """

    name = "grpo"
    #: Options and their defaults (declared, with their help, in :mod:`vistune_grpo.options`).
    OPTIONS: ClassVar[dict[str, Any]] = defaults_of(GRPO_OPTIONS)
    #: ``token``: one ratio per token; GSPO uses ``sequence``, RLOO ``sequence_sum``.
    ratio_level = "token"

    def __init__(self, config: Any):
        self.beta = float(config.beta)
        self.epsilon_low = float(config.epsilon)
        self.epsilon_high = float(config.epsilon_high if config.epsilon_high is not None else config.epsilon)
        self.configure(read_options(self.name, config, self.OPTIONS))
        if self.num_iterations < 1:
            raise ConfigError(f"algorithm_options: num_iterations of {self.name} must be at least 1")

    def configure(self, options: dict[str, Any]) -> None:
        """Take the algorithm's ``algorithm_options`` (already checked against ``OPTIONS``)."""
        self.loss_normalisation = options["loss_normalisation"]
        if self.loss_normalisation not in NORMALISATIONS:
            raise ConfigError(
                f"algorithm_options: loss_normalisation of {self.name} must be one of {', '.join(NORMALISATIONS)}, "
                f"got {self.loss_normalisation!r}"
            )
        self.scale_rewards = options["scale_rewards"]
        self.std_epsilon = options["std_epsilon"]
        self.num_iterations = options["num_iterations"]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(beta={self.beta}, epsilon=({self.epsilon_low}, {self.epsilon_high}), "
                f"ratio={self.ratio_level}, loss_normalisation={self.loss_normalisation}, "
                f"scale_rewards={self.scale_rewards}, num_iterations={self.num_iterations})")  # fmt: skip

    def advantages(self, rewards: Any) -> Any:
        return group_normalised_advantages(rewards, self.std_epsilon, scale=self.scale_rewards)

    def kl_in_loss(self) -> bool:
        """Whether ``beta`` weighs a KL term of the loss (GRPO) rather than a reward penalty (RLOO)."""
        return True

    def loss(self, batch: PolicyBatch) -> PolicyLoss:
        loss, metrics = clipped_policy_loss(
            batch,
            epsilon_low=self.epsilon_low,
            epsilon_high=self.epsilon_high,
            ratio_level=self.ratio_level,
            normalisation=self.loss_normalisation,
            beta=self.beta if self.kl_in_loss() else 0.0,
        )
        return PolicyLoss(loss, metrics)


class DrGRPO(GRPO):
    """GRPO done right: no std scaling, constant loss normaliser."""

    name = "dr-grpo"
    OPTIONS: ClassVar[dict[str, Any]] = defaults_of(DR_GRPO_OPTIONS)


class GSPO(GRPO):
    """Group Sequence Policy Optimization: the importance ratio and its clipping are per sequence."""

    name = "gspo"
    ratio_level = "sequence"


class RLOO(GRPO):
    """REINFORCE Leave-One-Out: each completion's baseline is the mean reward of its siblings."""

    name = "rloo"
    OPTIONS: ClassVar[dict[str, Any]] = {
        # standardise the advantages over the whole batch afterwards (TRL's normalize_advantages)
        "normalize_advantages": False,
        "std_epsilon": 1e-4,
        "num_iterations": 1,
    }
    ratio_level = "sequence_sum"

    def configure(self, options: dict[str, Any]) -> None:
        self.loss_normalisation = "sequence"  # of (B, 1) sequence losses: their mean
        self.scale_rewards = False
        self.std_epsilon = options["std_epsilon"]
        self.num_iterations = options["num_iterations"]
        self.normalize_advantages = options["normalize_advantages"]

    def kl_in_loss(self) -> bool:
        return False

    def shape_rewards(self, rewards: Any, rollout: RolloutStats) -> Any:
        if self.beta > 0 and rollout.kl is not None:
            return rewards - self.beta * rollout.kl
        return rewards

    def advantages(self, rewards: Any) -> Any:
        import torch

        advantages = rewards - leave_one_out_baseline(rewards)
        if self.normalize_advantages:
            flat = advantages[~torch.isnan(advantages)]
            if flat.numel() > 1:
                advantages = (advantages - flat.mean()) / (flat.std() + self.std_epsilon)
        return torch.nan_to_num(advantages, nan=0.0)
