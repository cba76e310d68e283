"""Loading, calling and combining rewards: plugins and local files, sync and async, weights, None, errors."""

import asyncio
import math
import textwrap
from pathlib import Path

import pytest
from vistune.plan import RewardUse
from vistune.rl.rewards import RewardError, RewardScorer, combine, load_reward, load_rewards
from vistune.specs import Reward

REWARD_FILE = """
import asyncio

def length(prompts, completions, **columns):
    return [float(len(c)) for c in completions]

def scaled(prompts, completions, factor=1.0, **columns):
    return [factor * len(c) for c in completions]

class Contains:
    def __init__(self, word="red"):
        self.word = word

    def __call__(self, prompts, completions, answer=None, **columns):
        return [None if a is None else float(self.word in c) for c, a in zip(completions, answer)]

async def async_scaled(prompts, completions, factor=1.0, **columns):
    return [factor * len(c) for c in completions]

async def slow_echo(prompts, completions, **columns):
    await asyncio.sleep(0)
    return [1.0 for _ in completions]

def picky(prompts, completions, **columns):
    for c in completions:
        if "boom" in c:
            raise ValueError("cannot score " + c)
    return [0.5 for _ in completions]

def wrong_length(prompts, completions, **columns):
    return [1.0]

def not_finite(prompts, completions, **columns):
    return [float("nan") if c == "bad" else 1.0 for c in completions]
"""


@pytest.fixture
def reward_file(tmp_path):
    path = tmp_path / "my_rewards.py"
    path.write_text(textwrap.dedent(REWARD_FILE))
    return path


def file_use(path: Path, attribute: str, weight: float = 1.0, **options) -> RewardUse:
    return RewardUse(f"{path}:{attribute}", weight, options, file=path, attribute=attribute)


def test_file_function_class_and_options(reward_file):
    prompts, completions = [["p"], ["p"]], ["a red b", "blue"]
    length = load_reward(file_use(reward_file, "length"))
    assert length.name == "my_rewards:length" and length.origin == f"file {reward_file}"
    assert length.function(prompts, completions) == [7.0, 4.0]
    scaled = load_reward(file_use(reward_file, "scaled", factor=2.0))
    assert scaled.function(prompts, completions) == [14.0, 8.0]
    contains = load_reward(file_use(reward_file, "Contains", word="blue"))
    assert contains.function(prompts, completions, answer=["x", None]) == [0.0, None]


def test_plugin_reward(plugin_manager):
    use = RewardUse("bleu", 0.5, {"max_order": 1}, spec=plugin_manager.registries.rewards.get("bleu"))
    [reward] = load_rewards([use], plugin_manager)
    assert reward.weight == 0.5 and "vistune-bleu-reward" in reward.origin
    assert reward.function(["?"], ["a red circle"], answer=["a red circle"]) == [1.0]


def test_plugin_reward_with_bad_options(plugin_manager):
    from vistune.errors import PluginError

    use = RewardUse("bleu", 1.0, {"no_such_option": 1}, spec=plugin_manager.registries.rewards.get("bleu"))
    with pytest.raises(PluginError, match="rejected its options"):
        load_rewards([use], plugin_manager)


def test_weights_and_the_none_rule():
    scores = {"a": [1.0, None, None, 0.5], "b": [2.0, 3.0, None, None]}
    totals = combine(scores, {"a": 0.5, "b": 2.0})
    assert totals[:2] == [0.5 * 1.0 + 2.0 * 2.0, 2.0 * 3.0]  # a missing score is left out, not counted as 0
    assert math.isnan(totals[2])  # no reward applies at all
    assert totals[3] == 0.25


def test_scorer_calls_sync_and_async_rewards(reward_file):
    rewards = [load_reward(file_use(reward_file, name)) for name in ("length", "slow_echo")]
    scorer = RewardScorer(rewards)
    scores = scorer.score([["p"]] * 2, ["ab", "abc"], {"answer": ["x", "y"]}, ["f:1", "f:2"])
    assert scores == {"my_rewards:length": [2.0, 3.0], "my_rewards:slow_echo": [1.0, 1.0]}


def test_async_rewards_run_concurrently():
    from vistune.rl.rewards import LoadedReward

    # each reward waits until the other has started: awaited one after the other, they would time out
    events_by_loop = {}

    def make(name, other):
        async def reward(prompts, completions, **columns):
            events = events_by_loop.setdefault(
                id(asyncio.get_running_loop()), {"x": asyncio.Event(), "y": asyncio.Event()}
            )
            events[name].set()
            await asyncio.wait_for(events[other].wait(), timeout=10)
            return [1.0] * len(completions)

        return reward

    scorer = RewardScorer([LoadedReward("x", 1.0, make("x", "y")), LoadedReward("y", 1.0, make("y", "x"))])
    assert scorer.score([["p"]], ["c"]) == {"x": [1.0], "y": [1.0]}


def test_raising_reward_names_the_sample(reward_file):
    scorer = RewardScorer([load_reward(file_use(reward_file, "picky"))])
    with pytest.raises(RewardError) as info:
        scorer.score([["q1"], ["q2"]], ["fine", "boom here"], {}, ["data.jsonl:3", "data.jsonl:7"])
    message = str(info.value)
    assert "my_rewards:picky" in message and "data.jsonl:7" in message and "boom here" in message
    assert "ValueError" in message and "reward_error_policy" in message
    assert "data.jsonl:3" not in message


def test_skip_policy_scores_only_the_failing_sample_none(reward_file):
    scorer = RewardScorer([load_reward(file_use(reward_file, "picky")), load_reward(file_use(reward_file, "not_finite"))],
                          error_policy="skip")  # fmt: skip
    scores = scorer.score([["q"]] * 3, ["fine", "boom", "bad"], {}, ["s:1", "s:2", "s:3"])
    assert scores["my_rewards:picky"] == [0.5, None, 0.5]
    assert scores["my_rewards:not_finite"] == [1.0, 1.0, None]
    assert scorer.pop_error_counts() == {"my_rewards:picky": 1, "my_rewards:not_finite": 1}
    assert scorer.pop_error_counts() == {}


def test_wrong_length_always_raises(reward_file):
    scorer = RewardScorer([load_reward(file_use(reward_file, "wrong_length"))], error_policy="skip")
    with pytest.raises(RewardError, match="returned 1 scores for 2 completions"):
        scorer.score([["q"]] * 2, ["a", "b"])


def test_duplicate_names_get_suffixes(reward_file):
    rewards = load_rewards([file_use(reward_file, "length"), file_use(reward_file, "length", weight=2.0)])
    assert [r.name for r in rewards] == ["my_rewards:length", "my_rewards:length#2"]


def test_check_reward_contract_for_a_plugin_spec(register_plugin, plugin_manager):
    from vistune import hookimpl
    from vistune.testing import check_reward

    def factory(bonus=0.0):
        async def reward(prompts, completions, **columns):
            return [bonus + len(c) for c in completions]

        return reward

    class Plugin:
        @hookimpl
        def vistune_register_rewards(self, register):
            register(Reward("test-async-length", factory=factory))

    register_plugin(Plugin())
    spec = plugin_manager.registries.rewards.get("test-async-length")
    assert check_reward(spec, ["?"], ["abc"], options={"bonus": 1.0}) == [4.0]
    [loaded] = load_rewards([RewardUse("test-async-length", 1.0, {"bonus": 2.0}, spec=spec)], plugin_manager)
    assert RewardScorer([loaded]).score([["?"]], ["abc"]) == {"test-async-length": [5.0]}


def test_async_file_reward_with_options(reward_file):
    reward = load_reward(file_use(reward_file, "async_scaled", factor=3.0))
    assert RewardScorer([reward]).score([["p"]] * 2, ["ab", "abc"]) == {"my_rewards:async_scaled": [6.0, 9.0]}


def test_a_bad_score_is_reported_without_calling_the_reward_again():
    from vistune.rl.rewards import LoadedReward

    calls = []

    def flaky(prompts, completions, **columns):
        calls.append(len(completions))
        return [float("inf") if c == "bad" else 1.0 for c in completions]

    scorer = RewardScorer([LoadedReward("flaky", 1.0, flaky)], error_policy="skip")
    assert scorer.score([["q"]] * 3, ["ok", "bad", "ok"]) == {"flaky": [1.0, None, 1.0]}
    assert calls == [3]  # the batch's own scores say which sample failed
    assert scorer.pop_error_counts() == {"flaky": 1}
