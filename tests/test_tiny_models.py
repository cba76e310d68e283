"""Tiny offline checkpoints: loadable with plain transformers, real chat templates, consistent image
tokens, finite loss, deterministic builds and generation, atomic cached builds."""

from __future__ import annotations

import hashlib
import json
import pickle
import subprocess
import sys
import time

import pytest

from vistune import tiny_models
from vistune.tiny_models import KINDS, build_tiny_model, build_tokenizer, load_tiny_processor, tiny_model_path

pytest.importorskip("transformers")
pytest.importorskip("PIL")

VLMS = [kind for kind in KINDS if kind != "llama"]

ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "llava": "LlavaForConditionalGeneration",
    "llava-next": "LlavaNextForConditionalGeneration",
    "qwen2-vl": "Qwen2VLForConditionalGeneration",
    "qwen2.5-vl": "Qwen2_5_VLForConditionalGeneration",
}

QUESTION = "What colour is the circle?"
# What each real template renders for one user turn (an image, then QUESTION) plus the generation prompt.
QWEN_PROMPT = (
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
    f"<|vision_start|><|image_pad|><|vision_end|>{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
)
PROMPTS = {
    "llama": f"<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n{QUESTION}<|im_end|>\n"
    "<|im_start|>assistant\n",
    "llava": f"USER: <image>\n{QUESTION} ASSISTANT:",
    "llava-next": f"[INST] <image>\n{QUESTION} [/INST]",
    "qwen2-vl": QWEN_PROMPT,
    "qwen2.5-vl": QWEN_PROMPT,
}


@pytest.fixture(scope="session")
def cache_root(tmp_path_factory):
    return tmp_path_factory.mktemp("vistune-cache")


@pytest.fixture(scope="session")
def tiny(cache_root):
    """kind -> directory, each built once for the whole session."""
    return {kind: tiny_model_path(kind, cache_dir=cache_root) for kind in KINDS}


def load(kind, path):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    auto_class = AutoModelForCausalLM if kind == "llama" else AutoModelForImageTextToText
    return auto_class.from_pretrained(path), load_tiny_processor(kind, path)


def image(width=32, height=32):
    from PIL import Image

    return Image.new("RGB", (width, height), (220, 30, 30))


def messages(kind):
    if kind == "llama":
        return [{"role": "user", "content": QUESTION}]
    return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]


def prompt_inputs(kind, processor, images=None):
    text = processor.apply_chat_template(messages(kind), add_generation_prompt=True, tokenize=False)
    if kind == "llama":
        return processor(text, return_tensors="pt")
    return processor(text=text, images=images or [image()], return_tensors="pt")


def digest(path):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(path.iterdir())}


def test_importing_the_module_does_not_import_torch():
    code = "import sys, vistune.tiny_models; print(sorted({'torch', 'transformers', 'tokenizers'} & set(sys.modules)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_tokenizer_keeps_markup_tokens_whole_and_round_trips_text(tmp_path):
    from transformers import AutoTokenizer

    build_tokenizer(tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(tmp_path)
    assert 500 <= len(tokenizer) <= 1000
    for token in ("<image>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
                  "<pad>", "<s>", "</s>", "<unk>"):  # fmt: skip
        assert tokenizer.encode(token, add_special_tokens=False) == [tokenizer.convert_tokens_to_ids(token)]
    text = "USER: <image>\nIs the small red circle left of the blue star?\n\tAnswer: 42 (yes)"
    assert tokenizer.decode(tokenizer.encode(text, add_special_tokens=False)) == text
    # Trained on shapes captions: common words are whole tokens, not bytes.
    assert len(tokenizer.tokenize("a red circle")) == 3


@pytest.mark.parametrize("kind", KINDS)
def test_checkpoint_loads_with_plain_transformers(kind, tiny):
    model, processor = load(kind, tiny[kind])
    tokenizer = processor if kind == "llama" else processor.tokenizer
    assert type(model).__name__ == ARCHITECTURES[kind]
    assert json.loads((tiny[kind] / "config.json").read_text())["architectures"] == [ARCHITECTURES[kind]]
    assert model.config.get_text_config().vocab_size == len(tokenizer)
    text_config = model.config.get_text_config()
    assert text_config.hidden_size // text_config.num_attention_heads >= 32  # vLLM's CPU attention needs it
    assert sum(f.stat().st_size for f in tiny[kind].iterdir()) < 10 * 2**20


@pytest.mark.parametrize("kind", KINDS)
def test_chat_template_is_the_real_one(kind, tiny):
    processor = load_tiny_processor(kind, tiny[kind])
    assert processor.apply_chat_template(messages(kind), add_generation_prompt=True, tokenize=False) == PROMPTS[kind]


@pytest.mark.parametrize("kind", ["llava", "llava-next"])
def test_llava_autoprocessor_matches_the_model(kind, tiny):
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny[kind])
    model, _ = load(kind, tiny[kind])
    assert processor.image_token_id == model.config.image_token_id
    assert processor.patch_size == model.config.vision_config.patch_size
    assert processor.vision_feature_select_strategy == model.config.vision_feature_select_strategy


@pytest.mark.parametrize("kind", ["qwen2-vl", "qwen2.5-vl"])
def test_qwen_processor_is_saved_under_its_real_name_and_pickles(kind, tiny):
    processor = load_tiny_processor(kind, tiny[kind])
    saved = json.loads((tiny[kind] / "processor_config.json").read_text())
    assert saved["processor_class"] == type(processor).__name__ == ARCHITECTURES[kind].replace(
        "ForConditionalGeneration", "Processor"
    )
    clone = pickle.loads(pickle.dumps(processor))  # datasets.map and DataLoader workers do this
    assert type(clone) is type(processor)
    assert prompt_inputs(kind, clone)["input_ids"].tolist() == prompt_inputs(kind, processor)["input_ids"].tolist()


def test_llava_has_16_image_tokens_per_image(tiny):
    model, processor = load("llava", tiny["llava"])
    inputs = prompt_inputs("llava", processor)
    # (32 / 8)^2 patches; the CLS token is dropped by the "default" feature strategy.
    assert (inputs["input_ids"] == model.config.image_token_id).sum().item() == 16


def test_llava_next_counts_the_tiles_the_overview_and_the_row_ends(tiny):
    model, processor = load("llava-next", tiny["llava-next"])
    inputs = prompt_inputs("llava-next", processor)
    # A 32x32 image fits the 32x32 pinpoint: one 4x4 tile with 4 row-end tokens, plus the 4x4 overview.
    assert (inputs["input_ids"] == model.config.image_token_id).sum().item() == 16 + 16 + 4
    assert inputs["pixel_values"].shape[1] == 2  # overview + one tile


@pytest.mark.parametrize("kind", ["qwen2-vl", "qwen2.5-vl"])
@pytest.mark.parametrize(("width", "height", "tokens"), [(32, 32, 4), (64, 48, 12), (200, 200, 16)])
def test_qwen_image_tokens_follow_the_grid(kind, tiny, width, height, tokens):
    model, processor = load(kind, tiny[kind])
    inputs = prompt_inputs(kind, processor, images=[image(width, height)])
    merge = model.config.vision_config.spatial_merge_size
    expected = inputs["image_grid_thw"].prod().item() // merge**2
    assert expected == tokens  # small min/max pixels: a handful of tokens, at most 16
    assert (inputs["input_ids"] == model.config.image_token_id).sum().item() == expected


@pytest.mark.parametrize("kind", KINDS)
def test_forward_with_labels_gives_a_finite_loss(kind, tiny):
    import torch

    model, processor = load(kind, tiny[kind])
    inputs = prompt_inputs(kind, processor)
    loss = model(**inputs, labels=inputs["input_ids"]).loss
    assert torch.isfinite(loss)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("kind", VLMS)
def test_forward_batches_images_of_different_sizes(kind, tiny):
    import torch

    model, processor = load(kind, tiny[kind])
    texts = [processor.apply_chat_template(messages(kind), add_generation_prompt=True, tokenize=False)] * 2
    inputs = processor(text=texts, images=[image(32, 32), image(64, 32)], padding=True, return_tensors="pt")
    assert torch.isfinite(model(**inputs, labels=inputs["input_ids"]).loss)


@pytest.mark.parametrize("kind", KINDS)
def test_greedy_generation_is_deterministic(kind, tiny):
    model, processor = load(kind, tiny[kind])
    inputs = prompt_inputs(kind, processor)
    first = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    again = model.generate(**inputs, max_new_tokens=4, do_sample=False)
    assert first.shape[1] > inputs["input_ids"].shape[1]
    assert first.tolist() == again.tolist()


@pytest.mark.parametrize("kind", KINDS)
def test_builds_are_byte_identical(kind, tiny, tmp_path):
    assert digest(build_tiny_model(kind, tmp_path / kind)) == digest(tiny[kind])


def test_build_does_not_disturb_the_callers_random_stream(tmp_path):
    import torch

    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    build_tiny_model("llama", tmp_path)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_model_path_reuses_the_cached_build(tiny, cache_root, monkeypatch):
    def no_rebuild(kind, path):
        raise AssertionError("rebuilt a cached model")

    monkeypatch.setattr(tiny_models, "build_tiny_model", no_rebuild)
    start = time.perf_counter()
    assert tiny_model_path("llava", cache_dir=cache_root) == tiny["llava"]
    assert time.perf_counter() - start < 0.5
    assert tiny["llava"] == cache_root / "tiny-models" / tiny_models.FORMAT_VERSION / "llava"


def test_tiny_model_path_defaults_to_vistune_cache_dir(tmp_path, monkeypatch):
    built = []

    def fake_build(kind, path):
        built.append(kind)
        (path / "config.json").write_text("{}")
        return path

    monkeypatch.setattr(tiny_models, "build_tiny_model", fake_build)
    monkeypatch.setenv("VISTUNE_CACHE_DIR", str(tmp_path))
    path = tiny_model_path("qwen2-vl")
    assert path == tmp_path / "tiny-models" / tiny_models.FORMAT_VERSION / "qwen2-vl"
    assert (path / "config.json").exists()
    assert tiny_model_path("qwen2-vl") == path
    assert built == ["qwen2-vl"]


def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    def crashing_build(kind, path):
        (path / "config.json").write_text("{}")  # half-written, then the builder dies
        raise RuntimeError("out of disk")

    monkeypatch.setattr(tiny_models, "build_tiny_model", crashing_build)
    with pytest.raises(RuntimeError, match="out of disk"):
        tiny_model_path("llama", cache_dir=tmp_path)
    parent = tmp_path / "tiny-models" / tiny_models.FORMAT_VERSION
    assert list(parent.iterdir()) == []


def test_a_build_finished_elsewhere_meanwhile_wins(tmp_path, monkeypatch):
    final = tmp_path / "tiny-models" / tiny_models.FORMAT_VERSION / "llama"

    def racing_build(kind, path):
        # Another process renames its complete build into place while this one is still building.
        final.mkdir()
        (final / "config.json").write_text('{"winner": true}')
        (path / "config.json").write_text("{}")
        return path

    monkeypatch.setattr(tiny_models, "build_tiny_model", racing_build)
    assert tiny_model_path("llama", cache_dir=tmp_path) == final
    assert json.loads((final / "config.json").read_text()) == {"winner": True}
    assert [p.name for p in final.parent.iterdir()] == ["llama"]


def test_unknown_kind_is_refused(tmp_path):
    with pytest.raises(ValueError, match="llava-next"):
        tiny_model_path("gpt-5", cache_dir=tmp_path)
