"""DAPO's options, declared on its spec (set as ``dapo: {...}`` or ``algorithm_options``).

Kept apart from :mod:`vistune_dapo.algorithm` so that registering the spec stays light.
"""

from vistune.specs import Option

DAPO_OPTIONS = (
    Option("dynamic_sampling", "bool", True, "drop groups whose rewards are all equal and sample more prompts"),
    # verl's max_num_gen_batches
    Option("max_sampling_rounds", "int", 10, "sampling rounds per batch, the first included", minimum=1),
    Option("overlong_shaping", "bool", True, "add the soft overlong punishment to each completion's reward"),
    # the paper's buffer is 4096 of 20480 tokens
    Option("overlong_buffer", "int", None, "L_cache in tokens (default: 20% of max_completion_length)", minimum=1),
    Option("overlong_penalty", "float", 1.0, "factor of the overlong punishment", minimum=0),
    Option("std_epsilon", "float", 1e-4, "added to the group's standard deviation", minimum=0),
    Option("num_iterations", "int", 1, "optimizer steps per rollout batch", minimum=1),
)
