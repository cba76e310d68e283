"""The policy-gradient building blocks against numpy and hand-computed values."""

import math

import numpy as np
import pytest
import torch
from vistune.config import RunConfig
from vistune.errors import ConfigError
from vistune.rl import objectives as ob
from vistune.rl.algorithm import RLAlgorithm, read_options

NAN = float("nan")


def test_group_statistics_ignore_nan():
    rewards = torch.tensor([[1.0, 2.0, 4.0, NAN], [3.0, NAN, NAN, NAN]])
    mean, std = ob.group_mean(rewards), ob.group_std(rewards)
    assert mean[0, 0].item() == pytest.approx(7 / 3)
    assert std[0, 0].item() == pytest.approx(np.std([1, 2, 4], ddof=1))
    assert mean[1, 0].item() == 3.0 and math.isnan(std[1, 0].item())  # one scored reward: no spread


def test_leave_one_out_baseline():
    rewards = torch.tensor([[1.0, 2.0, 6.0], [5.0, NAN, 1.0], [2.0, NAN, NAN]])
    baseline = ob.leave_one_out_baseline(rewards)
    np.testing.assert_allclose(baseline[0].numpy(), [4.0, 3.5, 1.5])
    assert baseline[1, 0].item() == 1.0 and baseline[1, 2].item() == 5.0
    assert math.isnan(baseline[2, 0].item())  # no scored sibling


def test_importance_ratio_levels():
    logps = torch.log(torch.tensor([[0.5, 0.2, 0.9]]))
    old = torch.log(torch.tensor([[0.25, 0.4, 0.1]]))
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    token = ob.importance_log_ratio(logps, old, mask, "token")
    torch.testing.assert_close(token.exp(), torch.tensor([[2.0, 0.5, 9.0]]))
    sequence = ob.importance_log_ratio(logps, old, mask, "sequence")
    assert sequence.shape == (1, 1) and sequence.exp().item() == pytest.approx(math.sqrt(2.0 * 0.5))  # GSPO
    whole = ob.importance_log_ratio(logps, old, mask, "sequence_sum")
    assert whole.exp().item() == pytest.approx(2.0 * 0.5)
    with pytest.raises(ValueError, match="token, sequence, sequence_sum"):
        ob.importance_log_ratio(logps, old, mask, "tokens")


def test_clipped_surrogate_flags():
    log_ratio = torch.log(torch.tensor([[0.5, 1.5, 1.1, 0.5]]))
    advantages = torch.tensor([[1.0, 1.0, -1.0, -1.0]])
    loss, flags = ob.clipped_surrogate(log_ratio, advantages, 0.2, 0.3)
    # -min(rA, clip(r, 0.8, 1.3)A): 0.5 (unclipped, A>0), -1.3 (clipped high), 1.1, 0.8 (clipped low)
    torch.testing.assert_close(loss, torch.tensor([[-0.5, -1.3, 1.1, 0.8]]))
    assert flags["high"].tolist() == [[False, True, False, False]]
    assert flags["low"].tolist() == [[False, False, False, True]]


def test_k3_kl():
    logps, ref = torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.0])
    expected = [math.exp(-0.5) + 0.5 - 1, math.exp(1.0) - 1.0 - 1]
    torch.testing.assert_close(ob.k3_kl(logps, ref), torch.tensor(expected))
    assert ob.k3_kl(logps, logps).abs().max().item() == 0.0


def test_normalisations():
    per_token = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 99.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    kw = {"num_sequences": 2, "num_tokens": 5, "max_completion_length": 10}
    assert ob.normalise_loss(per_token, mask, "sequence", **kw).item() == pytest.approx((2.0 + 4.5) / 2)
    assert ob.normalise_loss(per_token, mask, "token", **kw).item() == pytest.approx(15 / 5)
    assert ob.normalise_loss(per_token, mask, "constant", **kw).item() == pytest.approx(15 / 20)
    assert ob.masked_average(per_token, mask) == pytest.approx(3.0)
    assert ob.masked_average(torch.tensor([[1.0], [0.0]]), mask) == 0.5  # one value per sequence


def test_protocol_defaults_and_options():
    class Minimal(RLAlgorithm):
        def advantages(self, rewards):
            return rewards

        def loss(self, batch):
            raise NotImplementedError

    algo = Minimal()
    assert not algo.needs_reference_model() and algo.num_iterations == 1 and not algo.refill_groups
    rewards = torch.tensor([[1.0, 2.0], [3.0, 3.0]])
    assert algo.select_groups(rewards).tolist() == [True, True]
    assert algo.shape_rewards(rewards, None) is rewards
    config = RunConfig(task="rl", algorithm_options={"width": 3, "ratio": 2})
    assert read_options("x", config, {"width": 1, "ratio": 0.5, "name": "a"}) == {"width": 3, "ratio": 2.0, "name": "a"}
    with pytest.raises(ConfigError, match="'depth' not understood by algorithm 'x'"):
        read_options("x", RunConfig(task="rl", algorithm_options={"depth": 1}), {"width": 1})
    for bad in ("wide", 2.5, float("inf"), float("nan")):  # YAML's .inf and .nan are floats
        with pytest.raises(ConfigError, match="width"):
            read_options("x", RunConfig(task="rl", algorithm_options={"width": bad}), {"width": 1})
