"""vistune hooks of the GRPO plugin: four algorithm specs, their code referenced by string."""

from vistune import hookimpl
from vistune.specs import Algorithm
from vistune_grpo.options import DR_GRPO_OPTIONS, GRPO_OPTIONS


@hookimpl
def vistune_register_algorithms(register):
    register(Algorithm("grpo", factory="vistune_grpo.algorithms:GRPO", options=GRPO_OPTIONS,
                       description="GRPO (Shao et al. 2024): group-normalised advantages, clipped token ratio, "
                       "per-sequence mean loss, k3 KL"))  # fmt: skip
    register(Algorithm("dr-grpo", factory="vistune_grpo.algorithms:DrGRPO", options=DR_GRPO_OPTIONS,
                       description="Dr. GRPO (Liu et al. 2025): GRPO without std scaling or length normalisation"))  # fmt: skip
    # GSPO's paper clips the sequence ratio at 3e-4 / 4e-4: a length-normalised ratio moves far less than a token's.
    register(Algorithm("gspo", factory="vistune_grpo.algorithms:GSPO", options=GRPO_OPTIONS, defaults={"epsilon": 3e-4, "epsilon_high": 4e-4},
                       description="GSPO (Zheng et al. 2025): sequence-level importance ratio, clipped per sequence"))  # fmt: skip
    register(Algorithm("rloo", factory="vistune_grpo.algorithms:RLOO", options=GRPO_OPTIONS,
                       description="RLOO (Ahmadian et al. 2024): leave-one-out baseline, sequence-level "
                       "REINFORCE, KL as a reward penalty"))  # fmt: skip
