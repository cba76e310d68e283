"""The tokenizer's own Jinja chat template as a vistune template, with labels on assistant turns.

The label rule is shared with the vision templates (``vistune_qwen_vl`` imports it):
the conversation is rendered by the checkpoint's chat template, the characters each
assistant answer contributes are found, and the tokens overlapping those characters are
supervised.  Tokenizing the whole rendered text once keeps ``input_ids`` identical to
``tokenizer.apply_chat_template(..., tokenize=True)``.

Where an answer lies in the text is decided in one of two ways:

* the template marks answers with ``{% generation %}`` blocks: those blocks, as
  transformers' ``return_assistant_tokens_mask`` uses them;
* otherwise, by rendering growing prefixes of the conversation: the text between
  "everything before answer *i* plus the generation prompt" and "everything up to answer
  *i*" is answer *i* plus its end-of-turn markup.  Trailing whitespace (the newline
  ChatML writes after ``<|im_end|>``) is not supervised, the end-of-turn token is, so the
  model learns to stop.  This works for any template that renders earlier turns the same
  way whatever follows them (ChatML/Qwen2, Llama-3, Mistral, Gemma...).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

from vistune.errors import ConfigError, DataError
from vistune.templates import IGNORE_INDEX, Sample, TemplateOptions

ROLES = ("system", "user", "assistant")

#: A ``{% generation %}`` block in a chat template (same pattern transformers checks for).
GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")

#: ``render(messages, add_generation_prompt) -> text``: one chat-template rendering.
Render = Callable[[list, bool], str]

Span = tuple[int, int]


def _where(sample: Sample) -> str:
    return sample.source or "a sample"


def validate_messages(sample: Sample, *, need_answer: bool) -> list[dict[str, str]]:
    """The sample's messages, checked: each a ``{"role", "content": str}`` with a known role.

    :param need_answer: a training sample must hold an assistant message (else there is
        nothing to learn).
    :raises DataError: naming ``sample.source``.
    """
    messages = sample.messages
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{_where(sample)}: the conversation has no messages")
    for i, message in enumerate(messages):
        if (
            not isinstance(message, dict)
            or message.get("role") not in ROLES
            or not isinstance(message.get("content"), str)
        ):
            raise DataError(
                f"{_where(sample)}: message {i} must be {{'role': system|user|assistant, 'content': str}}, got {message!r}"
            )
    if need_answer and not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{_where(sample)}: no assistant message, so there is nothing to learn",
                        hint="training samples need at least one assistant answer")  # fmt: skip
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def prefix_spans(render: Render, messages: Sequence[Any], source: str = "") -> tuple[str, list[Span]]:
    """Render ``messages``; return the text and the character spans to supervise.

    A span is one assistant answer and its end-of-turn markup, without trailing
    whitespace, found by rendering growing prefixes of the conversation.

    :raises DataError: when the template renders a prefix differently from the start of
        the whole conversation, so answers cannot be located.
    """
    text = render(list(messages), False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = render(list(messages[:i]), True)
        turn = render(list(messages[: i + 1]), False)
        if not (turn.startswith(prompt) and text.startswith(turn)):
            raise DataError(
                f"{source or 'a sample'}: the chat template renders the conversation up to message {i} differently "
                "from the start of the whole conversation, so the assistant answer cannot be located for its labels",
                hint="use a chat template that marks answers with {% generation %} blocks, or one that renders earlier "
                "turns the same whatever follows them",
            )
        answer = turn[len(prompt) :]
        spans.append((len(prompt), len(prompt) + len(answer.rstrip())))
    return text, spans


def generation_spans(template: str, messages: Sequence[Any], **template_kwargs) -> tuple[str, list[Span]]:
    """Render ``messages`` with ``template``; the spans are its ``{% generation %}`` blocks."""
    from transformers.utils.chat_template_utils import render_jinja_template

    rendered, indices = render_jinja_template(
        conversations=[list(messages)], chat_template=template, return_assistant_tokens_mask=True, **template_kwargs
    )
    return rendered[0], [tuple(span) for span in indices[0]]


def tokenize_with_offsets(tokenizer: Any, text: str, add_special_tokens: bool = False) -> tuple[list[int], list[Span]]:
    """Token ids of ``text`` and each token's character span (fast tokenizers only)."""
    try:
        encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    except NotImplementedError as exc:
        raise ConfigError(
            f"{type(tokenizer).__name__} cannot report token offsets, which label masking needs",
            hint="load the checkpoint's fast (tokenizers) tokenizer; it needs a tokenizer.json",
        ) from exc
    return list(encoded["input_ids"]), [tuple(o) for o in encoded["offset_mapping"]]


def labels_from_spans(input_ids: Sequence[int], offsets: Sequence[Span], spans: Sequence[Span]) -> list[int]:
    """``input_ids`` where a token overlaps a supervised span, ``IGNORE_INDEX`` elsewhere.

    Overlap, not containment, is the rule transformers' ``return_assistant_tokens_mask``
    uses too: a token that merges the end of an answer with what follows is learned.
    """
    labels = []
    for token, (start, end) in zip(input_ids, offsets):
        inside = end > start and any(start < span_end and end > span_start for span_start, span_end in spans)
        labels.append(token if inside else IGNORE_INDEX)
    return labels


def within_length(length: int, options: TemplateOptions, source: str) -> bool:
    """Whether a sample of ``length`` tokens is kept: True if it fits, False if dropped.

    :raises DataError: when it is too long and ``options.truncation`` is ``"error"``.
    """
    if length <= options.max_length:
        return True
    if options.truncation == "drop":
        return False
    raise DataError(
        f"{source or 'a sample'}: {length} tokens, longer than max_length {options.max_length}",
        hint="raise max_length, or set truncation: drop to skip such samples",
    )


def template_error(exc: Exception, source: str) -> DataError:
    """A chat template that raised (``raise_exception`` in Jinja, or a rendering error) on one sample."""
    return DataError(f"{source or 'a sample'}: the chat template rejected the conversation: {exc}")


def answer_spans(
    template: str, render: Render, messages: Sequence[Any], source: str, special_tokens: dict[str, Any]
) -> tuple[str, list[Span]]:
    """The rendered conversation and the character spans of its answers.

    A template that marks its answers with ``{% generation %}`` blocks says where they
    are; otherwise they are found by rendering growing prefixes of the conversation.
    A template error becomes a :class:`DataError` naming ``source``.
    """
    try:
        if GENERATION_BLOCK.search(template):
            return generation_spans(template, messages, **special_tokens)
        return prefix_spans(render, messages, source)
    except DataError:
        raise
    except Exception as exc:  # jinja2 errors and the template's own raise_exception
        raise template_error(exc, source) from exc


class ChatTemplateEncoder:
    """:class:`vistune.templates.Encoder` for text models, driven by the tokenizer's chat template.

    :param processor_or_tokenizer: a tokenizer, or a processor holding one (``.tokenizer``).
    :param options: ``max_length`` and ``truncation``.
    """

    def __init__(self, processor_or_tokenizer: Any, options: TemplateOptions | None = None):
        self.tokenizer = getattr(processor_or_tokenizer, "tokenizer", None) or processor_or_tokenizer
        self.options = options or TemplateOptions()
        template = getattr(self.tokenizer, "chat_template", None)
        template = template or getattr(processor_or_tokenizer, "chat_template", None)
        if isinstance(template, dict):  # named templates (tool use, RAG...): conversations use the default one
            template = template.get("default")
        if not isinstance(template, str) or not template:
            raise ConfigError(
                f"the tokenizer {getattr(self.tokenizer, 'name_or_path', '')!r} has no chat template",
                hint="use a checkpoint with a chat template (an instruct/chat model), or add chat_template to its "
                "tokenizer_config.json / chat_template.jinja",
            )
        self.template = template

    def _render(self, messages: list, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=add_generation_prompt
        )

    def _messages(self, sample: Sample, *, need_answer: bool) -> list[dict[str, str]]:
        if sample.images:
            raise DataError(
                f"{_where(sample)}: the sample has {len(sample.images)} image(s) but the model is a text model",
                hint="use a vision-language model (llava, qwen2-vl...), or drop the images from the dataset",
            )
        return validate_messages(sample, need_answer=need_answer)

    def encode(self, sample: Sample) -> dict[str, Any] | None:
        """``input_ids`` and ``labels`` (supervised on assistant answers and their end-of-turn token)."""
        messages = self._messages(sample, need_answer=True)
        text, spans = answer_spans(self.template, self._render, messages, sample.source, self.tokenizer.special_tokens_map)
        # apply_chat_template never adds special tokens: the template writes them.
        input_ids, offsets = tokenize_with_offsets(self.tokenizer, text, add_special_tokens=False)
        if not within_length(len(input_ids), self.options, sample.source):
            return None
        return {"input_ids": input_ids, "labels": labels_from_spans(input_ids, offsets, spans)}

    def encode_prompt(self, sample: Sample) -> dict[str, Any]:
        """``input_ids`` of the conversation followed by the generation prompt of an assistant turn."""
        messages = self._messages(sample, need_answer=False)
        try:
            text = self._render(messages, True)
        except Exception as exc:
            raise template_error(exc, sample.source) from exc
        return {"input_ids": list(self.tokenizer(text, add_special_tokens=False)["input_ids"])}

    def decode(self, token_ids: Sequence[int]) -> str:
        """Text of ``token_ids`` without special tokens."""
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)


__all__ = [
    "GENERATION_BLOCK",
    "ChatTemplateEncoder",
    "answer_spans",
    "generation_spans",
    "labels_from_spans",
    "prefix_spans",
    "template_error",
    "tokenize_with_offsets",
    "validate_messages",
    "within_length",
]
