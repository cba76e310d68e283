"""GRPO with the BLEU reward improves the captions of an SFT-tuned tiny Llava on the shapes dataset.

The same two commands a user would run: ``vistune sft`` (a short version of ``vistune
demo``'s recipe), then ``vistune rl`` on its output with ``rewards: [bleu]``, whose
reference is each record's caption (the final assistant answer).
"""

import json

import pytest
import yaml
from vistune.cli import main
from vistune.training.metrics import read_metrics

SFT = {
    "task": "sft", "dataset": "shapes-captions", "adapter": "full", "freeze_vision_tower": False, "dtype": "float32",
    "device": "cpu", "learning_rate": 2e-3, "warmup_ratio": 0.05, "per_device_batch_size": 16, "max_steps": 120,
    "logging_steps": 25, "save_steps": 1000, "seed": 0, "max_length": 128, "report_to": ["jsonl"],
}  # fmt: skip
RL = {
    "task": "rl", "dataset": "shapes-captions", "rewards": ["bleu"], "algorithm": "grpo", "adapter": "full",
    "dtype": "float32", "device": "cpu", "learning_rate": 1e-3, "lr_scheduler_type": "constant",
    "per_device_batch_size": 16, "num_generations": 8, "max_completion_length": 6, "max_steps": 30,
    "logging_steps": 1, "save_steps": 1000, "seed": 0, "report_to": ["jsonl"],
}  # fmt: skip
#: Steps averaged at each end of the run: one step's mean reward over 128 samples is noisy.
WINDOW = 6


def _run(path, values):
    path.write_text(yaml.safe_dump(values))
    assert main([values["task"], "--config", str(path)]) == 0


@pytest.mark.slow
def test_grpo_bleu_raises_the_caption_reward(tmp_path, tiny_llava):
    sft_dir, rl_dir = tmp_path / "sft", tmp_path / "rl"
    _run(tmp_path / "sft.yaml", {**SFT, "model": str(tiny_llava), "output_dir": str(sft_dir)})
    _run(tmp_path / "rl.yaml", {**RL, "model": str(sft_dir), "output_dir": str(rl_dir)})
    rewards = [r["reward"] for r in read_metrics(rl_dir / "metrics.jsonl") if "reward" in r]
    assert len(rewards) == RL["max_steps"]
    start, end = sum(rewards[:WINDOW]) / WINDOW, sum(rewards[-WINDOW:]) / WINDOW
    print(json.dumps({"reward_start": round(start, 4), "reward_end": round(end, 4), "rewards": rewards}))
    assert end > start + 0.02
    run = json.loads((rl_dir / "vistune_run.json").read_text())
    assert run["model_type"] == "llava" and run["config"]["algorithm"] == "grpo"
