"""vistune hooks of the Qwen-VL plugin: two model types, their checkpoint aliases and one template.

Only specs live here; the loaders, the encoder and the position helper are referenced
by string and imported when a run needs them.
"""

from vistune import hookimpl
from vistune.specs import ModelAlias, ModelType, Template

#: Reference to :func:`vistune_qwen_vl.positions.mrope_position_ids` for code that packs
#: several samples into one row: ``vistune.specs.load_ref(MROPE_POSITION_IDS)``.
MROPE_POSITION_IDS = "vistune_qwen_vl.positions:mrope_position_ids"

# In transformers 5 both families nest the vision encoder under ``model.visual`` with the
# patch merger (the projector into the language model's width) inside it.  The vision
# tower is named by its own submodules so that it and the projector do not overlap.
_VISION_TOWER = ("model.visual.patch_embed", "model.visual.blocks")
_PROJECTOR = ("model.visual.merger",)
_LANGUAGE_MODEL = ("model.language_model", "lm_head")

_ALIASES = (
    ("qwen2-vl-2b-instruct", "qwen2-vl", "Qwen/Qwen2-VL-2B-Instruct"),
    ("qwen2-vl-7b-instruct", "qwen2-vl", "Qwen/Qwen2-VL-7B-Instruct"),
    ("qwen2.5-vl-3b-instruct", "qwen2.5-vl", "Qwen/Qwen2.5-VL-3B-Instruct"),
    ("qwen2.5-vl-7b-instruct", "qwen2.5-vl", "Qwen/Qwen2.5-VL-7B-Instruct"),
)


@hookimpl
def vistune_register_models(register):
    common = {
        "default_template": "qwen2-vl",
        "vision_tower": _VISION_TOWER,
        "projector": _PROJECTOR,
        "language_model": _LANGUAGE_MODEL,
        "supports_packing": True,
        "supports_multi_image": True,
    }
    register(ModelType("qwen2-vl", loader="vistune_qwen_vl.loading:load_qwen2_vl",
                       architectures=("Qwen2VLForConditionalGeneration",), hf_model_types=("qwen2_vl",),
                       description="Qwen2-VL (Qwen2VLForConditionalGeneration), any image size, several images", **common))  # fmt: skip
    register(ModelType("qwen2.5-vl", loader="vistune_qwen_vl.loading:load_qwen2_5_vl",
                       architectures=("Qwen2_5_VLForConditionalGeneration",), hf_model_types=("qwen2_5_vl",),
                       description="Qwen2.5-VL (Qwen2_5_VLForConditionalGeneration), windowed-attention vision encoder",
                       **common))  # fmt: skip
    for name, model_type, repo in _ALIASES:
        register(ModelAlias(name, model_type, repo, description=f"{repo} (local copy, else downloaded from the Hub)"))


@hookimpl
def vistune_register_templates(register):
    register(
        Template(
            "qwen2-vl",
            factory="vistune_qwen_vl.template:QwenVLEncoder",
            description="Qwen2-VL / Qwen2.5-VL ChatML with <|vision_start|><|image_pad|>...<|vision_end|> images",
        )
    )
