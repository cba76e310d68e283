"""The SFT collator: padded token sequences, image tensors batched as the models' processors batch them."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from vistune.data.collate import Collator, pad_tensors
from vistune.templates import IGNORE_INDEX


def test_pads_sequences_on_the_right():
    collate = Collator(pad_token_id=7)
    batch = collate([
        {"input_ids": [1, 2, 3], "labels": [IGNORE_INDEX, 2, 3]},
        {"input_ids": [4, 5], "labels": [IGNORE_INDEX, 5]},
    ])  # fmt: skip
    assert batch["input_ids"].tolist() == [[1, 2, 3], [4, 5, 7]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 2, 3], [IGNORE_INDEX, 5, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 1, 0]]


def test_pad_to_multiple_and_other_per_token_keys():
    collate = Collator(pad_token_id=0, pad_to_multiple_of=4)
    batch = collate([
        {"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5], "mm_token_type_ids": [0, 1, 1, 0, 0]},
        {"input_ids": [6], "labels": [6], "mm_token_type_ids": [0]},
    ])  # fmt: skip
    assert batch["input_ids"].shape == (2, 8)
    assert batch["mm_token_type_ids"].tolist() == [[0, 1, 1, 0, 0, 0, 0, 0], [0] * 8]
    assert batch["attention_mask"].sum().item() == 6


def test_images_concatenate_in_sample_order_and_text_only_samples_are_fine():
    a, b = torch.randn(1, 3, 4, 4), torch.randn(2, 3, 4, 4)
    batch = Collator(0)([
        {"input_ids": [1], "labels": [1], "pixel_values": a},
        {"input_ids": [2, 3], "labels": [2, 3]},
        {"input_ids": [4], "labels": [4], "pixel_values": b},
    ])  # fmt: skip
    assert torch.equal(batch["pixel_values"], torch.cat([a, b]))
    text_only = Collator(0)([{"input_ids": [1], "labels": [1]}, {"input_ids": [2], "labels": [2]}])
    assert set(text_only) == {"input_ids", "labels", "attention_mask"}


def test_pad_tensors_zero_pads_trailing_dimensions():
    a, b = torch.ones(1, 5, 2), torch.full((2, 3, 2), 2.0)
    out = pad_tensors([a, b])
    assert out.shape == (3, 5, 2)
    assert torch.equal(out[0], a[0])
    assert torch.equal(out[1:, :3], b) and not out[1:, 3:].any()
    with pytest.raises(ValueError, match="dimensions"):
        pad_tensors([torch.ones(2, 2), torch.ones(2)])


def test_llava_next_batch_matches_the_processors_own_batch(tiny_llava_next):
    """Different image sizes give different patch counts; the batch must be what the processor makes of both."""
    from PIL import Image
    from vistune.tiny_models import load_tiny_processor

    processor = load_tiny_processor("llava-next", tiny_llava_next)
    images = [Image.new("RGB", (32, 32), (200, 10, 10)), Image.new("RGB", (64, 32), (10, 200, 10))]
    text = "USER: <image>\nWhat is this? ASSISTANT:"
    singles = [processor(text=text, images=image, return_tensors="pt") for image in images]
    assert singles[0]["pixel_values"].shape[1] != singles[1]["pixel_values"].shape[1]
    features = [
        {"input_ids": s["input_ids"][0].tolist(), "labels": s["input_ids"][0].tolist(),
         "pixel_values": s["pixel_values"], "image_sizes": s["image_sizes"]}
        for s in singles
    ]  # fmt: skip
    batch = Collator(processor.tokenizer.pad_token_id)(features)
    reference = processor(text=[text, text], images=images, return_tensors="pt", padding=True)
    assert torch.equal(batch["pixel_values"], reference["pixel_values"])
    assert torch.equal(batch["image_sizes"], reference["image_sizes"])
