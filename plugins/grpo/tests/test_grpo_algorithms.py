"""GRPO, Dr. GRPO, GSPO and RLOO against hand-computed values from the papers' formulas, and against TRL."""

import math
import types
from collections import defaultdict

import numpy as np
import pytest
import torch
from vistune.config import RunConfig
from vistune.errors import ConfigError
from vistune.rl.algorithm import PolicyBatch, RLAlgorithm, RolloutStats
from vistune.testing import check_algorithm

# Two completions: ratios pi/pi_old per token, and a padded last token in the second.
RATIOS = [[1.1, 1.3, 0.7], [0.7, 1.1, 1.0]]
MASK = [[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]]
ADVANTAGES = [1.0, -1.0]


def algorithm(plugin_manager, name, **config):
    spec = plugin_manager.registries.algorithms.get(name)
    values = {**spec.defaults, **config}
    return check_algorithm(spec, RunConfig(task="rl", **values))


def batch(ratios=RATIOS, mask=MASK, advantages=ADVANTAGES, ref_logps=None, max_completion_length=4):
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -1.2, -2.0]])
    logps = (old + torch.log(torch.tensor(ratios))).requires_grad_(True)
    mask = torch.tensor(mask)
    return PolicyBatch(
        logps=logps,
        old_logps=old,
        ref_logps=ref_logps,
        mask=mask,
        advantages=torch.tensor(advantages),
        num_sequences=len(ratios),
        num_tokens=int(mask.sum()),
        max_completion_length=max_completion_length,
    )


def test_registered_and_protocol(plugin_manager):
    for name in ("grpo", "dr-grpo", "gspo", "rloo"):
        assert isinstance(algorithm(plugin_manager, name), RLAlgorithm)


def test_grpo_advantages_are_group_normalised(plugin_manager):
    grpo = algorithm(plugin_manager, "grpo")
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.2, 0.4, 0.9, 0.5], [3.0, 3.0, 3.0, 3.0]])
    got = grpo.advantages(rewards)
    for group, row in zip(rewards.numpy(), got.numpy()):
        expected = (group - group.mean()) / (group.std(ddof=1) + 1e-4)
        np.testing.assert_allclose(row, expected, rtol=1e-5, atol=1e-6)
    # first group by hand: mean 0.5, sample std sqrt(1/3)
    assert got[0, 0].item() == pytest.approx(0.5 / (math.sqrt(1 / 3) + 1e-4), rel=1e-5)
    assert torch.equal(got[2], torch.zeros(4))  # all equal: no signal


def test_grpo_advantages_ignore_unscored_completions(plugin_manager):
    grpo = algorithm(plugin_manager, "grpo")
    got = grpo.advantages(torch.tensor([[1.0, float("nan"), 0.0, 0.5]]))
    scored = np.array([1.0, 0.0, 0.5])
    expected = (scored - scored.mean()) / (scored.std(ddof=1) + 1e-4)
    np.testing.assert_allclose(got[0, [0, 2, 3]].numpy(), expected, rtol=1e-5)
    assert got[0, 1].item() == 0.0


def test_grpo_loss_clipping_and_sequence_mean(plugin_manager):
    grpo = algorithm(plugin_manager, "grpo", epsilon=0.2)
    b = batch()
    out = grpo.loss(b)
    # per-token -min(rA, clip(r, 0.8, 1.2) A): seq 0 (A=1): -1.1, -1.2 (clipped high), -0.7;
    # seq 1 (A=-1): 0.8 (clipped low), 1.1; sequence means -1.0 and 0.95
    assert out.loss.item() == pytest.approx((-1.0 + 0.95) / 2, abs=1e-6)
    assert out.metrics["clip_fraction/high"] == pytest.approx(1 / 5)
    assert out.metrics["clip_fraction/low"] == pytest.approx(1 / 5)
    out.loss.backward()
    # d(-rA)/dlogp = -rA on unclipped tokens, 0 on clipped ones, weighted 1/(|o_i| * B)
    expected = torch.tensor([[-1.1 / 6, 0.0, -0.7 / 6], [0.0, 1.1 / 4, 0.0]])
    torch.testing.assert_close(b.logps.grad, expected, rtol=1e-5, atol=1e-7)


def test_grpo_k3_kl_term(plugin_manager):
    grpo = algorithm(plugin_manager, "grpo", epsilon=0.2, beta=0.1)
    assert grpo.needs_reference_model()
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.2, -1.0, -3.0]])
    b = batch(ref_logps=ref)
    logps = b.logps.detach().numpy()
    kl = np.exp(ref.numpy() - logps) - (ref.numpy() - logps) - 1
    mask = np.array(MASK)
    surrogate = np.array([[-1.1, -1.2, -0.7], [0.8, 1.1, 0.0]])
    per_token = surrogate + 0.1 * kl
    expected = np.mean([(per_token[i] * mask[i]).sum() / mask[i].sum() for i in range(2)])
    out = grpo.loss(b)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.metrics["kl"] == pytest.approx((kl * mask).sum() / mask.sum(), rel=1e-5)


def test_token_and_constant_normalisation(plugin_manager):
    token = algorithm(plugin_manager, "grpo", epsilon=0.2, algorithm_options={"loss_normalisation": "token"})
    assert token.loss(batch()).loss.item() == pytest.approx((-1.1 - 1.2 - 0.7 + 0.8 + 1.1) / 5, abs=1e-6)
    dr = algorithm(plugin_manager, "dr-grpo", epsilon=0.2)
    assert dr.loss(batch(max_completion_length=4)).loss.item() == pytest.approx(-1.1 / (2 * 4), abs=1e-6)
    rewards = torch.tensor([[1.0, 0.0, 0.0, 0.5]])
    torch.testing.assert_close(dr.advantages(rewards), rewards - rewards.mean())  # no std scaling


def test_micro_batches_sum_to_the_batch_loss(plugin_manager):
    for options in ({"loss_normalisation": "sequence"}, {"loss_normalisation": "token"}):
        grpo = algorithm(plugin_manager, "grpo", epsilon=0.2, algorithm_options=options)
        whole = grpo.loss(batch()).loss.item()
        b = batch()
        parts = 0.0
        for i in range(2):
            part = PolicyBatch(b.logps[i : i + 1], b.old_logps[i : i + 1], None, b.mask[i : i + 1], b.advantages[i : i + 1],
                               b.num_sequences, b.num_tokens, b.max_completion_length)  # fmt: skip
            parts += grpo.loss(part).loss.item()
        assert parts == pytest.approx(whole, abs=1e-6)


def test_gspo_sequence_ratio(plugin_manager):
    gspo = algorithm(plugin_manager, "gspo")
    assert (gspo.epsilon_low, gspo.epsilon_high) == (3e-4, 4e-4)  # the paper's ranges, from the spec's defaults
    out = gspo.loss(batch())
    s0 = (1.1 * 1.3 * 0.7) ** (1 / 3)  # 1.000333: inside [1 - 3e-4, 1 + 4e-4]
    s1 = (0.7 * 1.1) ** (1 / 2)  # 0.877: below 1 - 3e-4 with A < 0, clipped
    expected = (-min(s0, 1.0004) + -min(-s1, -max(s1, 1 - 3e-4))) / 2
    assert out.loss.item() == pytest.approx(expected, abs=1e-7)  # float32: the two terms nearly cancel
    assert out.metrics["clip_fraction/low"] == pytest.approx(0.5)  # one of two sequences
    assert out.metrics["clip_fraction/high"] == 0.0


def test_rloo_leave_one_out(plugin_manager):
    rloo = algorithm(plugin_manager, "rloo")
    rewards = torch.tensor([[1.0, 0.0, 0.0, 1.0], [0.5, float("nan"), 1.5, 4.0]])
    got = rloo.advantages(rewards)
    expected0 = [1 - 1 / 3, 0 - 2 / 3, 0 - 2 / 3, 1 - 1 / 3]
    np.testing.assert_allclose(got[0].numpy(), expected0, rtol=1e-6)
    np.testing.assert_allclose(got[1].numpy(), [0.5 - 2.75, 0.0, 1.5 - 2.25, 4.0 - 1.0], rtol=1e-6)
    # sequence-level REINFORCE: the ratio is that of the whole sequence
    out = rloo.loss(batch(advantages=[0.5, -0.25]))
    r0, r1 = 1.1 * 1.3 * 0.7, 0.7 * 1.1
    assert out.loss.item() == pytest.approx(
        (-min(r0 * 0.5, 1.2 * 0.5) + -min(-0.25 * r1, -0.25 * max(r1, 0.8))) / 2, rel=1e-5
    )


def test_rloo_kl_is_a_reward_penalty(plugin_manager):
    rloo = algorithm(plugin_manager, "rloo", beta=0.5)
    stats = RolloutStats(torch.tensor([3, 2]), torch.tensor([False, False]), 4, kl=torch.tensor([0.2, -0.4]))
    torch.testing.assert_close(rloo.shape_rewards(torch.tensor([1.0, 0.0]), stats), torch.tensor([0.9, 0.2]))
    assert "kl" not in rloo.loss(batch(ref_logps=torch.zeros(2, 3))).metrics


def test_unknown_option_is_a_config_error(plugin_manager):
    spec = plugin_manager.registries.algorithms.get("grpo")
    with pytest.raises(ConfigError, match="loss_type"):
        check_algorithm(spec, RunConfig(task="rl", algorithm_options={"loss_type": "dapo"}))
    with pytest.raises(ConfigError, match="loss_normalisation"):
        check_algorithm(spec, RunConfig(task="rl", algorithm_options={"loss_normalisation": "tokens"}))


# -- TRL parity: the same tensors through TRL's own loss code ---------------------------


class _Accelerator:
    num_processes = 1

    def gather(self, x):
        return x

    def reduce(self, x, reduction="sum"):
        return x

    def gather_for_metrics(self, x):
        return x


def _trl_grpo_loss(b, *, loss_type, level="token", epsilon=0.2, epsilon_high=0.2, beta=0.0):
    from trl import GRPOTrainer

    stub = types.SimpleNamespace(
        aux_loss_enabled=False, top_entropy_quantile=1.0, off_policy_mask_threshold=None, importance_sampling_level=level,
        beta=beta, loss_type=loss_type, epsilon_low=epsilon, epsilon_high=epsilon_high, use_vllm=False,
        model=types.SimpleNamespace(training=True), current_gradient_accumulation_steps=1,
        max_completion_length=b.max_completion_length, accelerator=_Accelerator(), _entropy_bonus_enabled=False,
        _metrics={"train": defaultdict(list)},
        args=types.SimpleNamespace(use_bias_correction_kl=False, delta=None, steps_per_generation=1),
        _get_per_token_logps_and_entropies=lambda *a, **k: (b.logps, torch.zeros_like(b.logps), None),
    )  # fmt: skip
    completion_ids = torch.ones_like(b.mask, dtype=torch.long)
    inputs = {
        "prompt_ids": torch.ones((2, 1), dtype=torch.long), "prompt_mask": torch.ones((2, 1), dtype=torch.long),
        "completion_ids": completion_ids, "completion_mask": b.mask.long(), "advantages": b.advantages,
        "old_per_token_logps": b.old_logps, "num_items_in_batch": b.mask.sum(),
    }  # fmt: skip
    if b.ref_logps is not None:
        inputs["ref_per_token_logps"] = b.ref_logps
    loss = GRPOTrainer._compute_loss(stub, None, inputs)
    return loss, stub._metrics["train"]


@pytest.mark.parametrize(
    "name, options, trl_kwargs",
    [
        ("grpo", {}, {"loss_type": "grpo"}),
        ("grpo", {"loss_normalisation": "token"}, {"loss_type": "dapo"}),
        ("dr-grpo", {}, {"loss_type": "dr_grpo"}),
        ("gspo", {}, {"loss_type": "grpo", "level": "sequence", "epsilon": 3e-4, "epsilon_high": 4e-4}),
    ],
)
def test_loss_matches_trl(plugin_manager, name, options, trl_kwargs):
    beta = 0.05
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.2, -1.0, -3.0]])
    ours = algorithm(plugin_manager, name, epsilon=trl_kwargs.get("epsilon", 0.2),
                     epsilon_high=trl_kwargs.get("epsilon_high", 0.2), beta=beta, algorithm_options=options)  # fmt: skip
    mine = batch(ref_logps=ref)
    out = ours.loss(mine)
    out.loss.backward()
    theirs_batch = batch(ref_logps=ref)
    theirs, metrics = _trl_grpo_loss(theirs_batch, beta=beta, **trl_kwargs)
    theirs.backward()
    assert out.loss.item() == pytest.approx(theirs.item(), rel=1e-6, abs=1e-8)
    torch.testing.assert_close(mine.logps.grad, theirs_batch.logps.grad)
    assert out.metrics["clip_fraction/low"] == pytest.approx(metrics["clip_ratio/low_mean"][0])
    assert out.metrics["clip_fraction/high"] == pytest.approx(metrics["clip_ratio/high_mean"][0])
    assert out.metrics["kl"] == pytest.approx(metrics["kl"][0], rel=1e-6)


#: Rewards of two groups of four completions; None is a completion no reward could score.
TRL_REWARDS = [0.3, 0.9, None, 0.1, 1.0, 2.0, 3.0, 5.0]


@pytest.mark.parametrize("name, scale_rewards", [("grpo", "group"), ("dr-grpo", "none")])
def test_advantages_match_trl_grpo_trainer(plugin_manager, tiny_llama, tmp_path, name, scale_rewards):
    """TRL's own advantages: GRPOTrainer samples two groups on the tiny Llama and scores them with fixed rewards.

    ``_generate_and_score_completions`` is where TRL turns rewards into advantages (group mean,
    ``nanstd`` + 1e-4 unless ``scale_rewards="none"``, unscorable completions 0).
    """
    datasets = pytest.importorskip("datasets")
    from trl import GRPOConfig, GRPOTrainer

    def fixed(prompts, completions, **columns):
        return list(TRL_REWARDS[: len(completions)])

    args = GRPOConfig(output_dir=str(tmp_path), per_device_train_batch_size=8, num_generations=4, max_completion_length=3,
                      use_cpu=True, report_to=[], scale_rewards=scale_rewards, bf16=False)  # fmt: skip
    prompts = [{"prompt": "Name a colour."}] * 4 + [{"prompt": "Name a shape."}] * 4
    trainer = GRPOTrainer(model=str(tiny_llama), reward_funcs=[fixed], args=args,
                          train_dataset=datasets.Dataset.from_list(prompts))  # fmt: skip
    theirs = trainer._generate_and_score_completions(prompts)["advantages"]
    rewards = torch.tensor([math.nan if r is None else r for r in TRL_REWARDS]).view(2, 4)
    ours = algorithm(plugin_manager, name).advantages(rewards)
    torch.testing.assert_close(ours.flatten(), theirs)
    assert theirs[2] == 0.0 and theirs.abs().sum() > 1  # the unscored one is 0, the others carry a signal


def test_rloo_loss_matches_trl(plugin_manager):
    from trl import RLOOTrainer

    rloo = algorithm(plugin_manager, "rloo")
    mine = batch(advantages=[0.5, -0.25])
    out = rloo.loss(mine)
    out.loss.backward()
    theirs_batch = batch(advantages=[0.5, -0.25])
    stub = types.SimpleNamespace(
        aux_loss_enabled=False, epsilon_low=0.2, epsilon_high=0.2, accelerator=_Accelerator(),
        model=types.SimpleNamespace(training=True), _metrics={"train": defaultdict(list)},
        _get_per_token_logps_and_entropies=lambda *a, **k: (theirs_batch.logps, torch.zeros_like(theirs_batch.logps), None),
    )  # fmt: skip
    inputs = {
        "prompt_ids": torch.ones((2, 1), dtype=torch.long), "prompt_mask": torch.ones((2, 1), dtype=torch.long),
        "completion_ids": torch.ones((2, 3), dtype=torch.long), "completion_mask": theirs_batch.mask.long(),
        "advantages": theirs_batch.advantages, "old_logps": (theirs_batch.old_logps * theirs_batch.mask).sum(1),
    }  # fmt: skip
    theirs = RLOOTrainer._compute_loss(stub, None, inputs)
    theirs.backward()
    assert out.loss.item() == pytest.approx(theirs.item(), rel=1e-6)
    torch.testing.assert_close(mine.logps.grad, theirs_batch.logps.grad)
