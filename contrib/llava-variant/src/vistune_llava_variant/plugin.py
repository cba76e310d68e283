"""Registers the ``llava-deep-features`` model type, built on the llava plugin.

Only specs here: the loader is referenced by string, so discovery imports no torch.
"""

from vistune import hookimpl
from vistune.specs import ModelType
from vistune_llava.plugin import LANGUAGE_MODEL, PROJECTOR, VISION_TOWER


@hookimpl
def vistune_register_models(register):
    register(
        ModelType(
            "llava-deep-features",
            loader="vistune_llava_variant.loading:load_llava_deep_features",
            # Same number of image tokens and the same chat format as Llava-1.5.
            default_template="llava-1.5",
            # No architectures / hf_model_types: the checkpoints are ordinary Llava ones, so this type is
            # chosen explicitly (model_type: llava-deep-features) or from the run file vistune saves.
            vision_tower=VISION_TOWER,
            projector=PROJECTOR,
            language_model=LANGUAGE_MODEL,
            supports_packing=True,
            supports_multi_image=True,
            description="Llava whose projector sees the vision tower's last layer too (features of two layers)",
        )
    )
