"""vistune's own default plugins, held to the same contracts as anyone's."""

from __future__ import annotations

import importlib

import pytest
from vistune.config import RunConfig, build_config
from vistune.specs import ModelType, load_ref
from vistune.templates import Sample
from vistune.testing import check_adapter, check_backend, check_dataset, check_model_type, check_template

DEFAULT_PLUGINS = {
    "causal-lm": {"models": ["causal-lm"], "templates": ["chat-template"]},
    "adapters": {"adapters": ["dora", "full", "galore", "lora", "qlora"]},
    "transformers-backend": {"backends": ["transformers"]},
    "embedded-datasets": {"datasets": ["shapes-captions", "shapes-captions-eval"]},
    "data-formats": {"formats": ["alpaca", "hf-disk", "hf-hub", "llava-instruct", "messages", "ms-swift",
                                 "prompt-completion", "sharegpt"]},
}


def test_default_plugins_load_cleanly_through_entry_points(plugin_manager):
    core = {name: info for name, info in plugin_manager.infos.items() if info.distribution == "vistune"}
    assert {name: info.registered for name, info in core.items()} == DEFAULT_PLUGINS
    assert all(info.loaded and not info.errors for info in core.values())


def test_default_plugins_reference_code_that_exists(plugin_manager):
    unresolved = []
    for kind, registry in plugin_manager.registries.by_kind.items():
        for spec in registry:
            if registry.owner(spec.name).distribution != "vistune":
                continue
            for field in ("loader", "factory", "apply", "merge", "builder", "read", "detect", "open_source",
                          "detect_source"):
                ref = getattr(spec, field, None)
                if isinstance(ref, str):
                    try:
                        load_ref(ref)
                    except (ImportError, AttributeError) as exc:
                        unresolved.append(f"{kind} {spec.name}: {field} {ref} ({type(exc).__name__}: {exc})")
    assert not unresolved, unresolved


def test_shapes_dataset_builds_and_keeps_its_contract(plugin_manager):
    spec = plugin_manager.registries.datasets.get("shapes-captions-eval")
    samples = check_dataset(spec)
    assert len(samples) == 40
    assert samples[0].messages[0]["content"].startswith("<image>") and samples[0].images[0].size == (32, 32)


@pytest.fixture
def causal_lm(plugin_manager):
    pytest.importorskip("vistune.causal_lm")
    return plugin_manager.registries.models.get("causal-lm")


def test_causal_lm_model_type_and_chat_template_keep_their_contracts(causal_lm, plugin_manager, tiny_llama):
    pytest.importorskip("vistune.chat_template")
    model, tokenizer = check_model_type(causal_lm, tiny_llama)
    sample = Sample(messages=[{"role": "user", "content": "What colour is the sky?"},
                              {"role": "assistant", "content": "The sky is blue."}])  # fmt: skip
    check_template(plugin_manager.registries.templates.get("chat-template"), tokenizer, sample)


@pytest.mark.parametrize("adapter", ["lora", "dora", "full"])
def test_default_adapters_keep_their_contracts(adapter, causal_lm, plugin_manager, tiny_llama):
    pytest.importorskip("vistune.adapters.lora")
    from vistune.models import LoadOptions

    model, _ = importlib.import_module("vistune.causal_lm").load_causal_lm(str(tiny_llama), LoadOptions(device="cpu"))
    spec = plugin_manager.registries.adapters.get(adapter)
    check_adapter(spec, model, causal_lm, RunConfig(task="sft", adapter=adapter))


def test_transformers_backend_keeps_its_contract(causal_lm, plugin_manager, tiny_llama):
    pytest.importorskip("vistune.inference.transformers_engine")
    engine = check_backend(plugin_manager.registries.backends.get("transformers"), tiny_llama, causal_lm,
                           RunConfig(task="infer", device="cpu"))  # fmt: skip
    close = getattr(engine, "close", None)
    if close:
        close()


TINY_LLAVA_TYPE = ModelType(
    "core-test-llava",
    loader="transformers:LlavaForConditionalGeneration.from_pretrained",
    default_template="chat-template",
    vision_tower=("model.vision_tower",),
    projector=("model.multi_modal_projector",),
    language_model=("model.language_model", "lm_head"),
)


@pytest.mark.parametrize(
    ("adapter", "options"),
    [
        ("lora", {}),  # q_proj/v_proj also name CLIP layers: LoRA must stay in the language model
        ("lora", {"freeze_vision_tower": False, "freeze_projector": False}),
        ("dora", {"lora_scope": "all"}),
        ("full", {}),
        ("full", {"freeze_vision_tower": False, "freeze_projector": True, "freeze_language_model": True}),
    ],
)
def test_default_adapters_respect_vision_parts(adapter, options, plugin_manager, tiny_llava):
    pytest.importorskip("vistune.adapters.lora")
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(tiny_llava)
    check_adapter(plugin_manager.registries.adapters.get(adapter), model, TINY_LLAVA_TYPE,
                  build_config({"task": "sft", "adapter": adapter, **options}).config)  # fmt: skip
