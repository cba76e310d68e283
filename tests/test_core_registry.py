"""Typed registries and the spec classes they hold."""

from __future__ import annotations

import attrs
import pytest
from vistune import specs
from vistune.errors import RegistryError
from vistune.registry import KINDS, Owner, Registries, Registry

A = Owner("plugin-a", "dist-a")
B = Owner("plugin-b", "dist-b")


def reward(name="exact", factory="pkg.mod:make"):
    return specs.Reward(name, factory=factory)


def test_registry_is_typed():
    registry = Registry("rewards", specs.Reward)
    with pytest.raises(RegistryError, match=r"expected a vistune\.specs\.Reward"):
        registry.add(specs.Template("t", factory="pkg.mod:make"), A)
    registry.add(reward(), A)
    assert registry.get("exact").factory == "pkg.mod:make"
    assert registry.names() == ["exact"] and "exact" in registry and len(registry) == 1


def test_same_name_twice_names_both_distributions_and_later_use_fails_clearly():
    registry = Registry("rewards", specs.Reward)
    registry.add(reward(), A)
    with pytest.raises(RegistryError) as info:
        registry.add(reward(factory="other.mod:make"), B)
    assert "'dist-a'" in str(info.value) and "'dist-b'" in str(info.value)
    assert "VISTUNE_BLOCK_PLUGINS" in str(info.value)
    with pytest.raises(RegistryError, match=r"rewards 'exact' is ambiguous: registered by .*dist-a.* and .*dist-b"):
        registry.get("exact")
    registry.remove_owner("plugin-b")
    assert registry.get("exact").factory == "pkg.mod:make"


def test_removing_the_first_of_two_owners_leaves_the_name_to_the_second():
    registry = Registry("rewards", specs.Reward)
    registry.add(reward(), A)
    with pytest.raises(RegistryError):
        registry.add(reward(factory="other.mod:make"), B)
    registry.remove_owner("plugin-a")
    assert registry.get("exact").factory == "other.mod:make" and registry.owner("exact") == B


def test_unknown_name_suggests_close_ones_or_lists_all():
    registry = Registry("rewards", specs.Reward)
    for name in ("bleu", "exact-match", "format"):
        registry.add(reward(name), A)
    with pytest.raises(RegistryError, match=r"unknown rewards 'blue' \(did you mean 'bleu'\?\)"):
        registry.get("blue")
    assert "registered: bleu, exact-match, format" in registry.unknown_message("zzz")
    assert "no plugin registers any templates" in Registry("templates", specs.Template).unknown_message("x")


def test_registration_revalidates_specs():
    spec = reward()
    object.__setattr__(spec, "name", "Not A Name")  # what a plugin could do by hand to a frozen spec
    with pytest.raises(RegistryError, match=r"registered an invalid rewards entry .*lower-case name"):
        Registry("rewards", specs.Reward).add(spec, A)


def test_registries_route_specs_by_hook_and_class():
    registries = Registries()
    model = specs.ModelType("m", loader="pkg.mod:load", default_template="t")
    alias = specs.ModelAlias("m-7b", model_type="m", hf_repo_id="org/m-7b")
    assert registries.add("vistune_register_models", model, A) == "models"
    assert registries.add("vistune_register_models", alias, A) == "checkpoints"
    with pytest.raises(RegistryError, match=r"expected vistune\.specs\.ModelType or vistune\.specs\.ModelAlias"):
        registries.add("vistune_register_models", reward(), A)
    assert registries.registered_by("plugin-a") == {"models": ["m"], "checkpoints": ["m-7b"]}
    assert set(KINDS) == {"models", "checkpoints", "templates", "adapters", "algorithms", "rewards", "backends", "datasets",
                          "formats"}  # fmt: skip


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda: specs.Reward("Bad Name", factory="a.b:c"), "lower-case name"),
        (lambda: specs.Reward("ok", factory="not a ref"), "'package.module:attribute'"),
        (lambda: specs.ModelType("m", loader="a:b", default_template="Bad"), "default_template"),
        (lambda: specs.ModelAlias("m", model_type="m", hf_repo_id="no-slash"), "hf_repo_id"),
        (lambda: specs.Dataset("d", format="CSV files"), "format"),
        (lambda: specs.DataFormat("f"), "needs read .* or open_source"),
        (lambda: specs.DataFormat("f", detect="a:b", open_source="a:b"), "detect needs read"),
        (lambda: specs.DataFormat("f", read="a:b", detect_source="a:b"), "detect_source needs open_source"),
        (lambda: specs.Adapter("a", apply="a:b", requires=("",)), "non-empty strings"),
        (lambda: specs.Backend("b", factory="a:b", description=3), "description"),
    ],
)
def test_specs_validate_on_construction(build, message):
    with pytest.raises((ValueError, TypeError), match=message):
        build()


def test_specs_are_frozen_and_take_callables():
    spec = specs.Reward("r", factory=lambda: None)
    with pytest.raises(attrs.exceptions.FrozenInstanceError):
        spec.name = "other"
    assert specs.load_ref(spec.factory) is spec.factory
    assert specs.load_ref("os.path:join") is __import__("os").path.join
    assert specs.Adapter("a", apply="a:b", requires="peft").requires == ("peft",)


def test_env_vars_of_aliases_and_datasets():
    assert specs.env_var_for("MODEL", "llava-v1.5-7b") == "VISTUNE_MODEL_LLAVA_V1_5_7B"
    assert specs.ModelAlias("llava-v1.5-7b", model_type="llava", hf_repo_id="a/b").env_var == "VISTUNE_MODEL_LLAVA_V1_5_7B"
    assert specs.Dataset("llava-instruct-en", format="llava-instruct").env_var == "VISTUNE_DATASET_LLAVA_INSTRUCT_EN"
