"""Building a Qwen-VL processor from a checkpoint directory, without a video processor.

``AutoProcessor`` wants the Qwen video processor, which needs torchvision; vistune
trains on images only, so the processor is built from the image processor, the
tokenizer and the chat template.  The image-only classes keep the name of the real
processors, so a directory they save records ``processor_class: Qwen2VLProcessor`` (or
``Qwen2_5_VLProcessor``) and loads with plain ``AutoProcessor`` wherever torchvision is
installed.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLProcessor
from vistune import hub_chat_templates
from vistune.errors import ConfigError


def _image_only(base: type, qualname: str) -> type:
    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        base.__init__(self, image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    # ProcessorMixin learns a processor's parts from its __init__ signature: this one names no video_processor.
    # __name__ stays the real one (it is what save_pretrained records); __qualname__ lets pickle find this class.
    namespace = {"__init__": __init__, "__module__": __name__, "__qualname__": qualname,
                 "__doc__": f"{base.__name__} for images only (no video processor, so no torchvision)."}  # fmt: skip
    return type(base.__name__, (base,), namespace)


ImageOnlyQwen2VLProcessor = _image_only(Qwen2VLProcessor, "ImageOnlyQwen2VLProcessor")
ImageOnlyQwen2_5_VLProcessor = _image_only(Qwen2_5_VLProcessor, "ImageOnlyQwen2_5_VLProcessor")

PROCESSOR_CLASSES = {"qwen2-vl": ImageOnlyQwen2VLProcessor, "qwen2.5-vl": ImageOnlyQwen2_5_VLProcessor}


def _directory_chat_template(directory: Path) -> str | None:
    """The processor chat template a checkpoint directory carries (transformers 5 or the older JSON file)."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    legacy = directory / "chat_template.json"
    if legacy.is_file():
        template = json.loads(legacy.read_text()).get("chat_template")
        if isinstance(template, str):
            return template
    return None


def build_processor(kind: str, image_processor: Any, tokenizer: Any, chat_template: str | None = None) -> Any:
    """An image-only ``kind`` processor from its parts; the chat template defaults to Qwen's."""
    template = chat_template or getattr(tokenizer, "chat_template", None) or hub_chat_templates.QWEN2_VL
    return PROCESSOR_CLASSES[kind](image_processor, tokenizer, chat_template=template)


def load_processor(kind: str, path: str | Path, *, trust_remote_code: bool = False) -> Any:
    """The image-only processor of the Qwen-VL checkpoint in ``path``.

    Reads what transformers 5 writes (``processor_config.json`` with the image
    processor inside) and what hub checkpoints hold (``preprocessor_config.json``,
    ``chat_template.json``); if the processor's own ``from_pretrained`` cannot read the
    directory, the parts are loaded one by one.
    """
    if kind not in PROCESSOR_CLASSES:
        raise ValueError(f"unknown Qwen-VL kind {kind!r}; choose one of {', '.join(PROCESSOR_CLASSES)}")
    directory = Path(path)
    try:
        processor = PROCESSOR_CLASSES[kind].from_pretrained(str(directory), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, TypeError, KeyError):
        try:
            image_processor = AutoImageProcessor.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
            tokenizer = AutoTokenizer.from_pretrained(str(directory), trust_remote_code=trust_remote_code)
        except OSError as exc:
            raise ConfigError(
                f"{directory}: cannot load the Qwen-VL image processor and tokenizer: {exc}",
                hint="the directory needs preprocessor_config.json (or processor_config.json) and the tokenizer files",
            ) from exc
        processor = build_processor(kind, image_processor, tokenizer, _directory_chat_template(directory))
    if not processor.chat_template:
        processor.chat_template = getattr(processor.tokenizer, "chat_template", None) or hub_chat_templates.QWEN2_VL
    return processor
