"""The Llava templates: conversations and images to ``input_ids``, ``labels`` and pixel tensors.

The conversation is rendered with a chat template through transformers' Jinja renderer,
and the checkpoint's own processor does the rest, exactly as
``processor.apply_chat_template(..., tokenize=True)`` would: it resizes the images
(Llava: one crop; Llava-NeXT: "anyres" tiles plus an overview) and repeats each
``<image>`` token as often as the model has features for that image (Llava: patches
minus the CLS token the "default" feature strategy drops; Llava-NeXT: per image size).

Labels: the tokens of each assistant answer and of the ``</s>`` that ends it, from the end
of the generation prompt (``ASSISTANT:``, `` [/INST]``) on, so a separating space the model
must generate is learned too; never an image token, a role marker, system or user text.
The Llava-1.5 hub template writes no ``</s>`` after answers, but LLaVA was trained with
one and generation stops on it, so the ``llava-1.5`` template appends it to every answer
(and to answers in the history of a prompt, so the model is prompted the way it was
trained).

A sample longer than ``max_length`` is never cut (cutting could separate image tokens
from their pixels): it raises :class:`DataError` or is dropped whole.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from typing import Any

from vistune import hub_chat_templates
from vistune.chat_template import (
    GENERATION_BLOCK,
    generation_spans,
    prefix_spans,
    template_error,
    validate_messages,
    within_length,
)
from vistune.data.readers import open_image
from vistune.errors import ConfigError, DataError
from vistune.templates import IGNORE_INDEX, IMAGE_TAG, Sample, TemplateOptions


Span = tuple[int, int]


def content_parts(text: str, *, keep_empty_text: bool) -> list[dict[str, str]]:
    """A message's text as Hugging Face content parts: one image part per ``<image>`` tag, then the text.

    The Llava templates render a turn's images before its text (each as ``<image>\\n``),
    whatever their place in the text, so this follows LLaVA's own preprocessing: the
    tags are removed and the remaining text is stripped.  Text without tags is kept as
    is.

    :param keep_empty_text: give an empty text part when there is no text (templates
        that read ``content[0]['text']`` need one).
    """
    images = text.count(IMAGE_TAG)
    if images:
        text = text.replace(IMAGE_TAG, "").strip()
    parts: list[dict[str, str]] = [{"type": "image"} for _ in range(images)]
    if text or (keep_empty_text and not images):
        parts.append({"type": "text", "text": text})
    return parts


class LlavaEncoder:
    """:class:`vistune.templates.Encoder` for Llava and Llava-NeXT checkpoints.

    ``encode`` returns ``input_ids`` and ``labels`` (lists of ``L`` ints) and, for
    samples with images, ``pixel_values`` (float tensor ``(n_images, 3, H, W)`` for
    Llava, ``(n_images, max_tiles, 3, H, W)`` for Llava-NeXT, tiles zero-padded to the
    sample's largest count) and, for Llava-NeXT, ``image_sizes`` (long tensor
    ``(n_images, 2)``: each image's original height and width).

    :param processor: the checkpoint's ``LlavaProcessor`` or ``LlavaNextProcessor``.
    :param options: ``max_length`` and ``truncation``.
    :param chat_template: Jinja template to render with; ``None`` uses the processor's own.
    :param eos_after_answers: append the tokenizer's end-of-sequence token to every
        assistant answer; ``None`` decides from the template: yes when its answers end
        with no special token (neither ``</s>`` nor an end-of-turn marker like ``<|im_end|>``).
    """

    def __init__(
        self,
        processor: Any,
        options: TemplateOptions | None = None,
        *,
        chat_template: str | None = None,
        eos_after_answers: bool | None = None,
    ):
        tokenizer = getattr(processor, "tokenizer", None)
        parts = (getattr(processor, "image_processor", None), tokenizer, getattr(processor, "image_token", None))
        if any(part is None for part in parts):
            raise ConfigError(
                f"the Llava templates need a Llava or Llava-NeXT processor (image processor + tokenizer), got "
                f"{type(processor).__name__}",
                hint="load the model with the llava or llava-next model type",
            )
        self.processor = processor
        self.tokenizer = tokenizer
        self.options = options or TemplateOptions()
        self.template = chat_template or self._checkpoint_template(processor)
        self.image_token_id = processor.image_token_id
        if eos_after_answers is None:
            eos_after_answers = self._answers_lack_eos()
        if eos_after_answers and not tokenizer.eos_token:
            raise ConfigError(
                f"the tokenizer {tokenizer.name_or_path!r} has no end-of-sequence token to end answers with"
            )
        self.eos_after_answers = eos_after_answers

    @staticmethod
    def _checkpoint_template(processor: Any) -> str:
        template = processor.chat_template or getattr(processor.tokenizer, "chat_template", None)
        if isinstance(template, dict):
            template = template.get("default")
        if not isinstance(template, str) or not template:
            raise ConfigError(
                "the checkpoint has no chat template (chat_template.json / chat_template.jinja)",
                hint="choose a template explicitly: template: llava-1.5 (Vicuna USER:/ASSISTANT:) or llava-next "
                "(Mistral [INST])",
            )
        return template

    def _answers_lack_eos(self) -> bool:
        """Whether the template ends answers with no special token (neither ``</s>`` nor an end-of-turn marker)."""
        probe = [{"role": "user", "content": [{"type": "text", "text": "hi"}]},
                 {"role": "assistant", "content": [{"type": "text", "text": "ok"}]}]  # fmt: skip
        text, spans = self._render_with_spans(probe, "the chat template")
        markers = [t for t in (self.tokenizer.eos_token, *self.tokenizer.all_special_tokens) if t]
        return not all(text[start:end].endswith(tuple(markers)) for start, end in spans)

    # -- conversation -----------------------------------------------------------------

    def _conversation(self, sample: Sample, *, need_answer: bool) -> tuple[list[dict[str, Any]], list[Any]]:
        where = sample.source or "a sample"
        messages = validate_messages(sample, need_answer=need_answer)
        images = list(sample.images or [])
        tags = sum(m["content"].count(IMAGE_TAG) for m in messages)
        if tags != len(images):
            raise DataError(f"{where}: {tags} {IMAGE_TAG} tag(s) but {len(images)} image(s)",
                            hint=f"put one {IMAGE_TAG} tag in the text where each image goes")  # fmt: skip
        conversation = []
        for i, message in enumerate(messages):
            content = message["content"]
            if message["role"] == "assistant":
                if IMAGE_TAG in content:
                    raise DataError(f"{where}: message {i} is an assistant answer with an {IMAGE_TAG} tag; images "
                                    "can only be given in system or user messages")  # fmt: skip
                if self.eos_after_answers:
                    content += self.tokenizer.eos_token
            conversation.append({"role": message["role"], "content": content_parts(content, keep_empty_text=True)})
        return conversation, [open_image(image, where=where) for image in images]

    def _render(self, conversation: list, add_generation_prompt: bool) -> str:
        return self.processor.apply_chat_template(
            conversation, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _render_with_spans(self, conversation: list, source: str) -> tuple[str, list[Span]]:
        """The rendered conversation and the character spans of its answers (trailing whitespace excluded).

        An answer is what follows the generation prompt, separator included (the model
        has to generate it), up to the end of its turn.  Templates that render a
        conversation's start differently from a shorter conversation fall back to their
        ``{% generation %}`` blocks.
        """
        try:
            try:
                text, spans = prefix_spans(self._render, conversation, source)
            except DataError:
                if not GENERATION_BLOCK.search(self.template):
                    raise
                text, spans = generation_spans(self.template, conversation, **self.tokenizer.special_tokens_map)
        except DataError:
            raise
        except Exception as exc:  # jinja2 errors and the template's own raise_exception
            raise template_error(exc, source) from exc
        # A template may write a separator inside the answer's block (Llava-1.5 writes a space); the
        # token that carries it also starts the next turn, which must not be learned.
        return text, [(start, start + len(text[start:end].rstrip())) for start, end in spans]

    def _process(self, text: str, images: list[Any], source: str, *, offsets: bool) -> Any:
        """The processor's encoding: token ids with every ``<image>`` expanded, and the image tensors."""
        bos = self.tokenizer.bos_token
        # As processor.apply_chat_template: no second BOS when the template already wrote one.
        add_special_tokens = not (bos is not None and text.startswith(bos))
        extra = {"return_offsets_mapping": True, "return_text_replacement_offsets": True} if offsets else {}
        try:
            return self.processor(text=[text], images=images or None, return_tensors="pt",
                                  add_special_tokens=add_special_tokens, **extra)  # fmt: skip
        except NotImplementedError as exc:
            raise ConfigError(
                f"{type(self.tokenizer).__name__} cannot report token offsets, which label masking needs",
                hint="load the checkpoint's fast (tokenizers) tokenizer; it needs a tokenizer.json",
            ) from exc
        except ValueError as exc:  # an <image> typed into a text the template renders twice, for one
            raise DataError(f"{source or 'a sample'}: the processor rejected the sample: {exc}") from exc

    def _image_outputs(self, processed: Any, images: list[Any]) -> dict[str, Any]:
        if not images:
            return {}
        out = {"pixel_values": processed["pixel_values"]}
        if "image_sizes" in processed:  # Llava-NeXT: the model needs each image's size to undo its tiling
            out["image_sizes"] = processed["image_sizes"]
        return out

    def _labels(self, processed: Any, spans: list[Span]) -> list[int]:
        """Each token overlapping an answer span keeps its id, every other token is ignored.

        Spans are character offsets in the text before image expansion; the processor
        reports where it expanded each ``<image>``, and the spans are shifted past them.
        """
        input_ids = processed["input_ids"][0].tolist()
        offsets = processed["offset_mapping"][0].tolist()
        replacements = (processed.get("text_replacement_offsets") or [[]])[0]
        ends = [r["span"][1] for r in replacements]
        gained = [0] + [r["new_span"][1] - r["span"][1] for r in replacements]

        def shifted(char: int) -> int:
            return char + gained[bisect.bisect_right(ends, char)]

        spans = [(shifted(start), shifted(end)) for start, end in spans]
        labels = []
        for token, (start, end) in zip(input_ids, offsets):
            inside = end > start and token != self.image_token_id and any(start < e and end > s for s, e in spans)
            labels.append(token if inside else IGNORE_INDEX)
        return labels

    # -- Encoder ----------------------------------------------------------------------

    def encode(self, sample: Sample) -> dict[str, Any] | None:
        """Token ids, labels on the answers and their ``</s>``, and the images' tensors."""
        conversation, images = self._conversation(sample, need_answer=True)
        text, spans = self._render_with_spans(conversation, sample.source)
        processed = self._process(text, images, sample.source, offsets=True)
        input_ids = processed["input_ids"][0].tolist()
        if not within_length(len(input_ids), self.options, sample.source):
            return None
        labels = self._labels(processed, spans)
        return {"input_ids": input_ids, "labels": labels, **self._image_outputs(processed, images)}

    def encode_prompt(self, sample: Sample) -> dict[str, Any]:
        """The conversation followed by the template's generation prompt, with the images' tensors."""
        conversation, images = self._conversation(sample, need_answer=False)
        try:
            text = self._render(conversation, True)
        except Exception as exc:
            raise template_error(exc, sample.source) from exc
        processed = self._process(text, images, sample.source, offsets=False)
        return {"input_ids": processed["input_ids"][0].tolist(), **self._image_outputs(processed, images)}

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` without special tokens."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)


def llava_1_5_encoder(processor: Any, options: TemplateOptions | None = None) -> LlavaEncoder:
    """Factory of the ``llava-1.5`` template (Vicuna ``USER:``/``ASSISTANT:``, ``</s>`` after answers)."""
    return LlavaEncoder(processor, options, chat_template=hub_chat_templates.LLAVA_1_5, eos_after_answers=True)


def llava_next_encoder(processor: Any, options: TemplateOptions | None = None) -> LlavaEncoder:
    """Factory of the ``llava-next`` template (Mistral ``[INST] ... [/INST] ...</s>``)."""
    return LlavaEncoder(processor, options, chat_template=hub_chat_templates.LLAVA_NEXT_MISTRAL, eos_after_answers=False)


def checkpoint_encoder(processor: Any, options: TemplateOptions | None = None) -> LlavaEncoder:
    """Factory of the ``llava-checkpoint`` template: the chat template saved with the checkpoint."""
    return LlavaEncoder(processor, options)
