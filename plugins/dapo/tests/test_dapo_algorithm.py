"""DAPO against the paper's formulas (Yu et al. 2025) computed by hand, and against TRL's ``loss_type="dapo"``."""

import types
from collections import defaultdict

import numpy as np
import pytest
import torch
from vistune.config import RunConfig
from vistune.errors import ConfigError
from vistune.rl.algorithm import PolicyBatch, RolloutStats
from vistune.testing import check_algorithm


def dapo(plugin_manager, **config):
    spec = plugin_manager.registries.algorithms.get("dapo")
    return check_algorithm(spec, RunConfig(task="rl", **{**spec.defaults, **config}))


def batch():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.0]])
    ratios = torch.tensor([[1.1, 1.3, 0.7], [0.7, 1.1, 1.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    return PolicyBatch((old + ratios.log()).requires_grad_(True), old, None, mask, torch.tensor([1.0, -1.0]), 2, 5, 4)


def test_clip_higher_defaults(plugin_manager):
    algo = dapo(plugin_manager)
    assert (algo.epsilon_low, algo.epsilon_high, algo.beta) == (0.2, 0.28, 0.0)
    assert not algo.needs_reference_model()
    assert algo.refill_groups and algo.max_sampling_rounds == 10


def test_token_level_loss_with_clip_higher(plugin_manager):
    out = dapo(plugin_manager).loss(batch())
    # A=1: -1.1, -min(1.3, 1.28) = -1.28 (clipped high), -0.7;  A=-1: -min(-0.7, -0.8) = 0.8 (clipped low), 1.1
    assert out.loss.item() == pytest.approx((-1.1 - 1.28 - 0.7 + 0.8 + 1.1) / 5, abs=1e-6)
    assert out.metrics["clip_fraction/high"] == pytest.approx(0.2)
    assert out.metrics["clip_fraction/low"] == pytest.approx(0.2)
    # 1.25 lies inside the clip-higher range: not clipped, unlike under GRPO's symmetric 0.2
    b = batch()
    b2 = PolicyBatch(b.old_logps + torch.log(torch.tensor([[1.25, 1.0, 1.0], [1.0, 1.0, 1.0]])), b.old_logps, None,
                     b.mask, b.advantages, 2, 5, 4)  # fmt: skip
    assert dapo(plugin_manager).loss(b2).metrics["clip_fraction/high"] == 0.0


def test_loss_matches_trl_dapo(plugin_manager):
    from trl import GRPOTrainer

    mine = batch()
    out = dapo(plugin_manager).loss(mine)
    out.loss.backward()
    theirs_batch = batch()

    class Accelerator:
        num_processes = 1
        gather = staticmethod(lambda x: x)
        reduce = staticmethod(lambda x, reduction="sum": x)

    stub = types.SimpleNamespace(
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level="token",
        beta=0.0, loss_type="dapo", epsilon_low=0.2, epsilon_high=0.28, use_vllm=False,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1, max_completion_length=4,
        accelerator=Accelerator(), _entropy_bonus_enabled=False, _metrics={"train": defaultdict(list)},
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        _get_per_token_logps_and_entropies=lambda *a, **k: (theirs_batch.logps, torch.zeros_like(theirs_batch.logps), None),
    )  # fmt: skip
    inputs = {
        "prompt_ids": torch.ones((2, 1), dtype=torch.long), "prompt_mask": torch.ones((2, 1), dtype=torch.long),
        "completion_ids": torch.ones((2, 3), dtype=torch.long), "completion_mask": theirs_batch.mask.long(),
        "advantages": theirs_batch.advantages, "old_per_token_logps": theirs_batch.old_logps,
        "num_items_in_batch": theirs_batch.mask.sum(),
    }  # fmt: skip
    theirs = GRPOTrainer._compute_loss(stub, None, inputs)
    theirs.backward()
    assert out.loss.item() == pytest.approx(theirs.item(), rel=1e-6)
    torch.testing.assert_close(mine.logps.grad, theirs_batch.logps.grad)
    assert out.metrics["clip_fraction/high"] == pytest.approx(stub._metrics["train"]["clip_ratio/high_mean"][0])


def test_overlong_shaping(plugin_manager):
    # L_max 20, buffer L_cache 4: no penalty up to 16 tokens, linear to -1 at 20
    algo = dapo(plugin_manager, max_completion_length=20, algorithm_options={"overlong_buffer": 4})
    lengths = torch.tensor([5, 16, 17, 18, 20])
    stats = RolloutStats(lengths, lengths >= 20, 20)
    shaped = algo.shape_rewards(torch.tensor([1.0, 1.0, 1.0, float("nan"), 0.0]), stats)
    expected = [1.0, 1.0, 1.0 + (16 - 17) / 4, float("nan"), (16 - 20) / 4]
    np.testing.assert_allclose(shaped.numpy(), expected)
    # TRL's implementation of the same eq. 13, on every length a run can sample
    from trl.rewards import get_soft_overlong_punishment

    lengths = torch.arange(0, 21)
    trl = get_soft_overlong_punishment(max_completion_len=20, soft_punish_cache=4)([[0] * n for n in lengths.tolist()])
    np.testing.assert_allclose(algo.shape_rewards(torch.zeros(21), RolloutStats(lengths, lengths >= 20, 20)).numpy(),
                               trl, rtol=1e-6)  # fmt: skip
    # default buffer: 20% of max_completion_length, as in the paper (4096 of 20480)
    assert dapo(plugin_manager, max_completion_length=20480).overlong_buffer == 4096
    off = dapo(plugin_manager, algorithm_options={"overlong_shaping": False})
    assert torch.equal(off.shape_rewards(torch.tensor([1.0]), RolloutStats(torch.tensor([64]), torch.tensor([True]), 64)),
                       torch.tensor([1.0]))  # fmt: skip


def test_dynamic_sampling_keeps_groups_with_varied_rewards(plugin_manager):
    algo = dapo(plugin_manager)
    rewards = torch.tensor(
        [[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [0.5, float("nan"), 0.5, 0.5],
         [float("nan"), 0.3, float("nan"), float("nan")], [0.2, float("nan"), 0.7, 0.2]]
    )  # fmt: skip
    assert algo.select_groups(rewards).tolist() == [False, False, True, False, False, True]
    off = dapo(plugin_manager, algorithm_options={"dynamic_sampling": False})
    assert off.select_groups(rewards).all() and not off.refill_groups


def test_advantages_are_group_normalised(plugin_manager):
    rewards = torch.tensor([[0.0, 1.0, 0.0, 0.0]])
    group = rewards[0].numpy()
    np.testing.assert_allclose(dapo(plugin_manager).advantages(rewards)[0].numpy(),
                               (group - group.mean()) / (group.std(ddof=1) + 1e-4), rtol=1e-5)  # fmt: skip


def test_bad_buffer(plugin_manager):
    with pytest.raises(ConfigError, match="overlong_buffer"):
        dapo(plugin_manager, max_completion_length=8, algorithm_options={"overlong_buffer": 9})
