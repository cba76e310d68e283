"""Sentence BLEU as a vistune reward.

Nothing heavy is imported here: vistune loads :mod:`vistune_bleu_reward.plugin` at discovery.
"""

__version__ = "0.1.0"
