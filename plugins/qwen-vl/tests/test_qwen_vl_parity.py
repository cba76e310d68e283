"""Qwen2-VL and Qwen2.5-VL: encodings, losses and positions checked against transformers' own processor and models."""

from __future__ import annotations

import json
import shutil

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

from vistune.data.collate import Collator
from vistune.errors import ConfigError, DataError
from vistune.models import LoadOptions, detect_model_type
from vistune.specs import load_ref
from vistune.templates import IGNORE_INDEX, Sample, TemplateOptions
from vistune.testing import check_model_type, check_template
from vistune_qwen_vl.loading import load_qwen_vl
from vistune_qwen_vl.positions import mrope_position_ids
from vistune_qwen_vl.processor import load_processor
from vistune_qwen_vl.template import QwenVLEncoder

KINDS = ["qwen2-vl", "qwen2.5-vl"]
FIXTURES = {"qwen2-vl": "tiny_qwen2_vl", "qwen2.5-vl": "tiny_qwen2_5_vl"}
CLASSES = {"qwen2-vl": "Qwen2VLForConditionalGeneration", "qwen2.5-vl": "Qwen2_5_VLForConditionalGeneration"}


def _image(colour: str, size: tuple[int, int]):
    image = Image.new("RGB", size, colour)
    # A second colour in one corner, so patches differ from each other.
    image.paste(Image.new("RGB", (size[0] // 2, size[1] // 2), "white"), (0, 0))
    return image


RED, BLUE, GREEN = _image("red", (32, 32)), _image("blue", (64, 48)), _image("green", (48, 64))


def _text(text):
    return {"type": "text", "text": text}


def _img(image):
    return {"type": "image", "image": image}


# Each case: vistune's Sample, and the same conversation written the Hugging Face way (content parts).
CASES = {
    "single-image": (
        Sample([{"role": "user", "content": "<image>\nWhat shape is this?"},
                {"role": "assistant", "content": "a red square"}], [RED]),
        [{"role": "user", "content": [_img(RED), _text("\nWhat shape is this?")]},
         {"role": "assistant", "content": [_text("a red square")]}],
    ),
    "multi-image": (
        Sample([{"role": "user", "content": "Compare <image> and <image>, then <image>."},
                {"role": "assistant", "content": "The first is red, the others blue and green."}], [RED, BLUE, GREEN]),
        [{"role": "user", "content": [_text("Compare "), _img(RED), _text(" and "), _img(BLUE), _text(", then "),
                                      _img(GREEN), _text(".")]},
         {"role": "assistant", "content": [_text("The first is red, the others blue and green.")]}],
    ),
    "multi-turn": (
        Sample([{"role": "user", "content": "<image>What colour?"},
                {"role": "assistant", "content": "red"},
                {"role": "user", "content": "And this one? <image>"},
                {"role": "assistant", "content": "It is blue.\nQuite dark."}], [RED, BLUE]),
        [{"role": "user", "content": [_img(RED), _text("What colour?")]},
         {"role": "assistant", "content": [_text("red")]},
         {"role": "user", "content": [_text("And this one? "), _img(BLUE)]},
         {"role": "assistant", "content": [_text("It is blue.\nQuite dark.")]}],
    ),
    "system-prompt": (
        Sample([{"role": "system", "content": "You describe shapes."},
                {"role": "user", "content": "<image>\nDescribe."},
                {"role": "assistant", "content": "A green square on white."}], [GREEN]),
        [{"role": "system", "content": [_text("You describe shapes.")]},
         {"role": "user", "content": [_img(GREEN), _text("\nDescribe.")]},
         {"role": "assistant", "content": [_text("A green square on white.")]}],
    ),
    "text-only": (
        Sample([{"role": "user", "content": "How many shapes are there?"},
                {"role": "assistant", "content": "There are 3 shapes."}]),
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
    return load_qwen_vl(kind, str(tiny), LoadOptions(device="cpu"))


@pytest.fixture(scope="module")
def processor(loaded):
    return loaded[1]


def hf_encoding(processor, conversations, **kwargs):
    """transformers' reference: the processor's own chat template, tokenization and image processing."""
    return processor.apply_chat_template(conversations, tokenize=True, return_dict=True, return_tensors="pt",
                                         processor_kwargs={"padding": True, "padding_side": "right"}, **kwargs)  # fmt: skip


def answer_mask(processor, input_ids: list[int]) -> list[int]:
    """Labels built from token ids alone: after each '<|im_start|>assistant\\n', up to and including '<|im_end|>'."""
    tokenizer = processor.tokenizer
    header = [
        tokenizer.convert_tokens_to_ids("<|im_start|>"),
        *tokenizer.encode("assistant\n", add_special_tokens=False),
    ]
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    labels = [IGNORE_INDEX] * len(input_ids)
    i = 0
    while i < len(input_ids):
        if input_ids[i : i + len(header)] == header:
            i += len(header)
            while input_ids[i] != end:
                labels[i] = input_ids[i]
                i += 1
            labels[i] = end
        i += 1
    return labels


# -- parity with the Hugging Face processor ----------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_encoding_equals_hf_processor_and_chat_template(processor, case):
    sample, conversation = CASES[case]
    ours = QwenVLEncoder(processor).encode(sample)
    reference = hf_encoding(processor, conversation)
    assert ours["input_ids"] == reference["input_ids"][0].tolist()
    assert ours["mm_token_type_ids"] == reference["mm_token_type_ids"][0].tolist()
    if sample.images:
        torch.testing.assert_close(ours["pixel_values"], reference["pixel_values"], rtol=0, atol=0)
        assert torch.equal(ours["image_grid_thw"], reference["image_grid_thw"])
        assert ours["image_grid_thw"].shape == (len(sample.images), 3)
        merge = processor.image_processor.merge_size
        per_image = (ours["image_grid_thw"].prod(-1) // merge**2).tolist()
        assert ours["input_ids"].count(processor.image_token_id) == sum(per_image)
        assert ours["pixel_values"].shape[0] == int(ours["image_grid_thw"].prod(-1).sum())
    else:
        assert "pixel_values" not in ours and "pixel_values" not in reference


@pytest.mark.parametrize("case", sorted(CASES))
def test_labels_are_the_answers_and_their_im_end(processor, case):
    sample, _ = CASES[case]
    ours = QwenVLEncoder(processor).encode(sample)
    assert ours["labels"] == answer_mask(processor, ours["input_ids"])
    image_positions = [i for i, t in enumerate(ours["input_ids"]) if t == processor.image_token_id]
    assert all(ours["labels"][i] == IGNORE_INDEX for i in image_positions)
    supervised = [t for t, label in zip(ours["input_ids"], ours["labels"]) if label != IGNORE_INDEX]
    answers = [m["content"] for m in sample.messages if m["role"] == "assistant"]
    assert processor.tokenizer.decode(supervised) == "".join(a + "<|im_end|>" for a in answers)


def test_batch_loss_equals_loss_on_hf_encoding(loaded):
    """Our encodings batched by vistune's collator give the loss of the processor's batch with its own mask."""
    model, processor = loaded
    names = ["multi-image", "text-only", "multi-turn", "single-image"]
    encoder = QwenVLEncoder(processor)
    batch = Collator(processor.tokenizer.pad_token_id)([encoder.encode(CASES[n][0]) for n in names])
    reference = hf_encoding(processor, [CASES[n][1] for n in names])
    assert torch.equal(batch["input_ids"], reference["input_ids"])
    assert torch.equal(batch["image_grid_thw"], reference["image_grid_thw"])
    torch.testing.assert_close(batch["pixel_values"], reference["pixel_values"], rtol=0, atol=0)
    labels = torch.tensor([answer_mask(processor, row.tolist()) for row in reference["input_ids"]])
    labels[reference["attention_mask"] == 0] = IGNORE_INDEX
    with torch.no_grad():
        loss = model(**batch).loss
        expected = model(**reference, labels=labels).loss
    assert torch.isfinite(loss)
    torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)


def test_encode_prompt_equals_hf_generation_prompt(processor):
    sample, conversation = CASES["multi-turn"]
    prompt_sample = Sample(sample.messages[:3], sample.images)
    ours = QwenVLEncoder(processor).encode_prompt(prompt_sample)
    reference = hf_encoding(processor, conversation[:3], add_generation_prompt=True)
    assert ours["input_ids"] == reference["input_ids"][0].tolist()
    torch.testing.assert_close(ours["pixel_values"], reference["pixel_values"], rtol=0, atol=0)
    assert torch.equal(ours["image_grid_thw"], reference["image_grid_thw"])
    assert processor.tokenizer.decode(ours["input_ids"]).endswith("<|im_start|>assistant\n")


def test_template_contract(processor, plugin_manager):
    spec = plugin_manager.registries.templates.get("qwen2-vl")
    check_template(spec, processor, CASES["multi-turn"][0])


def test_images_load_from_paths(processor, tmp_path):
    sample, _ = CASES["multi-image"]
    paths = []
    for i, image in enumerate(sample.images):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    from_paths = QwenVLEncoder(processor).encode(Sample(sample.messages, paths))
    from_images = QwenVLEncoder(processor).encode(sample)
    assert from_paths["input_ids"] == from_images["input_ids"]
    torch.testing.assert_close(from_paths["pixel_values"], from_images["pixel_values"], rtol=0, atol=0)


# -- errors -------------------------------------------------------------------------------


def test_tag_and_image_counts_must_match(processor):
    messages = [{"role": "user", "content": "<image> and <image>"}, {"role": "assistant", "content": "two"}]
    with pytest.raises(DataError, match=r"data.jsonl:9: 2 <image> tag\(s\) but 1 image\(s\)"):
        QwenVLEncoder(processor).encode(Sample(messages, [RED], source="data.jsonl:9"))
    with pytest.raises(DataError, match=r"data.jsonl:10: 0 <image> tag\(s\) but 1 image\(s\)"):
        QwenVLEncoder(processor).encode(Sample([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "x"}],
                                               [RED], source="data.jsonl:10"))  # fmt: skip


def test_too_long_samples_raise_or_drop_whole(processor):
    sample = Sample(CASES["multi-image"][0].messages, CASES["multi-image"][0].images, source="data.jsonl:11")
    length = len(QwenVLEncoder(processor).encode(sample)["input_ids"])
    assert QwenVLEncoder(processor, TemplateOptions(max_length=length)).encode(sample) is not None
    with pytest.raises(DataError, match=rf"data.jsonl:11: {length} tokens, longer than max_length {length - 1}"):
        QwenVLEncoder(processor, TemplateOptions(max_length=length - 1)).encode(sample)
    # Even a limit that would fall inside the image tokens drops the sample whole rather than cutting it.
    first_image = QwenVLEncoder(processor).encode(sample)["input_ids"].index(processor.image_token_id)
    assert (
        QwenVLEncoder(processor, TemplateOptions(max_length=first_image + 2, truncation="drop")).encode(sample) is None
    )


def test_bad_samples_name_their_source(processor, tmp_path):
    encoder = QwenVLEncoder(processor)
    with pytest.raises(DataError, match="data.jsonl:1: message 1 is an assistant answer with an <image> tag"):
        encoder.encode(Sample([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "<image>"}], [RED],
                              source="data.jsonl:1"))  # fmt: skip
    with pytest.raises(DataError, match="data.jsonl:2: cannot read image"):
        encoder.encode(Sample([{"role": "user", "content": "<image>"}, {"role": "assistant", "content": "x"}],
                              [str(tmp_path / "missing.png")], source="data.jsonl:2"))  # fmt: skip
    with pytest.raises(DataError, match="data.jsonl:3: no assistant message"):
        encoder.encode(Sample([{"role": "user", "content": "hi"}], source="data.jsonl:3"))
    with pytest.raises(DataError, match=r"data.jsonl:4: .*1 <\|image_pad\|> placeholder\(s\) where 0 belong"):
        encoder.encode(Sample([{"role": "user", "content": "<|image_pad|>"}, {"role": "assistant", "content": "x"}],
                              source="data.jsonl:4"))  # fmt: skip
    with pytest.raises(DataError, match=r"data.jsonl:5: .*1 <\|video_pad\|> placeholder\(s\) where 0 belong"):
        encoder.encode(Sample([{"role": "user", "content": "<image> <|video_pad|>"}, {"role": "assistant", "content": "x"}],
                              [RED], source="data.jsonl:5"))  # fmt: skip


def test_a_tokenizer_is_not_a_qwen_processor(processor):
    with pytest.raises(ConfigError, match="needs a Qwen-VL processor"):
        QwenVLEncoder(processor.tokenizer)


# -- model types and loading --------------------------------------------------------------


def test_model_type_is_detected(kind, tiny, plugin_manager):
    spec, how = detect_model_type(tiny, plugin_manager.registries.models)
    assert spec.name == kind
    assert "architectures" in how
    assert spec.default_template == "qwen2-vl" and spec.supports_packing and spec.supports_multi_image


def test_model_type_contract_and_loader(kind, tiny, plugin_manager):
    spec = plugin_manager.registries.models.get(kind)
    model, processor = check_model_type(spec, tiny, LoadOptions(device="cpu", dtype="bfloat16"))
    assert type(model).__name__ == CLASSES[kind]
    assert model.dtype == torch.bfloat16
    assert model.config._attn_implementation == "sdpa"
    assert type(processor).__name__ == CLASSES[kind].replace("ForConditionalGeneration", "Processor")
    assert processor.chat_template and processor.tokenizer.pad_token is not None
    # The parts are disjoint and together hold every parameter.
    names = [name for name, _ in model.named_parameters()]
    parts = [spec.vision_tower, spec.projector, spec.language_model]
    for name in names:
        owners = [p for p in parts if any(name == x or name.startswith(x + ".") for x in p)]
        assert len(owners) == 1, name


def test_training_load_turns_the_cache_off_and_feeds_grads_to_the_inputs(kind, tiny):
    model, _ = load_qwen_vl(kind, str(tiny), LoadOptions(device="cpu", for_training=True))
    assert model.config.text_config.use_cache is False
    assert model.get_input_embeddings()(torch.tensor([[1, 2]])).requires_grad


def test_quantized_load_keeps_the_vision_encoder_and_head_in_full_precision(kind, tiny, monkeypatch):
    """The config the loader hands from_pretrained on a CUDA machine, applied by transformers' own quantizer."""
    pytest.importorskip("bitsandbytes")
    import vistune.causal_lm
    from transformers.quantizers import AutoHfQuantizer
    from vistune.quantization import get_scheme

    monkeypatch.setattr(vistune.causal_lm, "resolve_device", lambda device: "cuda")
    seen = {}

    class Stop(Exception):
        pass

    def from_pretrained(path, **kwargs):
        seen.update(kwargs)
        raise Stop

    model_class = getattr(transformers, CLASSES[kind])
    monkeypatch.setattr(model_class, "from_pretrained", from_pretrained)
    with pytest.raises(Stop):
        load_qwen_vl(kind, str(tiny), LoadOptions(dtype="bfloat16", quantization=get_scheme("nf4")))
    with torch.device("meta"):
        model = model_class(transformers.AutoConfig.from_pretrained(str(tiny)))
    quantizer = AutoHfQuantizer.from_config(seen["quantization_config"])
    quantizer.preprocess_model(model, dtype=torch.bfloat16, device_map=seen["device_map"])
    layers = {name: type(module).__name__ for name, module in model.named_modules()}
    linear = {name: layer for name, layer in layers.items() if "Linear" in layer}
    full = {name for name, layer in linear.items() if layer == "Linear"}
    kept = ("model.visual.", "lm_head")
    assert full == {name for name in linear if name.startswith(kept)}
    assert any(name.startswith("model.visual.merger.") for name in full)
    assert {linear[name] for name in linear if name not in full} == {"Linear4bit"}  # the language model


def test_aliases_name_the_hub_checkpoints(plugin_manager):
    aliases = plugin_manager.registries.checkpoints
    assert aliases.get("qwen2-vl-2b-instruct").hf_repo_id == "Qwen/Qwen2-VL-2B-Instruct"
    assert aliases.get("qwen2-vl-7b-instruct").model_type == "qwen2-vl"
    assert aliases.get("qwen2.5-vl-3b-instruct").hf_repo_id == "Qwen/Qwen2.5-VL-3B-Instruct"
    assert aliases.get("qwen2.5-vl-7b-instruct").model_type == "qwen2.5-vl"


def _hub_layout(tiny, processor, directory):
    """The files a hub Qwen-VL checkpoint has: preprocessor_config.json and chat_template.json, no processor_config.json."""
    directory.mkdir()
    for name in (
        "config.json",
        "generation_config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ):
        shutil.copy(tiny / name, directory / name)
    image_processor = processor.image_processor.to_dict()
    image_processor["processor_class"] = type(processor).__name__
    (directory / "preprocessor_config.json").write_text(json.dumps(image_processor))
    (directory / "chat_template.json").write_text(json.dumps({"chat_template": processor.chat_template}))
    return directory


def test_loader_reads_a_hub_layout_directory(kind, tiny, processor, tmp_path):
    directory = _hub_layout(tiny, processor, tmp_path / "hub")
    _, hub_processor = load_qwen_vl(kind, str(directory), LoadOptions(device="cpu"))
    assert hub_processor.chat_template == processor.chat_template
    sample = CASES["multi-turn"][0]
    ours, reference = QwenVLEncoder(hub_processor).encode(sample), QwenVLEncoder(processor).encode(sample)
    assert ours["input_ids"] == reference["input_ids"] and ours["labels"] == reference["labels"]
    torch.testing.assert_close(ours["pixel_values"], reference["pixel_values"], rtol=0, atol=0)


def test_processor_is_built_from_parts_when_from_pretrained_fails(kind, tiny, processor, tmp_path, monkeypatch):
    from vistune_qwen_vl import processor as processor_module

    def refuse(*args, **kwargs):
        raise OSError("cannot load a video processor")

    monkeypatch.setattr(processor_module.PROCESSOR_CLASSES[kind], "from_pretrained", refuse)
    for directory in (tiny, _hub_layout(tiny, processor, tmp_path / "hub")):
        built = load_processor(kind, directory)
        assert built.chat_template == processor.chat_template
        assert QwenVLEncoder(built).encode(CASES["single-image"][0])["input_ids"] == \
            QwenVLEncoder(processor).encode(CASES["single-image"][0])["input_ids"]  # fmt: skip


def test_saved_processor_records_the_real_processor_class(processor, tmp_path):
    processor.save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "processor_config.json").read_text())
    assert saved["processor_class"] == type(processor).__name__
    assert type(processor).__name__ in ("Qwen2VLProcessor", "Qwen2_5_VLProcessor")


# -- positions for packing ------------------------------------------------------------------


def test_packed_rows_with_mrope_positions_match_separate_samples(loaded, plugin_manager):
    """Three samples in one row, positioned by mrope_position_ids, give each sample's own logits."""
    model, processor = loaded
    assert load_ref(load_ref("vistune_qwen_vl.plugin:MROPE_POSITION_IDS")) is mrope_position_ids
    encoder = QwenVLEncoder(processor)
    encoded = [encoder.encode(CASES[name][0]) for name in ("multi-image", "text-only", "system-prompt")]
    collate = Collator(processor.tokenizer.pad_token_id)
    with torch.no_grad():
        separate = []
        for sample in encoded:
            batch = collate([sample])
            separate.append(model(**{k: v for k, v in batch.items() if k != "labels"}).logits[0])
        text = torch.cat([torch.arange(len(s["input_ids"])) for s in encoded])
        rope = torch.cat([mrope_position_ids(model, s["input_ids"], s.get("image_grid_thw")) for s in encoded], dim=1)
        packed = model(
            input_ids=torch.tensor([[t for s in encoded for t in s["input_ids"]]]),
            position_ids=torch.cat([text[None], rope])[:, None, :],
            pixel_values=torch.cat([s["pixel_values"] for s in encoded if "pixel_values" in s]),
            image_grid_thw=torch.cat([s["image_grid_thw"] for s in encoded if "image_grid_thw" in s]),
            mm_token_type_ids=torch.tensor([[t for s in encoded for t in s["mm_token_type_ids"]]]),
            use_cache=False,
        ).logits[0]
    torch.testing.assert_close(packed, torch.cat(separate), rtol=0, atol=1e-5)


def test_mrope_positions_equal_the_models_own(loaded):
    model, processor = loaded
    reference = hf_encoding(processor, CASES["multi-turn"][1])
    ids = reference["input_ids"][0]
    positions = mrope_position_ids(model, ids, reference["image_grid_thw"])
    assert positions.shape == (3, len(ids))
    with torch.no_grad():
        default = model(**reference).logits
        explicit = model(**reference, position_ids=positions[:, None, :]).logits
        reversed_order = model(**reference, position_ids=positions.flip(-1)[:, None, :]).logits
    torch.testing.assert_close(explicit, default, rtol=0, atol=1e-6)
    assert not torch.allclose(reversed_order, default, atol=1e-3)  # positions do matter: the check above can fail
