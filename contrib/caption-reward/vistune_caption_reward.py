"""A vistune reward: how many of the reference caption's keywords does the completion name?

"a red circle" has the keywords red and circle: "a red square" scores 0.5, "a circle, red" 1.0.
"""

import re

from vistune import hookimpl
from vistune.specs import Reward

STOPWORDS = ("a", "an", "the", "of", "in", "on", "with", "and", "is")


def words(text):
    return re.findall(r"\w+", text.lower())


def make_keyword_match(column="answer", stopwords=STOPWORDS):
    """Build the reward; keyword arguments come from the reward's `options:` in the config."""

    def keyword_match(prompts, completions, **columns):
        references = columns.get(column)
        if references is None:  # the dataset has no such column: the reward does not apply
            return [None] * len(completions)
        scores = []
        for completion, reference in zip(completions, references):
            keywords = {w for w in words(reference or "") if w not in stopwords}
            if not keywords:
                scores.append(None)
            else:
                scores.append(len(keywords & set(words(completion))) / len(keywords))
        return scores

    return keyword_match


@hookimpl
def vistune_register_rewards(register):
    register(
        Reward(
            "keyword-match",
            factory=make_keyword_match,
            description="share of the reference caption's keywords named in the completion",
        )
    )
