"""Policy-gradient building blocks shared by group-relative RL algorithms.

Each function is one formula, on plain tensors, so that an algorithm plugin reads as
the paper it implements: which advantage, which importance ratio, which clipping,
which KL estimator, which normalisation.  Shapes follow :mod:`vistune.rl.algorithm`:
``(G, n)`` grouped rewards, ``(B, T)`` per-token values with a ``(B, T)`` float mask,
and ``(B, 1)`` for values that are one per sequence (they broadcast against ``(B, T)``).
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "NORMALISATIONS",
    "RATIO_LEVELS",
    "clipped_policy_loss",
    "clipped_surrogate",
    "group_mean",
    "group_normalised_advantages",
    "group_std",
    "importance_log_ratio",
    "k3_kl",
    "leave_one_out_baseline",
    "masked_average",
    "normalise_loss",
]

#: Importance-ratio levels: per token (PPO/GRPO/DAPO), per sequence as the exponentiated
#: mean token log-ratio (GSPO), per sequence as the full sequence ratio (RLOO/REINFORCE).
RATIO_LEVELS = ("token", "sequence", "sequence_sum")
#: Loss normalisations: mean over each sequence's tokens then over sequences (GRPO),
#: over every token of the batch (DAPO), by the constant ``sequences x max length``
#: (Dr. GRPO).
NORMALISATIONS = ("sequence", "token", "constant")


def group_mean(rewards: Any) -> Any:
    """``(G, n)`` -> ``(G, 1)`` mean of each group's rewards, ignoring ``NaN``."""
    import torch

    return torch.nanmean(rewards, dim=1, keepdim=True)


def group_std(rewards: Any) -> Any:
    """``(G, n)`` -> ``(G, 1)`` sample standard deviation (Bessel-corrected), ignoring ``NaN``.

    ``NaN`` for a group with fewer than two rewards.
    """
    import torch

    count = (~torch.isnan(rewards)).sum(dim=1, keepdim=True)
    mean = group_mean(rewards)
    squares = torch.nansum((rewards - mean) ** 2, dim=1, keepdim=True)
    variance = squares / (count - 1).clamp(min=1)
    variance = torch.where(count > 1, variance, torch.full_like(variance, float("nan")))
    return variance.sqrt()


def group_normalised_advantages(rewards: Any, std_epsilon: float, scale: bool = True) -> Any:
    """``(G, n)`` -> ``(G, n)`` GRPO's advantages ``(r_i - mean(r)) / (std(r) + std_epsilon)`` per group.

    ``scale=False`` leaves out the division (Dr. GRPO).  ``std_epsilon`` keeps a
    near-constant group from exploding (TRL uses 1e-4).  Unscored completions, and
    groups with fewer than two scored ones, get 0.
    """
    import torch

    advantages = rewards - group_mean(rewards)
    if scale:
        advantages = advantages / (group_std(rewards) + std_epsilon)
    return torch.nan_to_num(advantages, nan=0.0)


def leave_one_out_baseline(rewards: Any) -> Any:
    """``(G, n)`` -> ``(G, n)``: for each completion, the mean reward of the *other* ones in its group.

    ``NaN`` rewards are left out of the mean; a completion with no scored sibling gets ``NaN``.
    """
    import torch

    scored = ~torch.isnan(rewards)
    count = scored.sum(dim=1, keepdim=True)
    total = torch.nansum(rewards, dim=1, keepdim=True)
    own = torch.where(scored, rewards, torch.zeros_like(rewards))
    others = (count - scored.long()).to(rewards.dtype)
    baseline = (total - own) / others
    return torch.where(others > 0, baseline, torch.full_like(baseline, float("nan")))


def importance_log_ratio(logps: Any, old_logps: Any, mask: Any, level: str = "token") -> Any:
    """Log of the importance ratio pi_theta / pi_old.

    ``token``: ``(B, T)`` per-token log-ratios.  ``sequence``: ``(B, 1)`` the mean token
    log-ratio, i.e. the log of GSPO's length-normalised sequence ratio
    ``(pi_theta(y|x) / pi_old(y|x)) ** (1/|y|)``.  ``sequence_sum``: ``(B, 1)`` the log of
    the whole sequence's ratio ``pi_theta(y|x) / pi_old(y|x)``.
    """
    log_ratio = logps - old_logps
    if level == "token":
        return log_ratio
    if level == "sequence":
        return ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    if level == "sequence_sum":
        return (log_ratio * mask).sum(-1).unsqueeze(-1)
    raise ValueError(f"importance ratio level must be one of {', '.join(RATIO_LEVELS)}, got {level!r}")


def clipped_surrogate(
    log_ratio: Any, advantages: Any, epsilon_low: float, epsilon_high: float
) -> tuple[Any, dict[str, Any]]:
    """PPO's clipped objective, negated to a loss: ``-min(r A, clip(r, 1-eps_low, 1+eps_high) A)``.

    :param log_ratio: ``(B, T)`` or ``(B, 1)`` log importance ratios.
    :param advantages: ``(B, 1)`` (or broadcastable) advantages.
    :returns: the per-token (or per-sequence) loss and a dict of bool tensors of the same
        shape: ``low`` (the ratio fell below ``1 - eps_low`` with a negative advantage, so
        the gradient is cut), ``high`` (above ``1 + eps_high`` with a positive advantage),
        and the ``ratio`` itself.
    """
    import torch

    ratio = torch.exp(log_ratio)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    loss = -torch.min(ratio * advantages, clipped * advantages)
    low = (ratio < 1 - epsilon_low) & (advantages < 0)
    high = (ratio > 1 + epsilon_high) & (advantages > 0)
    return loss, {"low": low, "high": high, "ratio": ratio}


def k3_kl(logps: Any, ref_logps: Any) -> Any:
    """Schulman's unbiased, non-negative KL(pi_theta || pi_ref) estimator per token:
    ``exp(ref - logp) - (ref - logp) - 1`` (as in GRPO, Shao et al. 2024, eq. 4)."""
    import torch

    delta = ref_logps - logps
    return torch.exp(delta) - delta - 1


def normalise_loss(
    per_token_loss: Any,
    mask: Any,
    how: str,
    *,
    num_sequences: int,
    num_tokens: int,
    max_completion_length: int,
) -> Any:
    """Reduce ``(B, T)`` (or ``(B, 1)``) losses to the scalar of one micro-batch.

    The denominators count the whole batch the micro-batch belongs to, so summing the
    micro-batches' results gives the batch's loss:

    * ``sequence``: ``sum_i mean_t l_it / num_sequences`` (GRPO: each sequence weighs the same);
    * ``token``: ``sum_i,t l_it / num_tokens`` (DAPO: each token weighs the same);
    * ``constant``: ``sum_i,t l_it / (num_sequences * max_completion_length)`` (Dr. GRPO:
      no length bias at all).
    """
    masked = per_token_loss * mask
    if how == "sequence":
        per_sequence = masked.sum(-1) / mask.sum(-1).clamp(min=1.0)
        return per_sequence.sum() / max(num_sequences, 1)
    if how == "token":
        return masked.sum() / max(num_tokens, 1)
    if how == "constant":
        return masked.sum() / max(num_sequences * max_completion_length, 1)
    raise ValueError(f"loss normalisation must be one of {', '.join(NORMALISATIONS)}, got {how!r}")


def masked_average(values: Any, mask: Any) -> float:
    """Mean of ``values`` over completion tokens, or over sequences for ``(B, 1)`` values.

    Of bool flags (clipped or not) it is the fraction of tokens (sequences) flagged.
    """
    values = values.detach().float()
    if values.shape[-1] == 1 and mask.shape[-1] != 1:
        return float(values.mean()) if values.numel() else 0.0
    total = mask.sum()
    return float((values * mask).sum() / total) if float(total) > 0 else 0.0


def clipped_policy_loss(
    batch: Any, *, epsilon_low: float, epsilon_high: float, ratio_level: str, normalisation: str, beta: float
) -> tuple[Any, dict[str, float]]:
    """The clipped policy-gradient loss of GRPO and its relatives, with an optional k3 KL term.

    ``normalise(clipped_surrogate(ratio, A) + beta * k3_kl)`` (GRPO, Shao et al. 2024, eq. 3),
    where the algorithm picks the ratio level, the clipping range and the normalisation.

    :param batch: a :class:`vistune.rl.algorithm.PolicyBatch`.
    :param beta: weight of the KL term; 0 leaves it out (and needs no ``ref_logps``).
    :returns: the scalar loss of the micro-batch and its metrics: clip fractions below,
        above and in either clipping region, the mean importance ratio, and ``kl`` when
        ``beta > 0``.
    """
    mask = batch.mask
    log_ratio = importance_log_ratio(batch.logps, batch.old_logps, mask, ratio_level)
    per_token, flags = clipped_surrogate(log_ratio, batch.advantages.unsqueeze(-1), epsilon_low, epsilon_high)
    metrics = {
        "clip_fraction/low": masked_average(flags["low"], mask),
        "clip_fraction/high": masked_average(flags["high"], mask),
        "clip_fraction/region": masked_average(flags["low"] | flags["high"], mask),
        "importance_ratio": masked_average(flags["ratio"].detach(), mask),
    }
    if beta > 0:
        kl = k3_kl(batch.logps, batch.ref_logps)
        per_token = per_token + beta * kl
        metrics["kl"] = masked_average(kl.detach(), mask)
    loss = normalise_loss(per_token, mask, normalisation, num_sequences=batch.num_sequences,
                          num_tokens=batch.num_tokens, max_completion_length=batch.max_completion_length)  # fmt: skip
    return loss, metrics
