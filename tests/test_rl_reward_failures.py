"""A reward that fails on every sample under ``reward_error_policy: skip`` stops the run, naming it and its error."""

from __future__ import annotations

import json
import math

import pytest
import yaml
from vistune.cli import main
from vistune.rl.rewards import FAILED_BATCHES_LIMIT, LoadedReward, RewardError, RewardScorer


def unreachable(prompts, completions, **kwargs):
    raise ConnectionError("judge at http://judge:8000 is unreachable")


def fails_on_short(prompts, completions, **kwargs):
    return [math.nan if len(c) < 3 else 1.0 for c in completions]


def score(scorer, completions):
    return scorer.score([[{"role": "user", "content": "q"}]] * len(completions), completions,
                        sources=[f"data.jsonl:{i + 1}" for i in range(len(completions))])  # fmt: skip


def test_a_reward_failing_every_sample_of_several_batches_in_a_row_stops_the_run():
    scorer = RewardScorer([LoadedReward("judge", 1.0, unreachable, "file judge.py")], "skip", max_failed_batches=3)
    assert score(scorer, ["a", "b"]) == {"judge": [None, None]}
    assert score(scorer, ["c", "d"]) == {"judge": [None, None]}
    with pytest.raises(RewardError) as info:
        score(scorer, ["e", "f"])
    message = str(info.value)
    assert message.startswith("reward 'judge' (file judge.py) failed on every sample of 3 scoring batch(es) in a row "
                              "(6 failed sample(s) in all); first error: raised ConnectionError: judge at "
                              "http://judge:8000 is unreachable (at ")  # fmt: skip
    assert message.splitlines()[0].endswith("(sample data.jsonl:1)")
    assert "reward_error_policy: skip" in info.value.hint


def test_partial_failures_are_skipped_and_reset_the_count():
    scorer = RewardScorer([LoadedReward("picky", 1.0, fails_on_short)], "skip", max_failed_batches=2)
    for _ in range(5):
        assert score(scorer, ["no", "x"]) == {"picky": [None, None]}  # every sample failed ...
        assert score(scorer, ["no", "long enough"]) == {"picky": [None, 1.0]}  # ... then not every one
    record = scorer.failures["picky"]
    assert (record.samples, record.batches, record.failed_batches_in_a_row) == (15, 10, 0)
    assert record.first_error == "returned nan, which is not a finite number or None (sample data.jsonl:1)"
    scorer.raise_if_failing_throughout(finished=True)  # it scored some samples: nothing to stop


def test_a_run_that_ends_before_the_limit_is_judged_on_all_its_batches():
    scorer = RewardScorer([LoadedReward("judge", 1.0, unreachable)], "skip", max_failed_batches=3)
    score(scorer, ["a"])
    scorer.raise_if_failing_throughout()  # one batch of three: not yet
    with pytest.raises(RewardError, match=r"failed on every sample of 1 scoring batch\(es\) in a row"):
        scorer.raise_if_failing_throughout(finished=True)


def test_without_a_limit_failures_are_only_counted():
    scorer = RewardScorer([LoadedReward("judge", 1.0, unreachable)], "skip")
    for _ in range(FAILED_BATCHES_LIMIT + 2):
        score(scorer, ["a", "b"])
    assert scorer.failures["judge"].samples == 2 * (FAILED_BATCHES_LIMIT + 2)


REWARDS = '''
def length(prompts, completions, **kwargs):
    return [min(len(c.split()), 5) / 5 for c in completions]

def unreachable(prompts, completions, **kwargs):
    raise ConnectionError("judge at http://judge:8000 is unreachable")
'''


@pytest.fixture
def rl_config(tmp_path, tiny_llama):
    """``rl_config(name, rewards, **values)`` -> path of an rl config on the tiny Llama, rewards from a local file."""
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Name colour number {i}."}]}) + "\n"
                            for i in range(8)))  # fmt: skip
    (tmp_path / "my_rewards.py").write_text(REWARDS)

    def config(name, rewards, **values):
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump({
            "model": str(tiny_llama), "dataset": str(data), "device": "cpu", "dtype": "float32", "seed": 0,
            "report_to": ["jsonl"], "per_device_batch_size": 2, "num_generations": 2, "max_completion_length": 4,
            "save_steps": 1000, "reward_error_policy": "skip", "output_dir": str(tmp_path / name),
            "rewards": [f"{tmp_path / 'my_rewards.py'}:{reward}" for reward in rewards], **values}))  # fmt: skip
        return path

    return config


def test_rl_stops_on_a_reward_that_fails_throughout(rl_config, capsys):
    config = rl_config("stopped", ["length", "unreachable"], max_steps=6)
    assert main(["rl", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert f"\nerror: reward 'my_rewards:unreachable' (file {config.parent / 'my_rewards.py'}) failed on every sample " \
           f"of {FAILED_BATCHES_LIMIT} scoring batch(es) in a row (12 failed sample(s) in all); first error: raised " \
           "ConnectionError: judge at http://judge:8000 is unreachable" in err  # fmt: skip
    output_dir = config.parent / "stopped"
    steps = [json.loads(line).get("step") for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) < 6  # stopped early, not trained to the end
    assert not (output_dir / "adapter_config.json").exists()  # and nothing saved as a result


def test_rl_shorter_than_the_limit_fails_too(rl_config, capsys):
    config = rl_config("short", ["unreachable"], max_steps=1)
    assert main(["rl", "--config", str(config)]) == 2
    assert "failed on every sample of 1 scoring batch(es) in a row (4 failed sample(s) in all)" in capsys.readouterr().err
    assert not (config.parent / "short" / "adapter_config.json").exists()
