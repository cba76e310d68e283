"""Every config in examples/ says what it does and how to run it, and plans as written.

Each example's checkpoint is swapped for the tiny local model of the same family, its data
for a small local dataset and its outputs for a temporary directory (as ``--key value``
overrides, so every other key is checked as the file writes it); ``--dry-run`` must then
report a ready plan.  GPUs are assumed present: the examples are written for GPU machines.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from vistune.cli import main

ROOT = Path(__file__).parents[1]
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
#: The tiny stand-in (a vistune.testing fixture) for each checkpoint the examples name.
TINY = {"llava-hf/llava-1.5-7b-hf": "tiny_llava", "Qwen/Qwen2-VL-2B-Instruct": "tiny_qwen2_vl"}


def header(path: Path) -> str:
    return "".join(line[1:] for line in path.read_text().splitlines(keepends=True) if line.startswith("#"))


def test_examples_cover_each_task():
    commands = {re.search(r"vistune (\w+) --config", header(path)).group(1) for path in EXAMPLES}
    assert commands == {"sft", "rl", "infer", "serve", "export"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_example_has_a_header_and_plans_ready(path, request, tmp_path, monkeypatch, capsys):
    text = header(path)
    task = re.search(rf"vistune (\w+) --config examples/{re.escape(path.name)}", text).group(1)
    assert f"vistune {task} --config examples/{path.name} --dry-run" in text
    assert len(text.split("\n\n")[0].split()) >= 15, "the header says what the example does"
    values = yaml.safe_load(path.read_text())
    monkeypatch.chdir(ROOT)  # reward files are named relative to the repository root, as the commands run
    monkeypatch.setattr("vistune.plan.visible_gpu_count", lambda: 8)
    monkeypatch.setattr("vistune.reporting._installed", lambda module: True)  # wandb and friends: not needed here
    from vistune.demo.shapes import write_split

    data = write_split(tmp_path / "data", "train", count=2)
    swaps = {"model": str(request.getfixturevalue(TINY[values["model"]])), "dataset": str(data),
             "eval_dataset": str(data), "adapter_path": str(tmp_path / "adapter"), "output_dir": str(tmp_path / "out"),
             "output_file": str(tmp_path / "out" / "predictions.jsonl"), "export_dir": str(tmp_path / "merged")}  # fmt: skip
    (tmp_path / "adapter").mkdir()
    overrides = [arg for key, value in swaps.items() if key in values for arg in (f"--{key}", value)]
    code = main([task, "--config", str(path), *overrides, "--dry-run"])
    out = capsys.readouterr().out
    assert code == 0 and out.rstrip().endswith("ready"), out


def test_trl_style_reward_file_scores_as_trl_calls_it(monkeypatch):
    from vistune.plan import RewardUse
    from vistune.rl.rewards import call_reward, load_reward

    monkeypatch.chdir(ROOT)
    file = Path("examples/rewards.py")
    reward_len = load_reward(RewardUse("examples/rewards.py:reward_len", 1.0, {}, file=file, attribute="reward_len"))
    form = load_reward(RewardUse("examples/rewards.py:format_reward", 1.0, {}, file=file, attribute="format_reward"))
    completions = ["A red circle.", " ".join(["word"] * 20)]
    prompts = [[{"role": "user", "content": "<image>\nWhat is it?"}]] * 2
    columns = {"answer": ["red circle", "blue square"], "completion_ids": [[1], [2]], "trainer_state": None}
    assert call_reward(reward_len.function, prompts, completions, **columns) == [-17 / 20, 0.0]
    assert call_reward(form.function, prompts, completions, **columns) == [1.0, 0.0]


def shapes_with_answers(directory: Path) -> Path:
    """The shapes records with the question as the last turn and the caption as an ``answer`` column."""
    import json

    from vistune.demo.shapes import write_split

    data = write_split(directory, "train", count=4)
    records = [json.loads(line) for line in data.read_text().splitlines()]
    for record in records:
        record["answer"] = record["messages"].pop()["content"]
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    return data


@pytest.mark.slow
def test_sft_and_grpo_examples_run_on_tiny_models(tiny_llava, tiny_qwen2_vl, tmp_path, monkeypatch):
    """The SFT and GRPO examples as written, shrunk only in model, data, steps and lengths, train on CPU."""
    from vistune.demo.shapes import write_split
    from vistune.training.metrics import read_metrics

    monkeypatch.chdir(ROOT)
    cpu = ["--device", "cpu", "--dtype", "float32", "--max_steps", "2", "--gradient_accumulation_steps", "1",
           "--per_device_batch_size", "2", "--report_to", "[jsonl]"]  # fmt: skip
    sft_out = tmp_path / "sft"
    data = write_split(tmp_path / "sft-data", "train", count=4)
    assert main(["sft", "--config", "examples/sft_lora_llava.yaml", "--model", str(tiny_llava), "--dataset", str(data),
                 "--eval_dataset", str(data), "--output_dir", str(sft_out), *cpu]) == 0  # fmt: skip
    assert (sft_out / "adapter_config.json").is_file() and (sft_out / "adapter_model.safetensors").is_file()
    rl_out = tmp_path / "rl"
    rl_data = shapes_with_answers(tmp_path / "rl-data")
    assert main(["rl", "--config", "examples/grpo_qwen2_vl.yaml", "--model", str(tiny_qwen2_vl), "--dataset",
                 str(rl_data), "--output_dir", str(rl_out), "--num_generations", "2", "--max_completion_length", "4",
                 *cpu]) == 0  # fmt: skip
    logged = {key for record in read_metrics(rl_out / "metrics.jsonl") for key in record}
    assert {"reward/bleu", "reward/rewards:format_reward", "reward/rewards:reward_len"} <= logged, logged
