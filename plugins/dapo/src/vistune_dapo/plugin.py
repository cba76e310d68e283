"""vistune hooks of the DAPO plugin: one algorithm spec, its code referenced by string."""

from vistune import hookimpl
from vistune.specs import Algorithm
from vistune_dapo.options import DAPO_OPTIONS


@hookimpl
def vistune_register_algorithms(register):
    # The paper's clip-higher ranges, and no KL term (DAPO drops it).
    register(Algorithm("dapo", factory="vistune_dapo.algorithm:DAPO", options=DAPO_OPTIONS,
                       defaults={"epsilon": 0.2, "epsilon_high": 0.28, "beta": 0.0},
                       description="DAPO (Yu et al. 2025): clip-higher, dynamic sampling, token-level loss, "
                       "overlong reward shaping"))  # fmt: skip
