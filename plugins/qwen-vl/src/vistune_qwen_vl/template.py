"""The ``qwen2-vl`` template: Qwen's ChatML with images, encoded by the Hugging Face processor.

The checkpoint's own chat template renders the conversation (each ``<image>`` tag
becomes ``<|vision_start|><|image_pad|><|vision_end|>``), and the processor resizes the
images into patches and expands each ``<|image_pad|>`` into ``grid_thw.prod() //
merge_size**2`` copies, exactly as ``processor.apply_chat_template(..., tokenize=True)``
does.  Labels come from :mod:`vistune.chat_template`: assistant answers and their
``<|im_end|>``, never an image token.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vistune import hub_chat_templates
from vistune.chat_template import (
    answer_spans,
    labels_from_spans,
    template_error,
    tokenize_with_offsets,
    validate_messages,
    within_length,
)
from vistune.errors import ConfigError, DataError
from vistune.templates import IGNORE_INDEX, IMAGE_TAG, Sample, TemplateOptions


def conversation_content(text: str) -> list[dict[str, str]]:
    """A message's text with ``<image>`` tags as Hugging Face content parts (``{"type": "image"}``)."""
    parts: list[dict[str, str]] = []
    for i, piece in enumerate(text.split(IMAGE_TAG)):
        if i:
            parts.append({"type": "image"})
        if piece:
            parts.append({"type": "text", "text": piece})
    return parts


def load_image(image: Any, source: str) -> Any:
    """A PIL image from a PIL image or a path (relative paths are relative to the working directory)."""
    from PIL import Image

    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, Path)):
        try:
            with Image.open(image) as opened:
                opened.load()
                return opened.copy()
        except (OSError, ValueError) as exc:
            raise DataError(f"{source or 'a sample'}: cannot read image {str(image)!r}: {exc}") from exc
    raise DataError(f"{source or 'a sample'}: an image must be a PIL image or a file path, got {type(image).__name__}")


class QwenVLEncoder:
    """:class:`vistune.templates.Encoder` for Qwen2-VL and Qwen2.5-VL.

    ``encode`` returns ``input_ids``, ``labels`` and ``mm_token_type_ids`` (lists of
    ``L`` ints; the last marks image tokens with 1, which transformers 5's Qwen-VL
    models need to place the 3D positions), plus, for samples with images,
    ``pixel_values`` (float tensor ``(patches, channels * temporal_patch * patch**2)``)
    and ``image_grid_thw`` (long tensor ``(n_images, 3)``).

    :param processor: a Qwen2-VL / Qwen2.5-VL processor (``image_processor`` + ``tokenizer``).
    :param options: ``max_length`` and ``truncation``.  A sample is never cut: one longer
        than ``max_length`` raises :class:`DataError` or is dropped whole, so image tokens
        are never separated from their pixels.
    """

    def __init__(self, processor: Any, options: TemplateOptions | None = None):
        if getattr(processor, "image_processor", None) is None or getattr(processor, "tokenizer", None) is None:
            raise ConfigError(
                f"the qwen2-vl template needs a Qwen-VL processor (image processor + tokenizer), got {type(processor).__name__}",
                hint="load the model with the qwen2-vl or qwen2.5-vl model type",
            )
        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.options = options or TemplateOptions()
        self.template = (
            processor.chat_template or getattr(self.tokenizer, "chat_template", None) or hub_chat_templates.QWEN2_VL
        )
        self.image_token_id = processor.image_token_id
        self.merge_size = processor.image_processor.merge_size

    # -- conversation -----------------------------------------------------------------

    def _conversation(self, sample: Sample, *, need_answer: bool) -> tuple[list[dict[str, Any]], list[Any]]:
        messages = validate_messages(sample, need_answer=need_answer)
        images = list(sample.images or [])
        tags = sum(m["content"].count(IMAGE_TAG) for m in messages)
        if tags != len(images):
            raise DataError(f"{sample.source or 'a sample'}: {tags} {IMAGE_TAG} tag(s) but {len(images)} image(s)",
                            hint=f"put one {IMAGE_TAG} tag in the text where each image goes")  # fmt: skip
        for i, message in enumerate(messages):
            if message["role"] == "assistant" and IMAGE_TAG in message["content"]:
                raise DataError(f"{sample.source or 'a sample'}: message {i} is an assistant answer with an {IMAGE_TAG} "
                                "tag; images can only be given in system or user messages")  # fmt: skip
        conversation = [{"role": m["role"], "content": conversation_content(m["content"])} for m in messages]
        return conversation, [load_image(image, sample.source) for image in images]

    def _render(self, conversation: list, add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(
            conversation, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _add_special_tokens(self, text: str) -> bool:
        # As processor.apply_chat_template: no second BOS when the template already wrote one.
        bos = self.tokenizer.bos_token
        return not (bos is not None and text.startswith(bos))

    def _process(self, text: str, images: list[Any], source: str) -> Any:
        """The processor's encoding of one rendered conversation: token ids with images expanded, pixels, grids."""
        # A placeholder typed into the text would be taken for an image (or video) with no pixels behind it.
        expected = {self.processor.image_token: len(images), getattr(self.processor, "video_token", None): 0}
        for token, count in expected.items():
            found = text.count(token) if token else count
            if found != count:
                raise DataError(
                    f"{source or 'a sample'}: the rendered conversation holds {found} {token} placeholder(s) where "
                    f"{count} belong: the sample's text contains {token} itself",
                    hint=f"remove {token} from the dataset text; mark images with {IMAGE_TAG}",
                )
        try:
            return self.processor(text=[text], images=images or None, return_tensors="pt",
                                  add_special_tokens=self._add_special_tokens(text))  # fmt: skip
        except ValueError as exc:  # an image the image processor cannot handle
            raise DataError(f"{source or 'a sample'}: the processor rejected the sample: {exc}") from exc

    @staticmethod
    def _outputs(processed: Any, images: list[Any]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        if "mm_token_type_ids" in processed:
            out["mm_token_type_ids"] = processed["mm_token_type_ids"][0].tolist()
        if images:
            out["pixel_values"] = processed["pixel_values"]
            out["image_grid_thw"] = processed["image_grid_thw"]
        return out

    # -- Encoder ----------------------------------------------------------------------

    def encode(self, sample: Sample) -> dict[str, Any] | None:
        """Token ids, labels on assistant answers (+ ``<|im_end|>``), and the images' tensors."""
        conversation, images = self._conversation(sample, need_answer=True)
        text, spans = answer_spans(
            self.template, self._render, conversation, sample.source, self.tokenizer.special_tokens_map
        )
        processed = self._process(text, images, sample.source)
        input_ids = processed["input_ids"][0].tolist()
        if not within_length(len(input_ids), self.options, sample.source):
            return None

        # Labels are found on the text before image expansion (character offsets match it), then each
        # <|image_pad|> is repeated as often as the processor repeated it.  <|image_pad|> is a special token,
        # so the expansion cannot change how the text around it tokenizes.
        unexpanded, offsets = tokenize_with_offsets(self.tokenizer, text, self._add_special_tokens(text))
        unexpanded_labels = labels_from_spans(unexpanded, offsets, spans)
        per_image = []
        if images:
            per_image = (processed["image_grid_thw"].prod(-1) // self.merge_size**2).tolist()
        expanded, labels, image = [], [], 0
        for token, label in zip(unexpanded, unexpanded_labels):
            if token == self.image_token_id and image < len(per_image):
                expanded += [token] * per_image[image]
                labels += [IGNORE_INDEX] * per_image[image]
                image += 1
            else:
                expanded.append(token)
                labels.append(label)
        if expanded != input_ids:
            raise RuntimeError(
                f"{sample.source or 'a sample'}: the tokenizer and the processor disagree on the token ids of the "
                "same text; labels cannot be aligned"
            )
        return {"input_ids": input_ids, "labels": labels, **self._outputs(processed, images)}

    def encode_prompt(self, sample: Sample) -> dict[str, Any]:
        """The conversation followed by ``<|im_start|>assistant\\n``, with the images' tensors."""
        conversation, images = self._conversation(sample, need_answer=False)
        try:
            text = self._render(conversation, True)
        except Exception as exc:
            raise template_error(exc, sample.source) from exc
        processed = self._process(text, images, sample.source)
        return {"input_ids": processed["input_ids"][0].tolist(), **self._outputs(processed, images)}

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` without special tokens."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)
