"""Group-relative policy-gradient algorithms for vistune: GRPO, Dr. GRPO, GSPO and RLOO.

Nothing heavy is imported here: vistune loads :mod:`vistune_grpo.plugin` at discovery.
"""

__version__ = "0.1.0"
