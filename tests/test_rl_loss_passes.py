"""The policy loss of a large rollout in several forward and backward passes (vistune.rl.loss_passes)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from vistune.rl.loss_passes import groups_per_pass, pass_bytes_per_token

GiB = 2**30
#: Llava-1.5-7B's language model.
LLAMA_7B = SimpleNamespace(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, vocab_size=32064)


def rollout(groups: int, size: int, prompt: int, completion: int) -> list:
    return [SimpleNamespace(encoded={"input_ids": [0] * prompt}, completion_ids=[[1] * completion] * size, size=size)
            for _ in range(groups)]  # fmt: skip


def test_a_7b_grpo_step_without_checkpointing_is_split_to_fit_the_card():
    """8 prompts x 8 completions of 590 + 64 tokens: ~6 MB of activations per token without
    checkpointing (the run that ran out of memory on a 141 GB card), ~0.45 MB with it."""
    groups = rollout(8, 8, 590, 64)
    assert pass_bytes_per_token(LLAMA_7B, checkpointing=False) == 32 * (10 * 4096 + 5 * 11008) * 2
    assert groups_per_pass(groups, text_config=LLAMA_7B, checkpointing=False, free_bytes=120 * GiB) == 3
    assert groups_per_pass(groups, text_config=LLAMA_7B, checkpointing=True, free_bytes=120 * GiB) == 8
    assert groups_per_pass(groups, text_config=LLAMA_7B, checkpointing=False, free_bytes=1 * GiB) == 1


def test_without_a_gpu_every_group_is_one_pass():
    assert groups_per_pass(rollout(8, 8, 590, 64), text_config=LLAMA_7B, checkpointing=False, free_bytes=None) == 8


pytest.importorskip("torch")
pytest.importorskip("transformers")

from test_rl_pipeline import REWARDS, run_rl, shapes_data  # noqa: E402,F401


def test_split_passes_train_the_adapter_as_one_pass(tmp_path, shapes_data, tiny_llava, monkeypatch):  # noqa: F811
    """Two GRPO steps on Llava images with a KL term and mu 2 (old and reference log-probabilities):
    one pass per group gives the weights and logged figures of one pass over all groups."""
    from safetensors.torch import load_file

    from vistune.rl import loss_passes

    (tmp_path / "my_rewards.py").write_text(REWARDS)
    values = dict(model=str(tiny_llava), dataset=str(shapes_data), max_steps=2, seed=5, beta=0.1, learning_rate=2e-2, lora_dropout=0.0,
                  rewards=["bleu", f"{tmp_path / 'my_rewards.py'}:length"], algorithm_options={"num_iterations": 2})  # fmt: skip
    whole = run_rl(tmp_path, "whole", **values)
    calls = []

    def one_group(groups, **kwargs):
        calls.append(len(groups))
        return 1

    monkeypatch.setattr(loss_passes, "groups_per_pass", one_group)
    split = run_rl(tmp_path, "split", **values)
    assert calls and all(n > 1 for n in calls)  # each step had several groups, trained one at a time
    expected, got = load_file(whole / "adapter_model.safetensors"), load_file(split / "adapter_model.safetensors")
    assert expected.keys() == got.keys()
    # the same gradients up to summation order (grad norms agree to 1e-6); Adam's first steps at lr 2e-2
    # turn such differences into ~1e-4 of a weight
    for name in expected:
        assert got[name].float().allclose(expected[name].float(), atol=2e-4), name
    from vistune.training.metrics import read_metrics

    for a, b in zip(read_metrics(whole / "metrics.jsonl"), read_metrics(split / "metrics.jsonl")):
        for key in ("loss", "kl", "importance_ratio", "grad_norm"):
            if key in a:
                assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
