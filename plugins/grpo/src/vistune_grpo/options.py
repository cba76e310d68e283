"""The options of the GRPO family, declared on their specs (set as ``grpo: {...}`` or ``algorithm_options``).

Kept apart from :mod:`vistune_grpo.algorithms` so that registering the specs stays light.
"""

import attrs

from vistune.rl.objectives import NORMALISATIONS
from vistune.specs import Option

GRPO_OPTIONS = (
    Option("loss_normalisation", "str", "sequence",
           "how token losses are averaged: per sequence (GRPO), over all tokens (DAPO-style) or by a constant "
           "(Dr. GRPO)", choices=NORMALISATIONS),  # fmt: skip
    Option("scale_rewards", "bool", True, "divide the centred rewards by the group's standard deviation"),
    # TRL uses the same 1e-4
    Option("std_epsilon", "float", 1e-4, "added to the group's standard deviation so a near-constant group "
           "does not explode", minimum=0),  # fmt: skip
    Option("num_iterations", "int", 1, "optimizer steps per rollout batch (the paper's mu)", minimum=1),
)


def _with_defaults(options: tuple[Option, ...], **defaults) -> tuple[Option, ...]:
    return tuple(attrs.evolve(o, default=defaults[o.name]) if o.name in defaults else o for o in options)


#: Dr. GRPO: no std scaling, constant normaliser.
DR_GRPO_OPTIONS = _with_defaults(GRPO_OPTIONS, loss_normalisation="constant", scale_rewards=False)


def defaults_of(options: tuple[Option, ...]) -> dict:
    """``{name: default}`` of declared options."""
    return {option.name: option.default for option in options}
