"""The preference algorithms' options, declared on their specs (set as ``dpo: {...}`` or ``algorithm_options``).

Kept apart from :mod:`vistune_dpo.objectives` so that registering the specs stays light.
"""

from vistune.specs import Option

_PRECOMPUTE = Option("precompute_ref_log_probs", "bool", False,
                     "compute the reference log-probabilities of every pair once, before training")  # fmt: skip
_SMOOTHING = Option("label_smoothing", "float", 0.0, "probability that a preference label is flipped (cDPO), below 0.5",
                    minimum=0.0, maximum=0.5)  # fmt: skip

OPTIONS = {
    "dpo": (
        _SMOOTHING,
        Option("rpo_alpha", "float", 0.0, "weight of RPO's NLL term on the chosen answer (0: plain DPO)", minimum=0.0),
        _PRECOMPUTE,
    ),
    "orpo": (),
    "simpo": (
        Option("gamma", "float", 1.0, "target reward margin"),
        _SMOOTHING,
        Option("cpo_alpha", "float", 0.0, "weight of an NLL term on the chosen answer (CPO's; 0: plain SimPO)",
               minimum=0.0),
    ),
    "kto": (
        Option("desirable_weight", "float", 1.0, "weight of the desirable answers' losses", minimum=0.0),
        Option("undesirable_weight", "float", 1.0, "weight of the undesirable answers' losses", minimum=0.0),
    ),
}
