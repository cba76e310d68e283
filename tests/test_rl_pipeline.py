"""`vistune rl` end to end on tiny models: text and vision, every algorithm path, hooks, outputs."""

import json
from pathlib import Path

import pytest
import yaml
from vistune import hookimpl
from vistune.cli import main
from vistune.training.metrics import read_metrics

REWARDS = '''
def length(prompts, completions, **columns):
    """Longer is better, up to 5 words."""
    return [min(len(c.split()), 5) / 5 for c in completions]

def parity(prompts, completions, flat=None, **columns):
    """1.0 for every completion of a "flat" prompt (no signal), else the completion length's parity."""
    return [1.0 if f else float(len(c) % 2) for c, f in zip(completions, flat or [None] * len(completions))]

def fragile(prompts, completions, **columns):
    for c in completions:
        if len(c) % 3 == 0:
            raise RuntimeError("cannot score this one")
    return [1.0] * len(completions)
'''

BASE = {
    "device": "cpu", "dtype": "float32", "report_to": ["jsonl"], "logging_steps": 1, "seed": 0,
    "per_device_batch_size": 2, "num_generations": 3, "max_completion_length": 6, "learning_rate": 1e-3,
    "lora_target_modules": "all-linear", "save_steps": 1000,
}  # fmt: skip


class Recorder:
    """Records the rl pipeline's lifecycle hooks."""

    def __init__(self):
        self.rollouts = []
        self.trainers = []
        self.saved = []

    @hookimpl
    def vistune_rollout_scored(self, prompts, completions, rewards, step):
        self.rollouts.append({"prompts": prompts, "completions": completions, "rewards": rewards, "step": step})

    @hookimpl
    def vistune_trainer_created(self, trainer, config):
        self.trainers.append(trainer)

    @hookimpl
    def vistune_checkpoint_saved(self, path, step, config):
        self.saved.append((path, step))


@pytest.fixture
def recorder(register_plugin):
    recorder = Recorder()
    register_plugin(recorder)
    return recorder


@pytest.fixture
def text_data(tmp_path):
    colours = ["red", "green", "blue", "yellow"]
    lines = []
    for i in range(8):
        record = {"messages": [{"role": "user", "content": f"Name colour number {i}."},
                               {"role": "assistant", "content": f"a {colours[i % 4]} circle"}],
                  "flat": i % 2 == 0}  # fmt: skip
        lines.append(json.dumps(record))
    path = tmp_path / "text.jsonl"
    path.write_text("\n".join(lines) + "\n")
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    return path


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    from vistune.demo.shapes import write_split

    return write_split(tmp_path_factory.mktemp("shapes"), "eval", count=8, seed=3)


def run_rl(tmp_path, name, **values):
    config = {"task": "rl", **BASE, "output_dir": str(tmp_path / name), **values}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["rl", "--config", str(path)]) == 0
    return Path(config["output_dir"])


def test_text_grpo(tmp_path, text_data, tiny_llama, recorder, capsys):
    reward_file = tmp_path / "my_rewards.py"
    out = run_rl(tmp_path, "grpo", model=str(tiny_llama), dataset=str(text_data), max_steps=2,
                 rewards=["bleu", {"name": f"{reward_file}:length", "weight": 0.5}],
                 report_to=["jsonl", "tensorboard"])  # fmt: skip
    # one rollout per step, 2 prompts x 3 completions, scored by both rewards, the answer given as a column
    assert [r["step"] for r in recorder.rollouts] == [0, 1]
    first = recorder.rollouts[0]
    assert len(first["completions"]) == 6 and len(first["prompts"]) == 6
    assert set(first["rewards"]) == {"bleu", "my_rewards:length"}
    assert first["prompts"][0][-1]["role"] == "user"
    records = [r for r in read_metrics(out / "metrics.jsonl") if "reward" in r]
    assert [r["step"] for r in records] == [1, 2]
    for key in ("reward", "reward/bleu", "reward/my_rewards:length", "completion_length/mean", "clip_fraction/low",
                "clip_fraction/high", "filtered_groups", "loss", "grad_norm"):  # fmt: skip
        assert key in records[0], key
    scores = first["rewards"]
    expected = [b + 0.5 * n for b, n in zip(scores["bleu"], scores["my_rewards:length"])]
    assert records[0]["reward"] == pytest.approx(sum(expected) / len(expected))
    # the same figures in TensorBoard, and a progress bar showing the reward
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "tensorboard")).Reload()
    for tag in ("train/reward", "reward/bleu", "reward/my_rewards:length", "clip_fraction/high",
                "completion_length/mean", "train/filtered_groups"):  # fmt: skip
        assert [e.step for e in events.Scalars(tag)] == [1, 2], tag
    assert events.Scalars("train/reward")[0].value == pytest.approx(records[0]["reward"])
    err = capsys.readouterr().err
    assert "2/2" in err and f"reward={records[-1]['reward']:.3f}" in err
    # the trainer the plugins saw trained; the result is a peft adapter on the tiny Llama
    assert recorder.trainers and recorder.saved[-1] == (str(out), 2)
    assert (str(out / "checkpoint-2"), 2) in recorder.saved  # the Trainer's checkpoint, atomically in place
    run = json.loads((out / "vistune_run.json").read_text())
    assert run["model_type"] == "causal-lm" and run["base_model"] == str(Path(tiny_llama).resolve())
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama), str(out))
    assert (out / "reward_curve.png").is_file()


def test_dapo_refills_filtered_groups(tmp_path, text_data, tiny_llama, recorder, register_plugin):
    from vistune.specs import Algorithm
    from vistune_dapo.algorithm import DAPO

    trained = []  # the shaped rewards of the groups each step trains on
    judged = []  # what the group filter saw

    class RecordingDAPO(DAPO):
        def select_groups(self, rewards):
            judged.append(rewards.clone())
            return super().select_groups(rewards)

        def advantages(self, rewards):
            trained.append(rewards.clone())
            return super().advantages(rewards)

    class Plugin:
        @hookimpl
        def vistune_register_algorithms(self, register):
            register(Algorithm("recording-dapo", factory=RecordingDAPO, defaults={"epsilon_high": 0.28}))

    register_plugin(Plugin())
    reward_file = tmp_path / "my_rewards.py"
    out = run_rl(tmp_path, "dapo", model=str(tiny_llama), dataset=str(text_data), max_steps=2,
                 algorithm="recording-dapo", num_generations=4, rewards=[f"{reward_file}:parity"],
                 algorithm_options={"overlong_buffer": 2})  # fmt: skip
    records = [r for r in read_metrics(out / "metrics.jsonl") if "reward" in r]
    # half the prompts are "flat" (all rewards 1.0): dropped and replaced by sampling more prompts
    assert sum(r["filtered_groups"] for r in records) > 0
    assert max(r["sampling_rounds"] for r in records) > 1
    assert len(recorder.rollouts) > 2  # more than one sampling round per step
    # ... so that every step still trains on a full batch of 2 prompt groups, none of them without spread
    assert [tuple(rewards.shape) for rewards in trained] == [(2, 4), (2, 4)]
    assert all(float(row.max() - row.min()) > 0 for rewards in trained for row in rewards)
    assert "reward_shaped" in records[0]  # overlong shaping with a 2-token buffer of 6 moved some rewards
    # ... but groups are filtered on the parity reward itself (0 or 1), as the paper filters on accuracy
    assert all(set(rewards.unique().tolist()) <= {0.0, 1.0} for rewards in judged)
    assert records[0]["clip_fraction/high"] == 0.0  # on-policy: ratio 1


def test_llava_with_images_kl_and_several_iterations(tmp_path, shapes_data, tiny_llava, recorder):
    (tmp_path / "my_rewards.py").write_text(REWARDS)
    # the random tiny Llava's captions all score BLEU 0: the length reward gives the groups some spread
    out = run_rl(tmp_path, "llava", model=str(tiny_llava), dataset=str(shapes_data), max_steps=2,
                 rewards=["bleu", f"{tmp_path / 'my_rewards.py'}:length"], beta=0.1,
                 algorithm_options={"num_iterations": 2}, learning_rate=2e-2)  # fmt: skip
    assert len(recorder.rollouts) == 1  # the second step trains again on the first step's rollouts
    assert recorder.rollouts[0]["prompts"][0][0]["content"].startswith("<image>")
    records = [r for r in read_metrics(out / "metrics.jsonl") if "kl" in r]
    assert [r["step"] for r in records] == [1, 2] and "reward" not in records[1]  # no new rollout at step 2
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # a new LoRA adapter starts at the reference
    assert records[1]["kl"] > 0
    assert records[0]["importance_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert records[1]["importance_ratio"] != pytest.approx(1.0, abs=1e-5)
    assert (out / "adapter_config.json").is_file()


def test_qwen2_vl_gspo(tmp_path, shapes_data, tiny_qwen2_vl, recorder):
    out = run_rl(tmp_path, "qwen", model=str(tiny_qwen2_vl), dataset=str(shapes_data), max_steps=1, algorithm="gspo",
                 rewards=["bleu"])  # fmt: skip
    assert len(recorder.rollouts[0]["completions"]) == 6
    records = [r for r in read_metrics(out / "metrics.jsonl") if "reward" in r]
    assert "reward/bleu" in records[0]
    assert json.loads((out / "vistune_run.json").read_text())["model_type"] == "qwen2-vl"


def test_continues_an_sft_adapter_with_its_copy_as_reference(tmp_path, text_data, tiny_llama, recorder):
    import torch
    from safetensors.torch import load_file

    sft = tmp_path / "sft"
    sft_config = {"task": "sft", "model": str(tiny_llama), "dataset": str(text_data), "device": "cpu", "dtype": "float32",
                  "max_steps": 2, "learning_rate": 5e-2, "output_dir": str(sft), "report_to": ["jsonl"],
                  "lora_target_modules": "all-linear", "lora_dropout": 0.0}  # fmt: skip
    (tmp_path / "sft.yaml").write_text(yaml.safe_dump(sft_config))
    assert main(["sft", "--config", str(tmp_path / "sft.yaml")]) == 0
    out = run_rl(tmp_path, "from-sft", model=str(sft), dataset=str(text_data), max_steps=2, beta=0.05,
                 rewards=[f"{tmp_path / 'my_rewards.py'}:length"], learning_rate=5e-2)  # fmt: skip
    records = [r for r in read_metrics(out / "metrics.jsonl") if "reward" in r]
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the SFT adapter itself
    assert records[1]["kl"] > 0  # ... not the base model, and the policy moved away from it
    assert not (out / "reference").exists()  # the frozen reference copy is not saved
    run = json.loads((out / "vistune_run.json").read_text())
    assert run["base_model"] == str(Path(tiny_llama).resolve())
    before, after = load_file(sft / "adapter_model.safetensors"), load_file(out / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    assert any(not torch.equal(before[k], after[k]) for k in before)


def test_full_fine_tuning_keeps_a_frozen_reference_copy(tmp_path, text_data, tiny_llama, register_plugin):
    from vistune.specs import Algorithm
    from vistune_grpo.algorithms import GRPO

    class KLWatchingGRPO(GRPO):
        """Asks for the reference model without a KL term in the loss (beta 0): the trainer logs the KL."""

        def needs_reference_model(self):
            return True

    class Plugin:
        @hookimpl
        def vistune_register_algorithms(self, register):
            register(Algorithm("kl-watching-grpo", factory=KLWatchingGRPO))

    register_plugin(Plugin())
    out = run_rl(tmp_path, "full", model=str(tiny_llama), dataset=str(text_data), max_steps=2, adapter="full",
                 algorithm="kl-watching-grpo", rewards=[f"{tmp_path / 'my_rewards.py'}:length"], learning_rate=5e-3)  # fmt: skip
    records = [r for r in read_metrics(out / "metrics.jsonl") if "reward" in r]
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # the reference is the starting policy
    assert records[1]["kl"] > 0  # ... a copy of it, which the first step's update did not move
    assert (out / "model.safetensors").is_file()


MS_SWIFT_PLUGIN = '''
from typing import List


class MyAcc:
    """An ms-swift reward class as its docs write one (``swift.plugin.ORM``'s subclass, without ms-swift)."""

    def __call__(self, completions, solution, **kwargs) -> List[float]:
        return [1.0 if sol in content else 0.0 for content, sol in zip(completions, solution)]


orms = {'my_acc': MyAcc}


def token_count(completions, completion_ids, trainer_state, **kwargs):
    """A TRL-style reward reading the token ids and the trainer state."""
    assert trainer_state.global_step == 0
    return [float(len(ids)) for ids in completion_ids]
'''


def test_ms_swift_and_trl_style_rewards(tmp_path, tiny_llama, recorder):
    solutions = ["e", "a", "o", "t"]
    records = [{"messages": [{"role": "user", "content": f"Say something, number {i}."}], "solution": solutions[i]}
               for i in range(4)]  # fmt: skip
    data = tmp_path / "solutions.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in records))
    plugin = tmp_path / "swift_plugin.py"
    plugin.write_text(MS_SWIFT_PLUGIN)
    out = run_rl(tmp_path, "swift", model=str(tiny_llama), dataset=str(data), max_steps=1,
                 rewards=[f"{plugin}:my_acc", {"name": f"{plugin}:token_count", "weight": 0.1}])  # fmt: skip
    [rollout] = recorder.rollouts
    # each completion was checked against the solution of its own prompt
    solution_of = {record["messages"][0]["content"]: record["solution"] for record in records}
    expected = [float(solution_of[p[0]["content"]] in c) for p, c in zip(rollout["prompts"], rollout["completions"])]
    assert rollout["rewards"]["swift_plugin:my_acc"] == expected
    assert all(1 <= n <= BASE["max_completion_length"] for n in rollout["rewards"]["swift_plugin:token_count"])
    [record] = [r for r in read_metrics(out / "metrics.jsonl") if "reward" in r]
    assert "reward/swift_plugin:my_acc" in record and "reward/swift_plugin:token_count" in record


def test_reward_errors(tmp_path, text_data, tiny_llama, capsys):
    fragile = f"{tmp_path / 'my_rewards.py'}:fragile"
    config = {"task": "rl", **BASE, "model": str(tiny_llama), "dataset": str(text_data), "max_steps": 1,
              "rewards": [fragile], "output_dir": str(tmp_path / "raise")}  # fmt: skip
    (tmp_path / "raise.yaml").write_text(yaml.safe_dump(config))
    assert main(["rl", "--config", str(tmp_path / "raise.yaml")]) == 2
    err = capsys.readouterr().err
    assert "reward 'my_rewards:fragile'" in err and "RuntimeError: cannot score this one" in err
    assert f"sample: {text_data}:" in err and "completion:" in err
    out = run_rl(tmp_path, "skip", model=str(tiny_llama), dataset=str(text_data), max_steps=1, rewards=[fragile],
                 reward_error_policy="skip")  # fmt: skip
    record = next(r for r in read_metrics(out / "metrics.jsonl") if "reward" in r)
    assert record["reward_errors/my_rewards:fragile"] > 0


@pytest.mark.parametrize(
    "values, message",
    [
        ({"parallel_method": "fsdp"}, "vistune rl cannot shard the policy with fsdp"),
        # log-probabilities are divided by the temperature: 0 would make the loss NaN
        ({"temperature": 0.0}, "temperature must be above 0"),
    ],
)
def test_refused_before_the_model_loads(tmp_path, text_data, tiny_llama, capsys, monkeypatch, values, message):
    from vistune import loading

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_model", no_loading)
    config = {"task": "rl", **BASE, "model": str(tiny_llama), "dataset": str(text_data), **values,
              "rewards": [f"{tmp_path / 'my_rewards.py'}:length"], "output_dir": str(tmp_path / "refused")}  # fmt: skip
    (tmp_path / "refused.yaml").write_text(yaml.safe_dump(config))
    assert main(["rl", "--config", str(tmp_path / "refused.yaml")]) == 2
    assert message in capsys.readouterr().err


RANKED_REWARD = '''
import json, os

def ranked(prompts, completions, **columns):
    """The process's rank plus a length score, logged per call: each process's mean differs, so a merge shows."""
    rank = int(os.environ["RANK"])
    scores = [rank + min(len(c.split()), 5) / 5 for c in completions]
    with open(os.path.join({log_dir!r}, f"scores.rank{{rank}}.jsonl"), "a") as log:
        log.write(json.dumps(scores) + "\\n")
    return scores
'''


@pytest.mark.slow
def test_two_cpu_processes_log_the_same_merged_metrics(tmp_path, text_data, tiny_llama):
    """Both processes log every step, and what they log is the two processes' rollouts together."""
    (tmp_path / "ranked.py").write_text(RANKED_REWARD.format(log_dir=str(tmp_path)))
    out = run_rl(tmp_path, "ddp", model=str(tiny_llama), dataset=str(text_data), max_steps=2, gpu_num=2,
                 algorithm="grpo", rewards=[f"{tmp_path / 'ranked.py'}:ranked"])  # fmt: skip
    main_records = [r for r in read_metrics(out / "metrics.jsonl") if "reward" in r]
    other_records = [r for r in read_metrics(out / "metrics.rank1.jsonl") if "reward" in r]
    assert [r["step"] for r in main_records] == [r["step"] for r in other_records] == [1, 2]
    for mine, theirs in zip(main_records, other_records):
        assert set(mine) == set(theirs)
        for key in ("reward", "reward/ranked:ranked", "completion_length/mean", "completion_length/max",
                    "completion_length/min", "loss"):  # fmt: skip
            assert mine[key] == pytest.approx(theirs[key]), key
    # each process scored one rollout per step: 2 prompts x 3 completions, rank 0 in [0, 1], rank 1 in [1, 2]
    calls = {rank: [json.loads(line) for line in (tmp_path / f"scores.rank{rank}.jsonl").read_text().splitlines()]
             for rank in (0, 1)}  # fmt: skip
    assert [len(c) for c in calls[0]] == [len(c) for c in calls[1]] == [6, 6]
    for step, record in enumerate(main_records):
        means = [sum(calls[rank][step]) / 6 for rank in (0, 1)]
        assert record["reward"] == pytest.approx(sum(means) / 2)  # not one process's own mean
        assert means[0] < 1 <= means[1]
    assert (out / "adapter_model.safetensors").is_file()
