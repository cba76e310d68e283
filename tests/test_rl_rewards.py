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


# -- rewards written for TRL and ms-swift, loaded as users name them in a config ---------------

TRL_REWARDS = '''
def reward_len(completions, **kwargs):
    return [-abs(20 - len(completion)) for completion in completions]


class LengthReward:
    def __call__(self, completions, **kwargs):
        return [float(len(completion)) for completion in completions]


def sees(prompts, completions, completion_ids, trainer_state, solution, **kwargs):
    """Scores 1.0 when every argument arrived in the documented format."""
    ok = (all(isinstance(p, list) and p[-1]["role"] == "user" for p in prompts)
          and all(isinstance(c, str) for c in completions)
          and all(isinstance(ids, list) for ids in completion_ids)
          and trainer_state is None and len(solution) == len(completions))
    return [1.0 if ok else 0.0 for _ in completions]
'''

# as ms-swift's docs write a reward plugin (with ms-swift's ORM base class spelled out, so the file
# needs no ms-swift installed)
MS_SWIFT_PLUGIN = '''
from typing import List


class ORM:
    def __call__(self, **kwargs) -> List[float]:
        raise NotImplementedError


class MyAcc(ORM):
    def __call__(self, completions, solution, **kwargs) -> List[float]:
        rewards = []
        for content, sol in zip(completions, solution):
            rewards.append(1.0 if sol.strip() in content else 0.0)
        return rewards


orms = {'my_acc': MyAcc}
'''

VISTUNE_POSITIONAL = '''
def short(ps, cs, **columns):
    """vistune's positional form under names of its own."""
    return [1.0 if len(c) < 5 and ps[i][0]["content"] else 0.0 for i, c in enumerate(cs)]


def exact(prompts, completions, answer):
    """No **columns: given only the arguments it names."""
    return [float(c == a) for c, a in zip(completions, answer)]


def says_yes(completions, **kwargs):
    return ["yes" for _ in completions]
'''


def reward_problems(tmp_path, plugin_manager, *names):
    """The plan of an rl config naming ``names`` as its rewards, and the plan's reward problems."""
    import yaml
    from vistune.config import load_config
    from vistune.plan import make_plan

    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": "nowhere", "rewards": list(names)}))
    plan = make_plan(load_config(str(config), [], task="rl"), plugin_manager)
    return plan, [p.message for p in plan.problems if p.field == "rewards"]


def rewards_from_config(tmp_path, plugin_manager, *names):
    """Rewards loaded the way a run loads them: config ``rewards:`` -> plan -> :func:`load_rewards`."""
    plan, problems = reward_problems(tmp_path, plugin_manager, *names)
    assert problems == []
    return load_rewards(plan.rewards, plugin_manager)


def write(tmp_path, name, text):
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


PROMPTS = [[{"role": "user", "content": "What is 2+2?"}], [{"role": "user", "content": "And 3+3?"}]]
COMPLETIONS = ["It is 4.", "Twelve, surely, or maybe 6."]
SOLUTIONS = {"solution": ["4", "6"], "answer": ["4", "6"]}


def test_trl_style_function_and_class(tmp_path, plugin_manager):
    path = write(tmp_path, "trl_rewards.py", TRL_REWARDS)
    rewards = rewards_from_config(tmp_path, plugin_manager, f"{path}:reward_len", f"{path}:LengthReward")
    scores = RewardScorer(rewards).score(PROMPTS, COMPLETIONS, SOLUTIONS)
    assert scores == {"trl_rewards:reward_len": [-12.0, -7.0], "trl_rewards:LengthReward": [8.0, 27.0]}


def test_ms_swift_orm_class_by_its_orms_name(tmp_path, plugin_manager):
    path = write(tmp_path, "plugin.py", MS_SWIFT_PLUGIN)
    by_name, alone = rewards_from_config(tmp_path, plugin_manager, f"{path}:my_acc", str(path))
    assert by_name.name == "plugin:my_acc" and alone.name == "plugin:my_acc#2"
    assert type(by_name.function).__name__ == "MyAcc"  # the class, instantiated
    scores = RewardScorer([by_name, alone]).score(PROMPTS, COMPLETIONS, {"solution": ["4", "5"]})
    assert scores == {"plugin:my_acc": [1.0, 0.0], "plugin:my_acc#2": [1.0, 0.0]}


def test_an_orms_name_that_is_not_there(tmp_path, plugin_manager):
    from vistune.errors import PluginError

    path = write(tmp_path, "plugin.py", MS_SWIFT_PLUGIN + "\norms['other'] = MyAcc\n")
    with pytest.raises(PluginError, match=r"defines no 'nope' \(its orms dict holds my_acc, other\)"):
        rewards_from_config(tmp_path, plugin_manager, f"{path}:nope")
    with pytest.raises(PluginError, match="names no reward and has an orms dict with 2 entries"):
        rewards_from_config(tmp_path, plugin_manager, str(path))


def test_a_file_without_an_orms_dict_must_name_its_reward(tmp_path, plugin_manager):
    path = write(tmp_path, "mine.py", VISTUNE_POSITIONAL)
    _, problems = reward_problems(tmp_path, plugin_manager, str(path), f"{path}:my_acc")
    assert problems == [f"{path} names no reward (top-level names: exact, says_yes, short)",
                        f"{path} defines no 'my_acc' (top-level names: exact, says_yes, short)"]  # fmt: skip


def test_every_argument_in_its_documented_format(tmp_path, plugin_manager):
    path = write(tmp_path, "trl_rewards.py", TRL_REWARDS)
    [reward] = rewards_from_config(tmp_path, plugin_manager, f"{path}:sees")
    scorer = RewardScorer([reward])
    assert scorer.score(PROMPTS, COMPLETIONS, SOLUTIONS, completion_ids=[[1, 2], [3]]) == {"trl_rewards:sees": [1.0, 1.0]}
    with pytest.raises(RewardError, match="missing 1 required positional argument: 'solution'"):
        scorer.score(PROMPTS, COMPLETIONS, {"answer": ["4", "6"]}, completion_ids=[[1, 2], [3]])


def test_vistune_positional_rewards_keep_working(tmp_path, plugin_manager, register_plugin):
    from vistune import hookimpl

    path = write(tmp_path, "mine.py", VISTUNE_POSITIONAL)

    class Plugin:
        @hookimpl
        def vistune_register_rewards(self, register):
            register(Reward("test-positional", factory=lambda: lambda p, c, **cols: [float(len(p[0])) for _ in c]))

    register_plugin(Plugin())
    bleu = {"name": "bleu", "options": {"max_order": 1}}
    rewards = rewards_from_config(tmp_path, plugin_manager, f"{path}:short", f"{path}:exact", "test-positional", bleu)
    scores = RewardScorer(rewards).score(PROMPTS, ["4", "Twelve, surely, or maybe 6."], SOLUTIONS,
                                         completion_ids=[[1], [2]])  # fmt: skip
    assert scores["mine:short"] == [1.0, 0.0] and scores["mine:exact"] == [1.0, 0.0]
    assert scores["test-positional"] == [1.0, 1.0]
    assert scores["bleu"][0] == 1.0


def test_scores_that_are_not_numbers_name_the_reward_and_its_file(tmp_path, plugin_manager):
    path = write(tmp_path, "mine.py", VISTUNE_POSITIONAL)
    [reward] = rewards_from_config(tmp_path, plugin_manager, f"{path}:says_yes")
    with pytest.raises(RewardError) as info:
        RewardScorer([reward]).score(PROMPTS, COMPLETIONS)
    assert f"reward 'mine:says_yes' (file {path}) returned 'yes', which is not a finite number or None" in str(info.value)


def test_numpy_scores_count_as_numbers():
    import numpy as np
    from vistune.rl.rewards import LoadedReward

    def half(completions, **kwargs):
        return [np.float32(0.5), None]

    assert RewardScorer([LoadedReward("half", 1.0, half)]).score(PROMPTS, COMPLETIONS) == {"half": [0.5, None]}


def test_a_column_named_like_a_reward_argument_is_refused():
    from vistune.rl.rewards import LoadedReward

    scorer = RewardScorer([LoadedReward("any", 1.0, lambda completions, **kwargs: [1.0] * len(completions))])
    with pytest.raises(ValueError, match=r"column\(s\) \['completion_ids'\]"):
        scorer.score(PROMPTS, COMPLETIONS, {"completion_ids": [[1], [2]]})
