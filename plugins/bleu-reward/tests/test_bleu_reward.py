"""The bleu reward against nltk's sentence_bleu called directly, and against a case computed by hand."""

import math

import pytest
from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu
from vistune.errors import ConfigError
from vistune.testing import check_reward


@pytest.fixture
def bleu_spec(plugin_manager):
    return plugin_manager.registries.rewards.get("bleu")


def test_hand_computed(bleu_spec):
    # hypothesis "the cat sat on the mat" against "the cat is on the mat" (both 6 tokens, so no brevity penalty):
    # unigrams 5/6, bigrams 3/5 (the cat, on the, the mat), trigrams 1/4 (on the mat), 4-grams 0/3 -> method1
    # smoothing replaces the zero count by epsilon 0.1: 0.1/3
    expected = math.exp(0.25 * (math.log(5 / 6) + math.log(3 / 5) + math.log(1 / 4) + math.log(0.1 / 3)))
    scores = check_reward(bleu_spec, ["?"], ["The cat sat on the mat"], {"reference": ["the cat is on the mat"]})
    assert scores[0] == pytest.approx(expected, rel=1e-12)


def test_matches_nltk(bleu_spec):
    completions = ["a red circle", "a blue square here", "green", "a red circle"]
    references = [["a red circle"], "a red square", ["a green cross", "green cross"], "A RED CIRCLE"]
    scores = check_reward(bleu_spec, ["?"] * 4, completions, {"references": references})
    smooth = SmoothingFunction().method1
    for score, completion, refs in zip(scores, completions, references):
        refs = [refs] if isinstance(refs, str) else refs
        expected = sentence_bleu([r.lower().split() for r in refs], completion.split(), smoothing_function=smooth)
        assert score == pytest.approx(expected, rel=1e-12)
    assert scores[0] == scores[3] == pytest.approx(0.1**0.25)  # exact match of a 3-token caption: no 4-gram exists


def test_options(bleu_spec):
    # bigram BLEU without smoothing, "words" tokenizer splits off the full stop
    scores = check_reward(bleu_spec, ["?"], ["a red circle."], {"caption": ["a red circle"]},
                          options={"max_order": 2, "smoothing": "method0", "tokenizer": "words"})  # fmt: skip
    # tokens a, red, circle, "." against a, red, circle: unigrams 3/4, bigrams 2/3; a hypothesis longer than
    # its reference has no brevity penalty
    expected = math.exp(0.5 * (math.log(3 / 4) + math.log(2 / 3)))
    assert scores[0] == pytest.approx(expected)
    # column chosen explicitly; case kept
    scores = check_reward(bleu_spec, ["?"], ["A red circle"], {"label": ["a red circle"], "caption": ["x"]},
                          options={"column": "label", "lowercase": False, "max_order": 1})  # fmt: skip
    assert scores[0] == pytest.approx(2 / 3)


def test_not_applicable(bleu_spec):
    scores = check_reward(bleu_spec, ["?"] * 3, ["a", "b", ""], {"answer": [None, [], "a red circle"]})
    assert scores == [None, None, 0.0]
    assert check_reward(bleu_spec, ["?"], ["a"], {"other": ["a"]}) == [None]


def test_bad_options(bleu_spec):
    with pytest.raises(ConfigError, match="smoothing"):
        check_reward(bleu_spec, ["?"], ["a"], {}, options={"smoothing": "method9"})
    with pytest.raises(ConfigError, match="tokenizer"):
        check_reward(bleu_spec, ["?"], ["a"], {}, options={"tokenizer": "punkt"})


def test_declared_options_are_the_factorys_defaults_and_are_checked_where_written(bleu_spec, tmp_path):
    import inspect

    from vistune.config import build_config, load_config
    from vistune.plan import make_plan
    from vistune.plugins import get_plugin_manager
    from vistune.testing import check_options
    from vistune_bleu_reward.bleu import make_bleu

    defaults = {name: p.default for name, p in inspect.signature(make_bleu).parameters.items()}
    assert {o.name: o.default for o in check_options(bleu_spec)} == defaults
    path = tmp_path / "run.yaml"
    path.write_text("rewards: [bleu]\nbleu:\n  smoothing: method9\n")
    with pytest.raises(ConfigError, match=r"run.yaml:3: bleu.smoothing must be one of method0, .*method7; got 'method9'"):
        load_config(str(path), task="rl")
    # the section gives every use its defaults; an entry's own options win
    config = {"task": "infer", "model": str(tmp_path), "dataset": str(tmp_path), "bleu": {"max_order": 2},
              "rewards": ["bleu", {"name": "bleu", "options": {"max_order": 1}}]}  # fmt: skip
    plan = make_plan(build_config(config), get_plugin_manager())
    assert [use.options["max_order"] for use in plan.rewards] == [2, 1]
