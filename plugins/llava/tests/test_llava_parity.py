"""Llava and Llava-NeXT: encodings and losses checked against transformers' own processor, template and model."""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

from vistune.data.collate import Collator
from vistune.errors import ConfigError, DataError
from vistune.models import LoadOptions
from vistune.templates import IGNORE_INDEX, Sample, TemplateOptions
from vistune.testing import check_template
from vistune_llava.encoder import checkpoint_encoder, llava_1_5_encoder, llava_next_encoder
from vistune_llava.loading import load_llava_model

KINDS = ["llava", "llava-next"]
FIXTURES = {"llava": "tiny_llava", "llava-next": "tiny_llava_next"}
ENCODERS = {"llava": llava_1_5_encoder, "llava-next": llava_next_encoder}
TEMPLATES = {"llava": "llava-1.5", "llava-next": "llava-next"}


def _image(colour: str, size: tuple[int, int]):
    image = Image.new("RGB", size, colour)
    # A second colour in one corner, so tiles and patches differ from each other.
    image.paste(Image.new("RGB", (size[0] // 2, size[1] // 2), "white"), (0, 0))
    return image


# Sizes chosen so Llava-NeXT picks three different anyres grids (1x1, 2x1 and 1x2 tiles).
RED, BLUE, GREEN = _image("red", (32, 32)), _image("blue", (64, 40)), _image("green", (40, 64))


def _text(text):
    return {"type": "text", "text": text}


def _img(image):
    return {"type": "image", "image": image}


# Each case: vistune's Sample, and the same conversation written the Hugging Face way (content parts).
CASES = {
    "single-image": (
        Sample([{"role": "user", "content": "<image>\nWhat shape is this?"},
                {"role": "assistant", "content": "a red square"}], [RED], source="cases.jsonl:1"),
        [{"role": "user", "content": [_img(RED), _text("What shape is this?")]},
         {"role": "assistant", "content": [_text("a red square")]}],
    ),
    "multi-image": (
        Sample([{"role": "user", "content": "<image>\n<image>\n<image>\nCompare the three pictures."},
                {"role": "assistant", "content": "The first is red, the others blue and green."}], [RED, BLUE, GREEN],
               source="cases.jsonl:2"),
        [{"role": "user", "content": [_img(RED), _img(BLUE), _img(GREEN), _text("Compare the three pictures.")]},
         {"role": "assistant", "content": [_text("The first is red, the others blue and green.")]}],
    ),
    "multi-turn": (
        Sample([{"role": "user", "content": "<image>\nWhat colour?"},
                {"role": "assistant", "content": "red"},
                {"role": "user", "content": "And this one? <image>"},
                {"role": "assistant", "content": "It is blue.\nQuite dark."}], [RED, BLUE], source="cases.jsonl:3"),
        [{"role": "user", "content": [_img(RED), _text("What colour?")]},
         {"role": "assistant", "content": [_text("red")]},
         {"role": "user", "content": [_img(BLUE), _text("And this one?")]},
         {"role": "assistant", "content": [_text("It is blue.\nQuite dark.")]}],
    ),
    "system-prompt": (
        Sample([{"role": "system", "content": "You describe shapes."},
                {"role": "user", "content": "<image>\nDescribe."},
                {"role": "assistant", "content": "A green square on white."}], [GREEN], source="cases.jsonl:4"),
        [{"role": "system", "content": [_text("You describe shapes.")]},
         {"role": "user", "content": [_img(GREEN), _text("Describe.")]},
         {"role": "assistant", "content": [_text("A green square on white.")]}],
    ),
    "text-only": (
        Sample([{"role": "user", "content": "How many shapes are there?"},
                {"role": "assistant", "content": "There are 3 shapes."}], source="cases.jsonl:5"),
        [{"role": "user", "content": [_text("How many shapes are there?")]},
         {"role": "assistant", "content": [_text("There are 3 shapes.")]}],
    ),
}  # fmt: skip


@pytest.fixture(scope="module", params=KINDS)
def kind(request):
    return request.param


@pytest.fixture(scope="module")
def tiny(kind, request):
    return request.getfixturevalue(FIXTURES[kind])


@pytest.fixture(scope="module")
def loaded(kind, tiny):
    return load_llava_model(kind, str(tiny), LoadOptions(device="cpu", dtype="float32"))


@pytest.fixture(scope="module")
def reference_processor(tiny):
    """The checkpoint's processor as plain transformers loads it: the reference."""
    return transformers.AutoProcessor.from_pretrained(str(tiny))


@pytest.fixture(scope="module")
def encoder(kind, loaded):
    return ENCODERS[kind](loaded[1])


def with_eos(kind, processor, conversation):
    """The conversation as the template encodes it: Llava-1.5's hub template writes no </s> after answers, the
    llava-1.5 template adds one to each answer's text; Llava-NeXT's template already writes it."""
    if kind != "llava":
        return conversation
    eos = processor.tokenizer.eos_token
    return [
        {"role": "assistant", "content": [_text(c["text"] + eos) for c in m["content"]]}
        if m["role"] == "assistant"
        else m
        for m in conversation
    ]


def hf_encoding(processor, conversations, **kwargs):
    """transformers' reference: the processor's own chat template, tokenization and image processing."""
    padding = {"padding": True, "padding_side": "right"}
    return processor.apply_chat_template(
        conversations, tokenize=True, return_dict=True, return_tensors="pt", processor_kwargs=padding, **kwargs
    )


def reference_labels(processor, conversation, input_ids: list[int]) -> list[int]:
    """Labels built from the rendered string alone.

    Each assistant answer is found in the rendered text with its </s> and the spaces
    between it and the generation prompt before it; every <image> is
    widened to the run of image tokens the processor produced for it; the widened text is
    tokenized with offsets, and tokens overlapping an answer (with its </s>) are labelled.
    """
    tokenizer = processor.tokenizer
    eos, image = tokenizer.eos_token, processor.image_token
    text = processor.apply_chat_template(conversation, tokenize=False)
    runs, i = [], 0
    while i < len(input_ids):
        if input_ids[i] == processor.image_token_id:
            start = i
            while i < len(input_ids) and input_ids[i] == processor.image_token_id:
                i += 1
            runs.append(i - start)
        else:
            i += 1
    pieces = text.split(image)
    assert len(pieces) == len(runs) + 1
    widened = pieces[0] + "".join(image * n + piece for n, piece in zip(runs, pieces[1:]))
    spans, cursor = [], 0
    for message in conversation:
        if message["role"] != "assistant":
            continue
        answer = message["content"][0]["text"].removesuffix(eos)
        start = end = widened.index(answer, cursor) + len(answer)
        start -= len(answer)
        while widened[start - 1] == " ":  # the separator after the generation prompt is generated too
            start -= 1
        assert widened.startswith(eos, end), "the answer is not followed by </s>"
        spans.append((start, end + len(eos)))
        cursor = end
    encoded = tokenizer(widened, add_special_tokens=False, return_offsets_mapping=True)
    assert encoded["input_ids"] == input_ids
    return [
        token if any(s < span_end and e > span_start for span_start, span_end in spans) else IGNORE_INDEX
        for token, (s, e) in zip(encoded["input_ids"], encoded["offset_mapping"])
    ]


# -- parity with the Hugging Face processor ----------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_encoding_equals_hf_processor_and_chat_template(kind, encoder, reference_processor, case):
    sample, conversation = CASES[case]
    ours = encoder.encode(sample)
    reference = hf_encoding(reference_processor, with_eos(kind, reference_processor, conversation))
    assert ours["input_ids"] == reference["input_ids"][0].tolist()
    if sample.images:
        torch.testing.assert_close(ours["pixel_values"], reference["pixel_values"], rtol=0, atol=0)
        assert ours["pixel_values"].shape[0] == len(sample.images)
        if kind == "llava-next":
            assert torch.equal(ours["image_sizes"], reference["image_sizes"])
            assert ours["image_sizes"].tolist() == [[im.height, im.width] for im in sample.images]
        else:
            assert "image_sizes" not in ours
            # (32 / 8)^2 patches + CLS, minus the CLS the "default" feature strategy drops.
            assert ours["input_ids"].count(reference_processor.image_token_id) == 16 * len(sample.images)
    else:
        assert "pixel_values" not in ours and "pixel_values" not in reference


@pytest.mark.parametrize("case", sorted(CASES))
def test_llava_1_5_adds_only_eos_to_the_hub_template(tiny_llava, case):
    """Without the </s> after each answer, the llava-1.5 encoding is exactly the hub template's."""
    processor = transformers.AutoProcessor.from_pretrained(str(tiny_llava))
    sample, conversation = CASES[case]
    ours = llava_1_5_encoder(processor).encode(sample)
    eos = processor.tokenizer.eos_token_id
    stripped = [t for t, label in zip(ours["input_ids"], ours["labels"]) if not (t == eos and label == eos)]
    answers = sum(m["role"] == "assistant" for m in sample.messages)
    assert len(ours["input_ids"]) - len(stripped) == answers
    assert stripped == hf_encoding(processor, conversation)["input_ids"][0].tolist()


@pytest.mark.parametrize("case", sorted(CASES))
def test_labels_are_the_answers_and_their_eos(kind, encoder, reference_processor, case):
    sample, conversation = CASES[case]
    ours = encoder.encode(sample)
    conversation = with_eos(kind, reference_processor, conversation)
    assert ours["labels"] == reference_labels(reference_processor, conversation, ours["input_ids"])
    image_id = reference_processor.image_token_id
    assert all(label == IGNORE_INDEX for t, label in zip(ours["input_ids"], ours["labels"]) if t == image_id)
    supervised = [t for t, label in zip(ours["input_ids"], ours["labels"]) if label != IGNORE_INDEX]
    eos = reference_processor.tokenizer.eos_token
    answers = [m["content"] for m in sample.messages if m["role"] == "assistant"]
    learned = reference_processor.tokenizer.decode(supervised)
    assert learned.replace(" ", "") == "".join(a + eos for a in answers).replace(" ", "")
    for message in sample.messages:
        if message["role"] != "assistant":
            assert message["content"].replace("<image>", "").strip() not in learned


def test_batch_loss_equals_loss_on_hf_encoding(kind, loaded, reference_processor):
    """Our encodings batched by vistune's collator give the loss of the processor's batch with its own mask."""
    model, processor = loaded
    names = ["multi-image", "text-only", "multi-turn", "system-prompt", "single-image"]
    encoder = ENCODERS[kind](processor)
    batch = Collator(processor.tokenizer.pad_token_id)([encoder.encode(CASES[n][0]) for n in names])
    conversations = [with_eos(kind, reference_processor, CASES[n][1]) for n in names]
    reference = hf_encoding(reference_processor, conversations)
    assert torch.equal(batch["input_ids"], reference["input_ids"])
    assert torch.equal(batch["attention_mask"], reference["attention_mask"])
    torch.testing.assert_close(batch["pixel_values"], reference["pixel_values"], rtol=0, atol=0)
    if kind == "llava-next":
        assert torch.equal(batch["image_sizes"], reference["image_sizes"])
    labels = torch.full_like(reference["input_ids"], IGNORE_INDEX)
    for row, conversation in enumerate(conversations):
        n = int(reference["attention_mask"][row].sum())
        ids = reference["input_ids"][row, :n].tolist()
        labels[row, :n] = torch.tensor(reference_labels(reference_processor, conversation, ids))
    with torch.no_grad():
        loss = model(**batch).loss
        expected = model(**reference, labels=labels).loss
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", ["multi-turn", "system-prompt", "single-image"])
def test_encode_prompt_equals_hf_generation_prompt(kind, encoder, reference_processor, case):
    sample, conversation = CASES[case]
    prompt = Sample(sample.messages[:-1], sample.images)
    ours = encoder.encode_prompt(prompt)
    reference = hf_encoding(reference_processor, with_eos(kind, reference_processor, conversation[:-1]),
                            add_generation_prompt=True)  # fmt: skip
    assert ours["input_ids"] == reference["input_ids"][0].tolist()
    torch.testing.assert_close(ours["pixel_values"], reference["pixel_values"], rtol=0, atol=0)
    # Prompted exactly as trained: the prompt starts the training sequence of the full conversation.
    full = encoder.encode(sample)["input_ids"]
    assert full[: len(ours["input_ids"])] == ours["input_ids"]
    ending = {"llava": "ASSISTANT:", "llava-next": "[/INST]"}[kind]
    assert reference_processor.tokenizer.decode(ours["input_ids"]).endswith(ending)


def _llava_with_full_features(tiny_llava, directory, *, old_processor_config: bool):
    """The tiny Llava with ``vision_feature_select_strategy: full`` (the CLS feature is kept).

    ``old_processor_config``: its processor_config.json lacks the fields that count image
    tokens, as in checkpoints converted before processors expanded ``<image>``.
    """
    shutil.copytree(tiny_llava, directory)
    for name in ("config.json", "processor_config.json"):
        config = json.loads((directory / name).read_text())
        config["vision_feature_select_strategy"] = "full"
        if name == "processor_config.json" and old_processor_config:
            for field in ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens"):
                del config[field]
        (directory / name).write_text(json.dumps(config))
    return directory


def test_image_tokens_follow_the_feature_select_strategy(tiny_llava, tmp_path):
    """``full`` keeps the CLS feature: one image token more per image than ``default``, as the model's features need."""
    full = _llava_with_full_features(tiny_llava, tmp_path / "full", old_processor_config=False)
    old = _llava_with_full_features(tiny_llava, tmp_path / "old", old_processor_config=True)
    sample, conversation = CASES["multi-image"]
    reference_processor = transformers.AutoProcessor.from_pretrained(str(full))
    reference = hf_encoding(reference_processor, with_eos("llava", reference_processor, conversation))
    for directory in (full, old):
        model, processor = load_llava_model("llava", str(directory), LoadOptions(device="cpu", dtype="float32"))
        ours = llava_1_5_encoder(processor).encode(sample)
        assert ours["input_ids"] == reference["input_ids"][0].tolist()
        # (32 / 8)^2 patches + the CLS feature, for each of the three images (each cropped to 32x32).
        assert ours["input_ids"].count(processor.image_token_id) == (16 + 1) * 3
        with torch.no_grad():  # the model checks that image tokens and image features agree in number
            assert torch.isfinite(model(**Collator(processor.tokenizer.pad_token_id)([ours])).loss)


def test_checkpoint_template_matches_the_named_one(kind, loaded):
    """The tiny checkpoints carry the hub templates, so llava-checkpoint encodes as llava-1.5 / llava-next do."""
    processor = loaded[1]
    named, own = ENCODERS[kind](processor), checkpoint_encoder(processor)
    assert own.eos_after_answers == (kind == "llava")
    for sample, _ in CASES.values():
        a, b = named.encode(sample), own.encode(sample)
        assert a["input_ids"] == b["input_ids"] and a["labels"] == b["labels"]


# The shape of llava-hf/llava-v1.6-34b-hf's template: ChatML, whose answers end with <|im_end|>, not </s>.
CHATML_WITH_IMAGES = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{% for c in message['content'] %}"
    "{% if c['type'] == 'image' %}<image>\n{% else %}{{ c['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_checkpoint_template_with_its_own_end_of_turn_marker(tiny_llava_next):
    processor = transformers.AutoProcessor.from_pretrained(str(tiny_llava_next))
    processor.chat_template = CHATML_WITH_IMAGES
    encoder = checkpoint_encoder(processor)
    assert not encoder.eos_after_answers
    sample, conversation = CASES["multi-turn"]
    ours = encoder.encode(sample)
    assert ours["input_ids"] == hf_encoding(processor, conversation)["input_ids"][0].tolist()
    supervised = [t for t, label in zip(ours["input_ids"], ours["labels"]) if label != IGNORE_INDEX]
    assert processor.tokenizer.decode(supervised) == "red<|im_end|>It is blue.\nQuite dark.<|im_end|>"


def test_template_contract(kind, plugin_manager, loaded):
    spec = plugin_manager.registries.templates.get(TEMPLATES[kind])
    for case in ("multi-turn", "system-prompt", "multi-image"):
        check_template(spec, loaded[1], CASES[case][0])


# -- errors ------------------------------------------------------------------------------


def test_needs_a_llava_processor(loaded):
    with pytest.raises(ConfigError, match="need a Llava or Llava-NeXT processor"):
        llava_1_5_encoder(loaded[1].tokenizer)


def test_tag_and_image_counts_must_match(encoder):
    sample = Sample([{"role": "user", "content": "<image>\n<image>\nTwo?"}, {"role": "assistant", "content": "yes"}],
                    [RED], source="data/train.jsonl:17")  # fmt: skip
    with pytest.raises(DataError, match=r"data/train.jsonl:17: 2 <image> tag\(s\) but 1 image"):
        encoder.encode(sample)
    with pytest.raises(DataError, match="data/train.jsonl:17"):
        encoder.encode_prompt(Sample(sample.messages[:1], [RED, BLUE, GREEN], source="data/train.jsonl:17"))


def test_images_only_in_user_turns(encoder):
    sample = Sample([{"role": "user", "content": "Draw."}, {"role": "assistant", "content": "<image>"}], [RED],
                    source="x.jsonl:2")  # fmt: skip
    with pytest.raises(DataError, match="x.jsonl:2: message 1 is an assistant answer"):
        encoder.encode(sample)


def test_training_sample_needs_an_answer(encoder):
    with pytest.raises(DataError, match="x.jsonl:3: no assistant message"):
        encoder.encode(Sample([{"role": "user", "content": "<image>hi"}], [RED], source="x.jsonl:3"))


def test_too_long_samples_raise_or_drop_whole(kind, loaded):
    processor = loaded[1]
    sample = CASES["multi-image"][0]
    length = len(ENCODERS[kind](processor).encode(sample)["input_ids"])
    error = ENCODERS[kind](processor, TemplateOptions(max_length=length - 1, truncation="error"))
    with pytest.raises(DataError, match=rf"cases.jsonl:2: {length} tokens, longer than max_length {length - 1}"):
        error.encode(sample)
    assert ENCODERS[kind](processor, TemplateOptions(max_length=length - 1, truncation="drop")).encode(sample) is None
    fits = ENCODERS[kind](processor, TemplateOptions(max_length=length, truncation="error")).encode(sample)
    assert len(fits["input_ids"]) == length


def test_images_may_be_paths(encoder, tmp_path):
    path = tmp_path / "red.png"
    RED.save(path)
    by_path = encoder.encode(Sample(CASES["single-image"][0].messages, [str(path)]))
    by_image = encoder.encode(CASES["single-image"][0])
    assert by_path["input_ids"] == by_image["input_ids"]
    torch.testing.assert_close(by_path["pixel_values"], by_image["pixel_values"], rtol=0, atol=0)
    with pytest.raises(DataError, match="y.jsonl:1: image .*missing.png.* not found"):
        encoder.encode(Sample(CASES["single-image"][0].messages, [str(tmp_path / "missing.png")], source="y.jsonl:1"))
