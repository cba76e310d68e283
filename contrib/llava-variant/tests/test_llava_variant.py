"""The llava-deep-features variant, tested the way an outside plugin author would: with vistune.testing."""

from __future__ import annotations

import json

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

from vistune.data.collate import Collator
from vistune.models import RUN_FILE, LoadOptions, detect_model_type
from vistune.templates import Sample
from vistune.testing import check_model_type, check_template
from vistune_llava.encoder import llava_1_5_encoder
from vistune_llava.loading import load_llava
from vistune_llava_variant import plugin
from vistune_llava_variant.loading import load_llava_deep_features

SAMPLE = Sample(
    [
        {"role": "user", "content": "<image>\nWhat colour is the square?"},
        {"role": "assistant", "content": "It is red."},
    ],
    [Image.new("RGB", (40, 32), "red")],
)


@pytest.fixture
def registries(plugin_manager, register_plugin):
    """The variant's registrations, whether or not its distribution is installed."""
    if "llava-deep-features" not in plugin_manager.registries.models:
        assert not register_plugin(plugin).errors
    return plugin_manager.registries


def batch_for(processor):
    return Collator(processor.tokenizer.pad_token_id)([llava_1_5_encoder(processor).encode(SAMPLE)])


def test_model_type_contract(registries, tiny_llava):
    spec = registries.models.get("llava-deep-features")
    model, _ = check_model_type(spec, tiny_llava, LoadOptions(device="cpu"))
    assert model.config.vision_feature_layer == [-2, -1]
    width = model.config.vision_config.hidden_size
    assert model.model.multi_modal_projector.linear_1.in_features == 2 * width


def test_template_contract(registries, tiny_llava):
    _, processor = load_llava_deep_features(str(tiny_llava), LoadOptions(device="cpu"))
    spec = registries.templates.get(registries.models.get("llava-deep-features").default_template)
    check_template(spec, processor, SAMPLE)


def test_starts_as_the_checkpoint_and_learns_from_the_last_layer(tiny_llava):
    base, processor = load_llava(str(tiny_llava), LoadOptions(device="cpu"))
    variant, _ = load_llava_deep_features(str(tiny_llava), LoadOptions(device="cpu"))
    batch = batch_for(processor)
    with torch.no_grad():
        expected = base(**batch)
        got = variant(**batch)
    # The new projector columns start at zero: same logits and loss as the checkpoint.
    torch.testing.assert_close(got.logits, expected.logits, rtol=0, atol=1e-5)
    torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=1e-6)
    # ...and they are wired to the last vision layer: once non-zero, the output changes.
    width = variant.config.vision_config.hidden_size
    with torch.no_grad():
        variant.model.multi_modal_projector.linear_1.weight[:, width:].normal_(0, 0.5)
        assert not torch.allclose(variant(**batch).logits, expected.logits, atol=1e-3)


def test_saved_variant_loads_with_plain_transformers(tiny_llava, tmp_path, registries):
    variant, processor = load_llava_deep_features(str(tiny_llava), LoadOptions(device="cpu"))
    width = variant.config.vision_config.hidden_size
    with torch.no_grad():
        variant.model.multi_modal_projector.linear_1.weight[:, width:].normal_(0, 0.5)
    variant.save_pretrained(tmp_path)
    processor.save_pretrained(tmp_path)
    batch = batch_for(processor)
    plain = transformers.LlavaForConditionalGeneration.from_pretrained(tmp_path)
    again, _ = load_llava_deep_features(str(tmp_path), LoadOptions(device="cpu"))
    with torch.no_grad():
        expected = variant(**batch).logits
        torch.testing.assert_close(plain(**batch).logits, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(again(**batch).logits, expected, rtol=0, atol=1e-5)
    # The checkpoint is a Llava one; the run file vistune writes beside it names the variant.
    assert detect_model_type(tmp_path, registries.models)[0].name == "llava"
    (tmp_path / RUN_FILE).write_text(json.dumps({"model_type": "llava-deep-features"}))
    assert detect_model_type(tmp_path, registries.models)[0].name == "llava-deep-features"
