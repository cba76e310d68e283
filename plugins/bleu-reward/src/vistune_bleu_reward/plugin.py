"""vistune hooks of the BLEU reward plugin: the ``bleu`` reward, its code referenced by string."""

from vistune import hookimpl
from vistune.specs import Reward
from vistune_bleu_reward.bleu import OPTIONS


@hookimpl
def vistune_register_rewards(register):
    register(Reward("bleu", factory="vistune_bleu_reward.bleu:make_bleu", options=OPTIONS,
                    description="sentence BLEU (nltk) of the completion against the record's reference, "
                    "references, caption or answer column"))  # fmt: skip
