"""Deciding a checkpoint's model type: explicit model_type, then vistune's run file, then config.json."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from vistune.errors import RegistryError
from vistune.models import RUN_FILE, detect_model_type, hf_cache_dir
from vistune.registry import Owner, Registry
from vistune.specs import ModelType

OWNER = Owner("test-models", "vistune-test-models")


def model_type(name, architectures=(), hf_model_types=()):
    return ModelType(name, loader="a.b:c", default_template="chat-template", architectures=architectures,
                     hf_model_types=hf_model_types)  # fmt: skip


@pytest.fixture
def models():
    registry = Registry("models", ModelType)
    registry.add(model_type("llava", ("LlavaForConditionalGeneration",), ("llava",)), OWNER)
    registry.add(model_type("llava-variant"), OWNER)  # chosen explicitly or from the run file, never detected
    registry.add(model_type("qwen2-vl", ("Qwen2VLForConditionalGeneration",), ("qwen2_vl",)), OWNER)
    return registry


def checkpoint(directory, config=None, run=None):
    directory.mkdir()
    if config is not None:
        (directory / "config.json").write_text(json.dumps(config))
    if run is not None:
        (directory / RUN_FILE).write_text(json.dumps(run))
    return directory


LLAVA = {"architectures": ["LlavaForConditionalGeneration"], "model_type": "llava"}


def test_resolution_order(models, tmp_path):
    plain = checkpoint(tmp_path / "plain", LLAVA)
    assert detect_model_type(plain, models) == (models.get("llava"), "config.json architectures "
                                                "['LlavaForConditionalGeneration']")  # fmt: skip
    trained = checkpoint(tmp_path / "trained", LLAVA, run={"model_type": "llava-variant"})
    assert detect_model_type(trained, models) == (models.get("llava-variant"), f"{RUN_FILE} next to the checkpoint")
    # The explicit model_type wins over both.
    assert detect_model_type(trained, models, "qwen2-vl") == (models.get("qwen2-vl"), "model_type in the config")
    # config.json's model_type when no architecture matches; a run file needs no config.json (adapter directories).
    by_type = checkpoint(tmp_path / "by-type", {"architectures": ["Other"], "model_type": "qwen2_vl"})
    assert detect_model_type(by_type, models) == (models.get("qwen2-vl"), "config.json model_type 'qwen2_vl'")
    adapter = checkpoint(tmp_path / "adapter", run={"model_type": "llava"})
    assert detect_model_type(adapter, models)[0].name == "llava"
    untyped_run = checkpoint(tmp_path / "untyped-run", LLAVA, run={"model_type": None})
    assert detect_model_type(untyped_run, models)[0].name == "llava"


def test_unknown_explicit_type_lists_the_registered_ones(models, tmp_path):
    directory = checkpoint(tmp_path / "m", LLAVA)
    with pytest.raises(RegistryError) as info:
        detect_model_type(directory, models, "lava")
    assert info.value.message == (
        "model_type 'lava' is not registered (did you mean 'llava'?); "
        "registered: llava, llava-variant, qwen2-vl"
    )
    assert "register a new one with a plugin (PLUGINS.md, vistune_register_models)" in info.value.hint


def test_a_run_file_naming_an_unregistered_type_is_an_error_not_ignored(models, tmp_path):
    directory = checkpoint(tmp_path / "m", LLAVA, run={"model_type": "llava-deep-features"})
    with pytest.raises(RegistryError) as info:
        detect_model_type(directory, models)
    assert info.value.message.startswith(
        f"{directory / RUN_FILE} records model_type 'llava-deep-features', which no loaded plugin registers"
    )
    assert "registered: llava, llava-variant, qwen2-vl" in info.value.message
    assert "install the plugin that registers it" in info.value.hint and "vistune_register_models" in info.value.hint
    # An explicit model_type overrides the run file.
    assert detect_model_type(directory, models, "llava")[0].name == "llava"


def test_unknown_config_lists_candidates_and_how_to_register(models, tmp_path):
    directory = checkpoint(tmp_path / "m", {"architectures": ["MambaForCausalLM"], "model_type": "mamba"})
    with pytest.raises(RegistryError) as info:
        detect_model_type(directory, models)
    assert "no registered model type matches config.json (architectures ['MambaForCausalLM'], model_type 'mamba')" \
        in info.value.message  # fmt: skip
    assert info.value.message.endswith("registered: llava, llava-variant, qwen2-vl")
    assert "register a new one with a plugin (PLUGINS.md, vistune_register_models)" in info.value.hint
    with pytest.raises(RegistryError, match="has no config.json"):
        detect_model_type(checkpoint(tmp_path / "empty"), models)


@pytest.mark.parametrize(
    ("config", "how"),
    [(LLAVA, "config.json architectures ['LlavaForConditionalGeneration']"),
     ({"architectures": [], "model_type": "llava"}, "config.json model_type 'llava'")],
)  # fmt: skip
def test_ambiguous_config_names_every_candidate(models, tmp_path, config, how):
    models.add(model_type("other-llava", ("LlavaForConditionalGeneration",), ("llava",)), OWNER)
    with pytest.raises(RegistryError) as info:
        detect_model_type(checkpoint(tmp_path / "m", config), models)
    assert info.value.message == f"{tmp_path / 'm'}: {how} matches several model types (llava, other-llava)"
    assert info.value.hint.startswith("set model_type to one of them")
    assert "vistune_register_models" in info.value.hint


@pytest.mark.parametrize(
    "env",
    [
        {},
        {"XDG_CACHE_HOME": "{tmp}/xdg"},
        {"HF_HOME": "~/hf-home", "XDG_CACHE_HOME": "{tmp}/xdg"},
        {"HUGGINGFACE_HUB_CACHE": "{tmp}/legacy"},
        {"HF_HUB_CACHE": "~/hub", "HUGGINGFACE_HUB_CACHE": "{tmp}/legacy", "HF_HOME": "{tmp}/home"},
    ],
)
def test_hf_cache_dir_is_where_huggingface_hub_downloads(env, tmp_path, monkeypatch):
    pytest.importorskip("huggingface_hub")
    env = {name: value.format(tmp=tmp_path) for name, value in env.items()}
    for name in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    # huggingface_hub reads the environment when it is imported: ask a fresh interpreter
    reference = subprocess.run([sys.executable, "-c", "import huggingface_hub.constants as c; print(c.HF_HUB_CACHE)"],
                               capture_output=True, text=True, check=True).stdout.strip()  # fmt: skip
    assert hf_cache_dir() == Path(reference)
