"""The preference losses, from sequence log-probabilities to a scalar and the numbers to log.

Each algorithm's factory (``factory(config)``, registered in :mod:`vistune_dpo.plugin`)
builds one of these from the run's config: ``beta`` is the config's key, the rest are
the options its spec declares (:mod:`vistune_dpo.options`), set in the algorithm's
section (``dpo: {rpo_alpha: 0.5}``) or in ``algorithm_options``.  The trainer computes, for every answer of a batch, the sum
of its tokens' log-probabilities and its token count (:class:`SequenceLogps`) under the
policy and, when :attr:`needs_reference`, under the reference model; the objective does
the rest.  The formulas and the logged names follow TRL (``DPOTrainer``, ``KTOTrainer``,
``trl.experimental``'s ``ORPOTrainer`` and ``CPOTrainer``), and the tests check them
against those trainers.
"""

from __future__ import annotations

from typing import Any

import attrs

from vistune.rl.algorithm import read_options
from vistune_dpo.options import OPTIONS


@attrs.frozen
class SequenceLogps:
    """Per-answer sums of token log-probabilities (``(N,)``, with gradients under the policy) and token counts."""

    sums: Any
    counts: Any

    @property
    def means(self) -> Any:
        return self.sums / self.counts.clamp(min=1)

    def halves(self) -> tuple[SequenceLogps, SequenceLogps]:
        """(chosen, rejected) of a paired batch laid out as all chosen answers, then all rejected ones."""
        sums, counts = self.sums.chunk(2), self.counts.chunk(2)
        return SequenceLogps(sums[0], counts[0]), SequenceLogps(sums[1], counts[1])


def _mean(values: Any) -> float:
    return values.float().mean().item() if values.numel() else float("nan")


def _reward_metrics(chosen_rewards: Any, rejected_rewards: Any, chosen_logps: Any, rejected_logps: Any):
    """TRL's reward and log-probability metrics of a paired batch (the log-probabilities the loss uses)."""
    return {
        "rewards/chosen": _mean(chosen_rewards),
        "rewards/rejected": _mean(rejected_rewards),
        "rewards/accuracies": _mean((chosen_rewards > rejected_rewards).float()),
        "rewards/margins": _mean(chosen_rewards - rejected_rewards),
        "logps/chosen": _mean(chosen_logps.detach()),
        "logps/rejected": _mean(rejected_logps.detach()),
        # how often the policy itself ranks the chosen answer first (meaningful before training too)
        "logps/accuracies": _mean((chosen_logps > rejected_logps).float()),
    }


def _nll(chosen: SequenceLogps) -> Any:
    """Mean negative log-likelihood per token of the chosen answers (TRL's ``sft`` term, ORPO's and CPO's NLL)."""
    return -chosen.sums.sum() / chosen.counts.sum().clamp(min=1)


class PreferenceObjective:
    """What every preference algorithm tells the trainer."""

    name = "preference"
    #: Learns from (chosen, rejected) pairs; false for answers labelled one by one (KTO).
    paired = True
    #: Needs log-probabilities under the reference model (the starting policy).
    needs_reference = True
    #: Compute the reference log-probabilities once, before training, instead of at every step.
    precompute_ref_log_probs = False
    beta = 0.1

    def loss(self, policy: SequenceLogps, reference: SequenceLogps | None, **extra: Any) -> tuple[Any, dict[str, float]]:
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{self.name}({fields})"


class DPO(PreferenceObjective):
    """DPO's sigmoid loss, with cDPO's label smoothing and RPO's NLL term.

    ``-(1 - ls) log sigmoid(beta * d) - ls log sigmoid(-beta * d)`` with ``d`` the chosen
    minus the rejected log-ratio against the reference, averaged over pairs, plus
    ``rpo_alpha`` times the chosen answers' mean token NLL.  Options: ``label_smoothing``
    (the probability that a label is flipped, in [0, 0.5)), ``rpo_alpha`` (0: plain DPO),
    ``precompute_ref_log_probs``.
    """

    name = "dpo"

    def __init__(self, config: Any):
        options = read_options(self.name, config, OPTIONS[self.name])
        self.beta = float(config.beta)
        self.label_smoothing = options["label_smoothing"]
        self.rpo_alpha = options["rpo_alpha"]
        self.precompute_ref_log_probs = options["precompute_ref_log_probs"]
        _check(self.name, "beta", self.beta > 0, "above 0", self.beta)
        _check(self.name, "label_smoothing", 0.0 <= self.label_smoothing < 0.5, "in [0, 0.5)", self.label_smoothing)
        _check(self.name, "rpo_alpha", self.rpo_alpha >= 0, "at least 0", self.rpo_alpha)

    def loss(self, policy, reference, **extra):
        import torch.nn.functional as F

        chosen, rejected = policy.halves()
        ref_chosen, ref_rejected = reference.halves()
        chosen_logratios = chosen.sums - ref_chosen.sums
        rejected_logratios = rejected.sums - ref_rejected.sums
        logits = self.beta * (chosen_logratios - rejected_logratios)
        per_pair = -F.logsigmoid(logits) * (1 - self.label_smoothing) - F.logsigmoid(-logits) * self.label_smoothing
        loss = per_pair.mean()
        metrics = _reward_metrics(self.beta * chosen_logratios.detach(), self.beta * rejected_logratios.detach(),
                                  chosen.sums, rejected.sums)  # fmt: skip
        if self.rpo_alpha:
            nll = _nll(chosen)
            loss = loss + self.rpo_alpha * nll
            metrics["nll_loss"] = nll.item()
        return loss, metrics


class ORPO(PreferenceObjective):
    """ORPO: the chosen answers' NLL minus ``beta`` times the log-sigmoid of the log odds ratio.

    The odds use length-normalised log-probabilities (mean per token), as the paper and TRL.
    No reference model.  Rewards are ``beta`` times those mean log-probabilities, and
    ``logps/*`` log the means (as TRL's ORPO and CPO trainers do).
    """

    name = "orpo"
    needs_reference = False

    def __init__(self, config: Any):
        read_options(self.name, config, OPTIONS[self.name])
        self.beta = float(config.beta)
        _check(self.name, "beta", self.beta > 0, "above 0", self.beta)

    def loss(self, policy, reference, **extra):
        import torch
        import torch.nn.functional as F

        chosen, rejected = policy.halves()
        chosen_mean, rejected_mean = chosen.means.float(), rejected.means.float()

        def log1mexp(x):  # log(1 - exp(x)) for x < 0, stable at both ends
            return torch.where(x > -0.693, torch.log(-torch.expm1(x)), torch.log1p(-torch.exp(x)))

        log_odds = (chosen_mean - rejected_mean) - (log1mexp(chosen_mean) - log1mexp(rejected_mean))
        ratio = F.logsigmoid(log_odds)
        nll = _nll(chosen)
        loss = nll - (self.beta * ratio).mean()
        metrics = _reward_metrics(self.beta * chosen_mean.detach(), self.beta * rejected_mean.detach(), chosen_mean,
                                  rejected_mean)  # fmt: skip
        metrics.update({"nll_loss": nll.item(), "log_odds_ratio": ratio.mean().item(), "log_odds_chosen": log_odds.mean().item()})
        return loss, metrics


class SimPO(PreferenceObjective):
    """SimPO: ``-log sigmoid(beta * (mean logp chosen - mean logp rejected) - gamma)``, no reference model.

    Options: ``gamma`` (the target reward margin), ``label_smoothing``, ``cpo_alpha`` (weight of
    an NLL term on the chosen answers, CPO's; 0 is plain SimPO).
    """

    name = "simpo"
    needs_reference = False

    def __init__(self, config: Any):
        options = read_options(self.name, config, OPTIONS[self.name])
        self.beta = float(config.beta)
        self.gamma = options["gamma"]
        self.label_smoothing = options["label_smoothing"]
        self.cpo_alpha = options["cpo_alpha"]
        _check(self.name, "beta", self.beta > 0, "above 0", self.beta)
        _check(self.name, "label_smoothing", 0.0 <= self.label_smoothing < 0.5, "in [0, 0.5)", self.label_smoothing)

    def loss(self, policy, reference, **extra):
        import torch.nn.functional as F

        chosen, rejected = policy.halves()
        chosen_mean, rejected_mean = chosen.means, rejected.means
        logits = self.beta * (chosen_mean - rejected_mean) - self.gamma
        per_pair = -F.logsigmoid(logits) * (1 - self.label_smoothing) - F.logsigmoid(-logits) * self.label_smoothing
        loss = per_pair.mean()
        metrics = _reward_metrics(self.beta * chosen_mean.detach(), self.beta * rejected_mean.detach(), chosen_mean,
                                  rejected_mean)  # fmt: skip
        if self.cpo_alpha:
            nll = _nll(chosen)
            loss = loss + self.cpo_alpha * nll
            metrics["nll_loss"] = nll.item()
        return loss, metrics


class KTO(PreferenceObjective):
    """KTO on answers labelled desirable or not.

    With ``z`` the batch's estimate of KL(policy || reference), from each prompt paired
    with another record's answer (clamped at 0, no gradient): a desirable answer loses
    ``1 - sigmoid(beta * (r - z))``, an undesirable one ``1 - sigmoid(beta * (z - r))``, ``r``
    its log-ratio, weighted by ``desirable_weight`` / ``undesirable_weight`` and averaged.
    """

    name = "kto"
    paired = False

    def __init__(self, config: Any):
        options = read_options(self.name, config, OPTIONS[self.name])
        self.beta = float(config.beta)
        self.desirable_weight = options["desirable_weight"]
        self.undesirable_weight = options["undesirable_weight"]
        _check(self.name, "beta", self.beta > 0, "above 0", self.beta)

    def loss(self, policy, reference, *, labels=None, kl_policy=None, kl_reference=None, **extra):
        import torch

        labels = labels.bool()
        kl = (kl_policy.sums - kl_reference.sums).mean().detach().clamp(min=0)
        logratios = policy.sums - reference.sums
        chosen_logratios, rejected_logratios = logratios[labels], logratios[~labels]
        chosen_losses = 1 - torch.sigmoid(self.beta * (chosen_logratios - kl))
        rejected_losses = 1 - torch.sigmoid(self.beta * (kl - rejected_logratios))
        losses = torch.cat((self.desirable_weight * chosen_losses, self.undesirable_weight * rejected_losses))
        metrics = {
            "kl": kl.item(),
            "rewards/chosen": _mean(self.beta * chosen_logratios.detach()),
            "rewards/rejected": _mean(self.beta * rejected_logratios.detach()),
            "logps/chosen": _mean(policy.sums.detach()[labels]),
            "logps/rejected": _mean(policy.sums.detach()[~labels]),
        }
        # NaN without both kinds of answer in the batch: left out of the log's average
        metrics["rewards/margins"] = metrics["rewards/chosen"] - metrics["rewards/rejected"]
        return losses.nanmean(), metrics


def _check(algorithm: str, key: str, ok: bool, expected: str, value: Any = None) -> None:
    from vistune.errors import ConfigError

    if not ok:
        where = "beta" if key == "beta" else f"{algorithm}.{key}"
        raise ConfigError(f"{where} of algorithm {algorithm!r} must be {expected}, got {value!r}")
