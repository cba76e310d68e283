"""DAPO for vistune (Yu et al. 2025, "DAPO: an open-source LLM reinforcement learning system at scale").

Nothing heavy is imported here: vistune loads :mod:`vistune_dapo.plugin` at discovery.
"""

__version__ = "0.1.0"
