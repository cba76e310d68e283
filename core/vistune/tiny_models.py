"""Tiny, deterministic, offline Hugging Face checkpoints for tests and demos.

Every checkpoint has random weights drawn from a fixed seed and the same shapes as the real model
family (Llama, Llava-1.5, Llava-NeXT, Qwen2-VL, Qwen2.5-VL), only a few thousand times smaller.
They are written with ``save_pretrained`` so plain ``transformers`` loads them with
``from_pretrained``; nothing is downloaded. The chat templates are the real ones of the hub models
they stand in for, so prompt formatting is exercised exactly as with the full-size checkpoints.

torch, transformers and tokenizers are imported inside the functions: importing this module must
stay cheap (it is reached from plugin discovery and the CLI).
"""

from __future__ import annotations

import functools
import os
import shutil
import tempfile
from pathlib import Path

from vistune import hub_chat_templates

KINDS = ("llama", "llava", "llava-next", "qwen2-vl", "qwen2.5-vl")

#: Bump when the files a build writes change, so caches built by an older version are not reused.
FORMAT_VERSION = "v1"

SEED = 0

# -- chat templates ---------------------------------------------------------------------------------

CHAT_TEMPLATES = {
    "llama": hub_chat_templates.CHATML,
    "llava": hub_chat_templates.LLAVA_1_5,
    "llava-next": hub_chat_templates.LLAVA_NEXT_MISTRAL,
    "qwen2-vl": hub_chat_templates.QWEN2_VL,
    "qwen2.5-vl": hub_chat_templates.QWEN2_VL,
}

# -- tokenizer --------------------------------------------------------------------------------------

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
#: Markup tokens of the chat templates above; each must encode to one id, never split by BPE.
EXTRA_TOKENS = ("<image>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                "<|video_pad|>")  # fmt: skip
VOCAB_SIZE = 1000

COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "black", "white", "pink", "grey")
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "line")
SIZES = ("small", "large", "tiny", "big")
PLACES = ("left", "right", "top", "bottom", "centre", "middle")
#: General words, so captions and answers beyond the shapes demo tokenize into a handful of ids.
WORDS = tuple(
    "image picture photo shows showing contains above below between inside outside near far corner edge "
    "background foreground object objects colour color shape count number answer question describe detail "
    "bright dark light heavy round sharp smooth striped dotted empty full first second third last one two three "
    "four five six seven eight nine ten dog cat bird car tree house person table chair cup ball book window door "
    "sky water grass road street city field flower apple banana box bottle phone screen text sign written says "
    "look looks looking see sees seen find found there here this that these those what which where when who why "
    "how is are was were be been has have had do does did can could would should will may might must not and or "
    "but with without from into onto over under after before during because while until about against along "
    "around behind beside beyond at on in of to by for it its i you we they he she my your our their "
    "yes no true false good bad best more less most many few some all none every each other same different".split()
)


def _corpus() -> list[str]:
    """A few hundred sentences in the vocabulary of the shapes demo: captions, questions, answers, chat markup.

    Generated in a fixed order, so the trained merges (and token ids) are the same on every machine.
    """
    lines = []
    for i, colour in enumerate(COLOURS):
        for j, shape in enumerate(SHAPES):
            size = SIZES[(i + j) % len(SIZES)]
            place = PLACES[(i * 3 + j) % len(PLACES)]
            other = COLOURS[(i + j + 1) % len(COLOURS)]
            lines += [
                f"a {colour} {shape}",
                f"A {size} {colour} {shape} on the {place}.",
                f"There is a {colour} {shape} next to a {other} {SHAPES[(j + 3) % len(SHAPES)]}.",
                f"Q: What colour is the {shape}? A: It is {colour}.",
                f"Question: what shape is {colour}?\nAnswer: a {shape}",
                f"USER: <image>\nDescribe the image. ASSISTANT: a {colour} {shape} on a {other} background",
            ]
    for n in range(1, 11):
        lines.append(f"How many shapes are there? There are {n} shapes. Yes, no, maybe {n * 7} {n * 13}!")
    for k, word in enumerate(WORDS):
        # Pair every extra word with a few neighbours, so BPE learns whole-word merges for them.
        lines.append(f"The {word} {WORDS[(k + 5) % len(WORDS)]} was {WORDS[(k * 7 + 3) % len(WORDS)]} today.")
    lines += [
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nhello<|im_end|>\n",
        "[INST] <image>\nWhat is shown in this image? [/INST] a shape</s>",
        "The quick brown fox jumps over the lazy dog, 0123456789 (){}[]<>/\\|#%&*+-=_~'\"`;:,.?!@$^",
    ]
    return lines


def build_tokenizer(path=None):
    """A byte-level BPE tokenizer (~1000 ids) trained on :func:`_corpus`, saved into ``path`` when given.

    Byte-level so any text round-trips (newlines included, which the chat templates need).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE(unk_token=None))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = [PAD, BOS, EOS, UNK, *EXTRA_TOKENS]
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer=trainer)
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token=PAD,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        # transformers 5 silently drops additional_special_tokens=; extra_special_tokens= is kept.
        extra_special_tokens=list(EXTRA_TOKENS),
        padding_side="left",  # decoder-only generation pads on the left
    )
    if path is not None:
        wrapped.save_pretrained(path)
    return wrapped


# -- model configs ----------------------------------------------------------------------------------

IMAGE_SIZE = 32  # CLIP input side: 4x4 patches of 8 pixels
PATCH_SIZE = 8


def _text_config_kwargs(tokenizer) -> dict:
    """The language model's shape, shared by every kind.

    head_dim = 64 / 2 = 32: vLLM's CPU attention rejects head dims below 32, and the same checkpoints are
    served there.
    """
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,  # grouped-query attention, as in the real models
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )


def _llama_config(tokenizer):
    from transformers import LlamaConfig

    return LlamaConfig(**_text_config_kwargs(tokenizer))


def _clip_vision_config():
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            image_size=IMAGE_SIZE, patch_size=PATCH_SIZE, projection_dim=32)  # fmt: skip


def _llava_config_kwargs(tokenizer) -> dict:
    """The fields Llava-1.5 and Llava-NeXT share: a CLIP tower and a Llama language model."""
    return dict(
        vision_config=_clip_vision_config(),
        text_config=_llama_config(tokenizer),
        image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
        image_seq_length=(IMAGE_SIZE // PATCH_SIZE) ** 2,
        vision_feature_select_strategy="default",  # drop CLS, as llava-1.5 does
        vision_feature_layer=-2,
    )


def _llava_config(tokenizer):
    from transformers import LlavaConfig

    return LlavaConfig(**_llava_config_kwargs(tokenizer))


#: Llava-NeXT's "anyres" tiling: an image is resized to the best of these (height, width) and cut into
#: 32x32 tiles, each encoded like a Llava image, plus one downscaled overview.
GRID_PINPOINTS = [[32, 32], [32, 64], [64, 32], [64, 64]]


def _llava_next_config(tokenizer):
    from transformers import LlavaNextConfig

    return LlavaNextConfig(**_llava_config_kwargs(tokenizer), image_grid_pinpoints=GRID_PINPOINTS)


# mrope splits each head's 16 rotary frequency pairs between time, height and width, 2:3:3 as in the
# real Qwen2-VL ([16, 24, 24] for head_dim 128); the sections must sum to head_dim / 2.
MROPE_SECTION = [4, 6, 6]


def _qwen_text_config_kwargs(tokenizer) -> dict:
    return dict(
        _text_config_kwargs(tokenizer),
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": MROPE_SECTION},
    )


def _qwen_token_ids(tokenizer) -> dict:
    ids = tokenizer.convert_tokens_to_ids
    return dict(
        image_token_id=ids("<|image_pad|>"),
        video_token_id=ids("<|video_pad|>"),
        vision_start_token_id=ids("<|vision_start|>"),
        vision_end_token_id=ids("<|vision_end|>"),
    )


def _qwen2_vl_config(tokenizer):
    from transformers import Qwen2VLConfig

    # One vision head of 32 dims (head_dim >= 32 everywhere); hidden_size is the merger's output, which
    # must match the language model's width.
    vision = dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=1, patch_size=PATCH_SIZE,
                  spatial_merge_size=2, temporal_patch_size=2)  # fmt: skip
    return Qwen2VLConfig(text_config=_qwen_text_config_kwargs(tokenizer), vision_config=vision,
                         **_qwen_token_ids(tokenizer))  # fmt: skip


def _qwen2_5_vl_config(tokenizer):
    from transformers import Qwen2_5_VLConfig

    # window_size is in pixels: 32 px = 2x2 merged tokens per window. Block 0 attends within windows,
    # block 1 over the whole image, so both of Qwen2.5-VL's attention paths run.
    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=1, out_hidden_size=64,
                  patch_size=PATCH_SIZE, spatial_merge_size=2, temporal_patch_size=2, window_size=32,
                  fullatt_block_indexes=[1])  # fmt: skip
    return Qwen2_5_VLConfig(text_config=_qwen_text_config_kwargs(tokenizer), vision_config=vision,
                            **_qwen_token_ids(tokenizer))  # fmt: skip


# -- processors -------------------------------------------------------------------------------------

# Qwen's image processor resizes each image so both sides are multiples of patch * merge = 16 px and
# its area lies in [min, max]: a 32x32 image becomes 2x2 merged tokens, a 64x64 one 4x4.
QWEN_MIN_PIXELS = 32 * 32
QWEN_MAX_PIXELS = 64 * 64


def _clip_image_processor_kwargs() -> dict:
    return dict(size={"shortest_edge": IMAGE_SIZE}, crop_size={"height": IMAGE_SIZE, "width": IMAGE_SIZE})


def _llava_processor_kwargs(tokenizer) -> dict:
    # (32 / 8)^2 patches + 1 CLS - 1 CLS dropped by the "default" strategy = 16 <image> tokens per image
    # (per tile for Llava-NeXT).
    return dict(tokenizer=tokenizer, patch_size=PATCH_SIZE, vision_feature_select_strategy="default",
                num_additional_image_tokens=1)  # fmt: skip


def _llava_processor(tokenizer):
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    return LlavaProcessor(image_processor=CLIPImageProcessorPil(**_clip_image_processor_kwargs()),
                          chat_template=CHAT_TEMPLATES["llava"], **_llava_processor_kwargs(tokenizer))  # fmt: skip


def _llava_next_processor(tokenizer):
    from transformers import LlavaNextImageProcessorPil, LlavaNextProcessor

    image_processor = LlavaNextImageProcessorPil(image_grid_pinpoints=GRID_PINPOINTS, **_clip_image_processor_kwargs())
    return LlavaNextProcessor(image_processor=image_processor, chat_template=CHAT_TEMPLATES["llava-next"],
                              **_llava_processor_kwargs(tokenizer))  # fmt: skip


def _qwen_image_processor():
    from transformers import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(min_pixels=QWEN_MIN_PIXELS, max_pixels=QWEN_MAX_PIXELS, patch_size=PATCH_SIZE,
                                    merge_size=2, temporal_patch_size=2)  # fmt: skip


@functools.cache
def _image_only(processor_class):
    """``processor_class`` with no video processor: the Qwen processors require one, and the video
    processors need torchvision (not installable next to the CPU torch). Images need none.

    The subclass keeps the parent's name, so the saved ``processor_class`` stays the real one and
    ``AutoProcessor`` on a machine with torchvision loads the directory like a hub checkpoint.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        processor_class.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def __reduce__(self):
        # pickle finds classes by name, and this name leads to the parent: rebuild from the parts instead
        # (datasets.map and DataLoader workers pickle the processor).
        return _image_only_processor, (processor_class, self.image_processor, self.tokenizer, self.chat_template)

    # ProcessorMixin learns a processor's parts from its __init__ signature: this one names no video_processor.
    namespace = {"__init__": __init__, "__reduce__": __reduce__, "__module__": processor_class.__module__,
                 "__doc__": processor_class.__doc__}  # fmt: skip
    return type(processor_class.__name__, (processor_class,), namespace)


def _image_only_processor(processor_class, image_processor, tokenizer, chat_template):
    return _image_only(processor_class)(image_processor, tokenizer, chat_template=chat_template)


def _qwen_processor(kind: str, image_processor, tokenizer):
    if kind == "qwen2-vl":
        from transformers import Qwen2VLProcessor as processor_class
    else:
        from transformers import Qwen2_5_VLProcessor as processor_class
    return _image_only_processor(processor_class, image_processor, tokenizer, CHAT_TEMPLATES[kind])


def _processor(kind: str, tokenizer):
    if kind == "llava":
        return _llava_processor(tokenizer)
    if kind == "llava-next":
        return _llava_next_processor(tokenizer)
    return _qwen_processor(kind, _qwen_image_processor(), tokenizer)


def load_tiny_processor(kind: str, path):
    """The processor (tokenizer for ``llama``) of a directory written by :func:`build_tiny_model`."""
    _check_kind(kind)
    if kind == "llama":
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(path)
    if kind in ("llava", "llava-next"):
        from transformers import AutoProcessor

        return AutoProcessor.from_pretrained(path)
    from transformers import AutoImageProcessor, AutoTokenizer

    return _qwen_processor(kind, AutoImageProcessor.from_pretrained(path), AutoTokenizer.from_pretrained(path))


# -- building ---------------------------------------------------------------------------------------

_CONFIGS = {
    "llama": _llama_config,
    "llava": _llava_config,
    "llava-next": _llava_next_config,
    "qwen2-vl": _qwen2_vl_config,
    "qwen2.5-vl": _qwen2_5_vl_config,
}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown tiny model kind {kind!r}; choose one of {', '.join(KINDS)}")


def _stop_token_ids(kind: str, tokenizer) -> list[int]:
    """Where generation ends: </s>, and for the ChatML templates also <|im_end|>, as with the real models."""
    ids = [tokenizer.eos_token_id]
    if kind in ("llama", "qwen2-vl", "qwen2.5-vl"):
        ids.append(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return ids


def _model(kind: str, tokenizer):
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    config = _CONFIGS[kind](tokenizer)
    # Weights come from torch's global generator: seed it, and restore it after so callers' own random
    # streams are not disturbed by a build.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(SEED)
        auto_class = AutoModelForCausalLM if kind == "llama" else AutoModelForImageTextToText
        model = auto_class.from_config(config)
    generation = model.generation_config
    generation.bos_token_id = tokenizer.bos_token_id
    generation.pad_token_id = tokenizer.pad_token_id
    generation.eos_token_id = _stop_token_ids(kind, tokenizer)
    return model


def build_tiny_model(kind: str, path) -> Path:
    """Write a tiny ``kind`` checkpoint (model, tokenizer, processor, chat template) into ``path``."""
    _check_kind(kind)
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer()
    if kind == "llama":
        tokenizer.chat_template = CHAT_TEMPLATES["llama"]
        tokenizer.save_pretrained(path)
    else:
        _processor(kind, tokenizer).save_pretrained(path)
    _model(kind, tokenizer).save_pretrained(path)
    return path


def _cache_root(cache_dir=None) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    from vistune.data.locate import cache_dir as default_cache_dir  # $VISTUNE_CACHE_DIR or ~/.cache/vistune

    return default_cache_dir()


def tiny_model_path(kind: str, cache_dir=None) -> Path:
    """The directory of a tiny ``kind`` checkpoint, built on first use and then reused.

    Lives under ``cache_dir``, else ``$VISTUNE_CACHE_DIR``, else ``~/.cache/vistune``. The build goes to a
    temporary directory next to the final one and is renamed into place at the end, so a crash or a
    concurrent build never leaves a half-written checkpoint where readers look.
    """
    _check_kind(kind)
    final = _cache_root(cache_dir) / "tiny-models" / FORMAT_VERSION / kind
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{kind}.", suffix=".partial", dir=final.parent))
    try:
        build_tiny_model(kind, staging)
        try:
            os.replace(staging, final)
        except OSError:
            # Another process finished the same build first (its directory is not empty): use that one.
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final
