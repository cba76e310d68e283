"""The Llava plugin's registrations, loaders and dataset alias, on the tiny offline checkpoints."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

from vistune.data.collate import Collator
from vistune.data.encoded import EncodedDataset
from vistune.data.locate import locate_dataset
from vistune.data.readers import read_dataset
from vistune.errors import ConfigError
from vistune.models import LoadOptions, detect_model_type
from vistune.quantization import get_scheme
from vistune.templates import IGNORE_INDEX
from vistune.testing import check_dataset, check_model_type
from vistune_llava import loading
from vistune_llava.encoder import llava_1_5_encoder

KINDS = {"llava": "tiny_llava", "llava-next": "tiny_llava_next"}
CLASSES = {"llava": "LlavaForConditionalGeneration", "llava-next": "LlavaNextForConditionalGeneration"}


def test_discovery_imports_nothing_heavy():
    code = (
        "import sys, vistune_llava.plugin\n"
        "heavy = [m for m in ('torch', 'transformers', 'PIL', 'peft') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == ""


def test_registrations(plugin_manager):
    registries = plugin_manager.registries
    assert registries.models.owner("llava").distribution == "vistune-llava"
    llava, nxt = registries.models.get("llava"), registries.models.get("llava-next")
    assert (llava.architectures, llava.hf_model_types) == (("LlavaForConditionalGeneration",), ("llava",))
    assert (nxt.architectures, nxt.hf_model_types) == (("LlavaNextForConditionalGeneration",), ("llava_next",))
    for spec in (llava, nxt):
        assert spec.supports_packing and spec.supports_multi_image
        assert spec.default_template in registries.templates
    assert llava.default_template == "llava-1.5"
    expected = {
        "llava-v1.5-7b": ("llava", "llava-hf/llava-1.5-7b-hf"),
        "llava-v1.5-13b": ("llava", "llava-hf/llava-1.5-13b-hf"),
        "llava-v1.6-mistral-7b": ("llava-next", "llava-hf/llava-v1.6-mistral-7b-hf"),
        "llava-v1.6-vicuna-7b": ("llava-next", "llava-hf/llava-v1.6-vicuna-7b-hf"),
    }
    for name, (model_type, repo) in expected.items():
        alias = registries.checkpoints.get(name)
        assert (alias.model_type, alias.hf_repo_id) == (model_type, repo)
    for name in ("llava-1.5", "llava-next", "llava-checkpoint"):
        assert registries.templates.owner(name).distribution == "vistune-llava"
    dataset = registries.datasets.get("llava-instruct-en")
    assert (dataset.format, dataset.data_file, dataset.image_dir, dataset.hf_repo_id) == (
        "llava-instruct", "llava_instruct_150k.json", "coco/train2017", "liuhaotian/LLaVA-Instruct-150K")  # fmt: skip


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_detect_model_type(kind, request, plugin_manager):
    directory = request.getfixturevalue(KINDS[kind])
    spec, how = detect_model_type(directory, plugin_manager.registries.models)
    assert spec.name == kind
    assert CLASSES[kind] in how


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_model_type_contract_and_module_names(kind, request, plugin_manager):
    directory = request.getfixturevalue(KINDS[kind])
    spec = plugin_manager.registries.models.get(kind)
    model, processor = check_model_type(spec, directory, LoadOptions(device="cpu"))
    assert type(model).__name__ == CLASSES[kind]
    assert type(processor).__name__ == {"llava": "LlavaProcessor", "llava-next": "LlavaNextProcessor"}[kind]
    names = {name for name, _ in model.named_modules()}
    assert {"model.vision_tower", "model.multi_modal_projector", "model.language_model", "lm_head"} <= names
    # dtype auto on CPU is float32; attention defaults to sdpa; loaded for inference
    assert next(model.parameters()).dtype == torch.float32
    assert model.config._attn_implementation == "sdpa"
    assert not model.training


def test_loader_options(tiny_llava):
    options = LoadOptions(device="cpu", dtype="bfloat16", attn_implementation="eager", for_training=True)
    model, _ = loading.load_llava(str(tiny_llava), options)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.config._attn_implementation == "eager"
    assert model.config.use_cache is False and model.config.text_config.use_cache is False


def test_quantization_on_cpu_is_a_clear_error(tiny_llava):
    with pytest.raises(ConfigError, match="quantization 'q4_k_m' .* needs a CUDA GPU, but the model loads on cpu"):
        loading.load_llava(str(tiny_llava), LoadOptions(device="cpu", quantization=get_scheme("q4_k_m")))


def test_cuda_without_a_gpu_is_a_clear_error(tiny_llava_next):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ConfigError, match="device is cuda but torch sees no CUDA GPU"):
        loading.load_llava_next(str(tiny_llava_next), LoadOptions(device="cuda"))


def test_quantized_load_keeps_vision_projector_and_head_in_full_precision(tiny_llava, monkeypatch):
    """What the loader hands from_pretrained on a CUDA machine with bitsandbytes (simulated here)."""
    import importlib.util

    import vistune.causal_lm

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(vistune.causal_lm, "resolve_device", lambda device: "cuda")
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: object() if name == "bitsandbytes" else find_spec(name, *a)
    )
    seen = {}

    class Stop(Exception):
        pass

    def from_pretrained(path, **kwargs):
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(transformers.LlavaForConditionalGeneration, "from_pretrained", from_pretrained)
    with pytest.raises(Stop):
        loading.load_llava(str(tiny_llava), LoadOptions(dtype="bfloat16", quantization=get_scheme("nf4")))
    config = seen["quantization_config"]
    assert config.load_in_4bit and config.bnb_4bit_quant_type == "nf4"
    assert seen["dtype"] == torch.bfloat16 and seen["device_map"] == {"": 0}
    # What transformers' own bitsandbytes quantizer does with that config, on the model's real module names.
    pytest.importorskip("bitsandbytes")
    from transformers.quantizers import AutoHfQuantizer

    with torch.device("meta"):
        model = transformers.LlavaForConditionalGeneration(transformers.AutoConfig.from_pretrained(str(tiny_llava)))
    AutoHfQuantizer.from_config(config).preprocess_model(model, dtype=torch.bfloat16, device_map=seen["device_map"])
    layers = {name: type(module).__name__ for name, module in model.named_modules()}
    linear = {name: layer for name, layer in layers.items() if "Linear" in layer}
    full = {name for name, layer in linear.items() if layer == "Linear"}
    kept = ("model.vision_tower", "model.multi_modal_projector", "lm_head")
    assert full == {name for name in linear if name.startswith(kept)}
    assert any(name.startswith("model.vision_tower.") for name in full)
    assert {linear[name] for name in linear if name not in full} == {"Linear4bit"}  # the language model


def test_old_processor_configs_are_completed_from_the_model(tiny_llava):
    """Checkpoints converted before processors counted image tokens have no patch_size in processor_config.json."""
    processor = transformers.AutoProcessor.from_pretrained(str(tiny_llava))
    config = transformers.AutoConfig.from_pretrained(str(tiny_llava))
    fields = ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens")
    expected = [getattr(processor, f) for f in fields]
    processor.patch_size = processor.vision_feature_select_strategy = None
    processor.num_additional_image_tokens = 0
    loading.complete_processor(processor, config)
    assert [getattr(processor, f) for f in fields] == expected == [8, "default", 1]


def _llava_instruct_copy(tmp_path, spec):
    """A local copy of the dataset in the layout plugins/llava/README.md describes."""
    root = tmp_path / "LLaVA-Instruct-150K"
    images = root / spec.image_dir
    images.mkdir(parents=True)
    Image.new("RGB", (64, 48), "red").save(images / "000000033471.jpg")
    Image.new("RGB", (48, 48), "blue").save(images / "000000052846.jpg")
    records = [
        {"id": "000000033471", "image": "000000033471.jpg", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the picture?"},
            {"from": "gpt", "value": "It is red."},
            {"from": "human", "value": "Is it large?"},
            {"from": "gpt", "value": "No, it is small."}]},
        {"id": "000000052846", "image": "000000052846.jpg", "conversations": [
            {"from": "human", "value": "Describe the image.\n<image>"},
            {"from": "gpt", "value": "A blue square."}]},
    ]  # fmt: skip
    (root / spec.data_file).write_text(json.dumps(records, indent=1))
    return root


def test_llava_instruct_alias_reads_encodes_and_trains(tmp_path, tiny_llava, plugin_manager):
    registries = plugin_manager.registries
    spec = registries.datasets.get("llava-instruct-en")
    root = _llava_instruct_copy(tmp_path, spec)
    records = check_dataset(spec, root)
    assert len(records) == 2

    location = locate_dataset("llava-instruct-en", registries.datasets, str(root))
    samples = read_dataset(location)
    assert len(samples) == 2
    first = samples[0]
    assert first.source == f"{root / spec.data_file}:2"
    assert first.columns == {"id": "000000033471"}
    assert [m["role"] for m in first.messages] == ["user", "assistant", "user", "assistant"]
    assert first.images[0].size == (64, 48)

    model, processor = loading.load_llava(str(tiny_llava), LoadOptions(device="cpu"))
    dataset = EncodedDataset(samples, llava_1_5_encoder(processor))
    batch = Collator(processor.tokenizer.pad_token_id)([dataset[0], dataset[1]])
    assert batch["pixel_values"].shape == (2, 3, 32, 32)
    supervised = batch["labels"][1][batch["labels"][1] != IGNORE_INDEX].tolist()
    assert processor.tokenizer.decode(supervised).strip() == "A blue square.</s>"
    with torch.no_grad():
        assert torch.isfinite(model(**batch).loss)
