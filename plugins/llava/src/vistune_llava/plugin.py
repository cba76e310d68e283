"""vistune hooks of the Llava plugin: two model types, checkpoint aliases, three templates, one dataset.

Only specs live here; loaders and encoders are referenced by string and imported when
a run needs them, so plugin discovery never imports torch or transformers.
"""

from vistune import hookimpl
from vistune.specs import Dataset, ModelAlias, ModelType, Template

# Module names as ``named_modules()`` shows them for both classes in transformers 5: the
# CLIP tower and the two-layer MLP projector sit under ``model``, next to the language
# model; the output layer is outside it.  Llava-NeXT's learned ``model.image_newline``
# is a bare parameter, not a module, so no prefix can name it.
VISION_TOWER = ("model.vision_tower",)
PROJECTOR = ("model.multi_modal_projector",)
LANGUAGE_MODEL = ("model.language_model", "lm_head")

_ALIASES = (
    ("llava-v1.5-7b", "llava", "llava-hf/llava-1.5-7b-hf", "Llava-1.5 7B (Vicuna-7B, CLIP ViT-L/14-336)"),
    ("llava-v1.5-13b", "llava", "llava-hf/llava-1.5-13b-hf", "Llava-1.5 13B (Vicuna-13B, CLIP ViT-L/14-336)"),
    ("llava-v1.6-mistral-7b", "llava-next", "llava-hf/llava-v1.6-mistral-7b-hf",
     "Llava-NeXT 7B (Mistral-7B-Instruct, [INST] chat format)"),
    ("llava-v1.6-vicuna-7b", "llava-next", "llava-hf/llava-v1.6-vicuna-7b-hf",
     "Llava-NeXT 7B (Vicuna-7B, USER:/ASSISTANT: chat format)"),
)  # fmt: skip


@hookimpl
def vistune_register_models(register):
    common = {
        "vision_tower": VISION_TOWER,
        "projector": PROJECTOR,
        "language_model": LANGUAGE_MODEL,
        "supports_packing": True,
        "supports_multi_image": True,
    }
    register(
        ModelType(
            "llava",
            loader="vistune_llava.loading:load_llava",
            default_template="llava-1.5",
            architectures=("LlavaForConditionalGeneration",),
            hf_model_types=("llava",),
            description="Llava-1.5 (LlavaForConditionalGeneration): CLIP tower, MLP projector, Llama/Vicuna LM",
            **common,
        )
    )
    register(
        ModelType(
            "llava-next",
            loader="vistune_llava.loading:load_llava_next",
            # NeXT checkpoints come with different chat formats (Mistral [INST], Vicuna, ChatML):
            # the one saved with the checkpoint is the right one.
            default_template="llava-checkpoint",
            architectures=("LlavaNextForConditionalGeneration",),
            hf_model_types=("llava_next",),
            description="Llava-NeXT / 1.6 (LlavaNextForConditionalGeneration): any-resolution image tiling",
            **common,
        )
    )
    for name, model_type, repo, what in _ALIASES:
        register(ModelAlias(name, model_type, repo, description=f"{what}; {repo} (local copy, else downloaded from the Hub)"))


@hookimpl
def vistune_register_templates(register):
    register(
        Template(
            "llava-1.5",
            factory="vistune_llava.encoder:llava_1_5_encoder",
            description="Vicuna 'USER: <image>\\n... ASSISTANT: ...' as llava-hf/llava-1.5-7b-hf's chat template "
            "renders it, with </s> after each answer (as LLaVA was trained)",
        )
    )
    register(
        Template(
            "llava-next",
            factory="vistune_llava.encoder:llava_next_encoder",
            description="Mistral '[INST] <image>\\n... [/INST] ...</s>' as llava-hf/llava-v1.6-mistral-7b-hf's chat "
            "template renders it",
        )
    )
    register(
        Template(
            "llava-checkpoint",
            factory="vistune_llava.encoder:checkpoint_encoder",
            description="the chat template saved with the Llava / Llava-NeXT checkpoint; </s> is added after "
            "answers where the template writes none",
        )
    )


@hookimpl
def vistune_register_datasets(register):
    register(
        Dataset(
            "llava-instruct-en",
            format="llava-instruct",
            data_file="llava_instruct_150k.json",
            image_dir="coco/train2017",
            hf_repo_id="liuhaotian/LLaVA-Instruct-150K",
            description="LLaVA-Instruct-150K (English visual instructions on COCO train2017 images); put "
            "llava_instruct_150k.json and coco/train2017/*.jpg in one directory (plugins/llava/README.md)",
        )
    )
