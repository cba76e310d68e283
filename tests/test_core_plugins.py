"""Loading plugins one at a time: a broken plugin is reported by name and the others keep working."""

from __future__ import annotations

import json
import re
import types
from pathlib import Path

import pytest
import vistune
from vistune import hookimpl
from vistune.errors import PluginError, RegistryError
from vistune.plugins import PluginManager
from vistune.specs import Reward

CORE = Path(vistune.__file__).parent


def reward_plugin(*names, api=None):
    """A plugin module registering one reward per name."""
    module = types.ModuleType("reward_plugin")

    @hookimpl
    def vistune_register_rewards(register):
        for name in names:
            register(Reward(name, factory="pkg.mod:make"))

    module.vistune_register_rewards = vistune_register_rewards
    if api is not None:
        module.VISTUNE_HOOK_API = api
    return module


class Misspelled:
    @hookimpl
    def vistune_register_reward(self, register):
        raise AssertionError("never called")


class WrongArgument:
    @hookimpl
    def vistune_register_rewards(self, registr):
        raise AssertionError("never called")


class Undecorated:
    def vistune_register_rewards(self, register):
        raise AssertionError("never called")


class RegistersGarbage:
    @hookimpl
    def vistune_register_rewards(self, register):
        register(Reward("kept", factory="pkg.mod:make"))
        register("not a spec")


class Raises:
    @hookimpl
    def vistune_register_rewards(self, register):
        raise RuntimeError("boom")


class RaisesVistuneError:
    @hookimpl
    def vistune_register_rewards(self, register):
        raise RegistryError("the plugin's own check failed")


def load(pm: PluginManager, plugin, name: str):
    return pm.add_plugin(plugin, name=name, distribution=f"dist-{name}", version="1.0")


@pytest.fixture
def lenient(monkeypatch):
    monkeypatch.delenv("VISTUNE_STRICT_PLUGINS", raising=False)
    return PluginManager()


@pytest.mark.parametrize(
    ("plugin", "expected"),
    [
        (Misspelled(), r"has an invalid hook implementation.*unknown hook 'vistune_register_reward'.*"
                       r"did you mean vistune_register_rewards\?"),
        (WrongArgument(), r"has an invalid hook implementation.*'registr'.*"
                          r"vistune_register_rewards takes register; registr is not one of them"),
        (Undecorated(), r"defines vistune_register_rewards\(\) without the @vistune\.hookimpl decorator"),
        (RegistersGarbage(), r"could not register a spec in vistune_register_rewards.*'not a spec'"),
        (Raises(), r"raised in vistune_register_rewards: RuntimeError: boom"),
        (RaisesVistuneError(), r"raised in vistune_register_rewards: RegistryError: the plugin's own check failed"),
        (reward_plugin("x", api=vistune.HOOK_API_VERSION + 1),
         rf"needs hook API {vistune.HOOK_API_VERSION + 1} but this vistune provides {vistune.HOOK_API_VERSION}"
         r".*upgrade vistune or install an older release"),
        (reward_plugin("x", api="2"), r"needs hook API '2'"),
    ],
)  # fmt: skip
def test_a_broken_plugin_is_reported_by_name_and_the_others_keep_working(lenient, plugin, expected):
    load(lenient, reward_plugin("before"), "good-1")
    info = load(lenient, plugin, "bad")
    load(lenient, reward_plugin("after"), "good-2")
    assert len(info.errors) == 1
    assert info.errors[0].startswith("plugin 'bad' from distribution 'dist-bad' ")
    assert re.search(expected, info.errors[0], re.DOTALL), info.errors[0]
    assert lenient.errors() == info.errors
    assert {"before", "after"} <= set(lenient.registries.rewards.names())
    assert lenient.infos["good-2"].registered == {"rewards": ["after"]}


@pytest.mark.parametrize("plugin", [Misspelled(), WrongArgument(), Undecorated(), RegistersGarbage(), Raises(),
                                    RaisesVistuneError(), reward_plugin("x", api=99)])  # fmt: skip
def test_strict_mode_turns_every_plugin_problem_into_an_error(monkeypatch, plugin):
    monkeypatch.setenv("VISTUNE_STRICT_PLUGINS", "1")
    with pytest.raises(PluginError, match=r"^plugin 'bad' from distribution 'dist-bad' "):
        load(PluginManager(), plugin, "bad")


def test_invalid_hook_implementations_are_unregistered(lenient):
    info = load(lenient, Misspelled(), "bad")
    assert not info.loaded and info.hooks == []
    assert lenient.pm.get_plugin("bad") is None


def test_a_plugin_asking_for_the_current_hook_api_loads(lenient):
    info = load(lenient, reward_plugin("ok", api=vistune.HOOK_API_VERSION), "current")
    assert info.loaded and not info.errors and info.registered == {"rewards": ["ok"]}


def test_same_name_from_two_distributions_names_both_and_the_name_is_unusable(lenient):
    load(lenient, reward_plugin("bleu"), "first")
    info = load(lenient, reward_plugin("bleu", "only-second"), "second")
    assert "'dist-first'" in info.errors[0] and "'dist-second'" in info.errors[0]
    assert "registered twice" in info.errors[0]
    with pytest.raises(RegistryError, match=r"rewards 'bleu' is ambiguous: .*'dist-first'.*'dist-second'"):
        lenient.registries.rewards.get("bleu")
    assert lenient.registries.rewards.get("only-second").name == "only-second"


def test_the_same_plugin_name_cannot_be_added_twice(lenient):
    load(lenient, reward_plugin("a"), "twice")
    with pytest.raises(PluginError, match="already loaded"):
        load(lenient, reward_plugin("b"), "twice")


def test_remove_plugin_forgets_what_it_registered(lenient):
    load(lenient, reward_plugin("temporary"), "temp")
    lenient.remove_plugin("temp")
    assert "temporary" not in lenient.registries.rewards and "temp" not in lenient.infos


def test_debug_mode_prints_the_traceback(lenient, monkeypatch, capsys):
    monkeypatch.setenv("VISTUNE_DEBUG_PLUGINS", "1")
    load(lenient, Raises(), "bad")
    assert 'raise RuntimeError("boom")' in capsys.readouterr().err


def test_trace_mode_prints_hook_calls(monkeypatch, capsys):
    monkeypatch.setenv("VISTUNE_TRACE_HOOKS", "1")
    pm = PluginManager()
    load(pm, reward_plugin("traced"), "traced")
    pm.hook.vistune_checkpoint_saved(path="/tmp/ckpt", step=3, config=None)
    err = capsys.readouterr().err
    # registration hooks are traced by pluggy like every other hook, with their arguments
    assert "vistune_register_rewards [hook]\n      register: <register for plugin 'traced' (dist-traced)>\n" in err
    assert "finish vistune_register_rewards --> [] [hook]" in err
    assert "vistune_checkpoint_saved [hook]\n      path: /tmp/ckpt\n      step: 3\n" in err


def ordered_plugin(name: str, calls: list[str], **marks):
    """A plugin module that records when its registration hook runs; ``marks`` go to ``@hookimpl``."""
    module = types.ModuleType(name)

    @hookimpl(**marks)
    def vistune_register_rewards(register):
        calls.append(name)
        register(Reward(name, factory="pkg.mod:make"))

    module.vistune_register_rewards = vistune_register_rewards
    return module


def test_registration_hooks_are_ordered_by_pluggy(lenient):
    """Loaded together (as entry points are), pluggy's order applies: tryfirst first, trylast last, else newest first."""
    calls: list[str] = []
    plugins = [ordered_plugin("early", calls, trylast=True), ordered_plugin("middle", calls),
               ordered_plugin("first", calls, tryfirst=True), ordered_plugin("late", calls)]  # fmt: skip
    added = [(plugin, lenient._register(plugin, plugin.__name__, "dist", "1")) for plugin in plugins]
    lenient._call_registration_hooks(added)
    assert calls == ["first", "late", "middle", "early"]
    assert all(not info.errors and info.registered == {"rewards": [info.name]} for _, info in added)


def test_a_hook_wrapper_wraps_each_plugin_s_registration(lenient):
    seen: list[tuple[str, list[str]]] = []

    class Wrapper:
        @hookimpl(wrapper=True)
        def vistune_register_rewards(self, register):
            before = list(lenient.registries.rewards.names())
            result = yield
            seen.append((repr(register), sorted(set(lenient.registries.rewards.names()) - set(before))))
            return result

    load(lenient, Wrapper(), "wrapper")
    load(lenient, reward_plugin("wrapped-a", "wrapped-b"), "wrapped")
    assert seen == [("<register for plugin 'wrapped' (dist-wrapped)>", ["wrapped-a", "wrapped-b"])]


def test_a_failing_hook_wrapper_is_named_and_the_plugin_s_own_error_too(lenient):
    class BadWrapper:
        @hookimpl(wrapper=True)
        def vistune_register_rewards(self, register):
            yield
            raise RuntimeError("wrapper bug")

    load(lenient, BadWrapper(), "bad-wrapper")
    info = load(lenient, reward_plugin("kept-through-wrapper"), "inner")
    assert lenient.infos["bad-wrapper"].errors == [
        "plugin 'bad-wrapper' from distribution 'dist-bad-wrapper' raised in vistune_register_rewards (a hook "
        "wrapper, while plugin 'inner' registered): RuntimeError: wrapper bug"]  # fmt: skip
    assert not info.errors and "kept-through-wrapper" in lenient.registries.rewards
    load(lenient, Raises(), "raises")
    assert lenient.infos["raises"].errors == [
        "plugin 'raises' from distribution 'dist-raises' raised in vistune_register_rewards: RuntimeError: boom"]


def test_core_never_imports_a_plugin_package():
    offenders = []
    for path in sorted(CORE.rglob("*.py")):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.match(r"\s*(import|from)\s+vistune_\w+", line):
                offenders.append(f"{path.relative_to(CORE)}:{number}: {line.strip()}")
    assert not offenders, offenders


def test_references_to_unregistered_model_types_and_templates_are_reported(lenient):
    from vistune.specs import ModelAlias, ModelType

    class Dangling:
        @hookimpl
        def vistune_register_models(self, register):
            register(ModelType("dangling", loader="a.b:c", default_template="no-such-template"))
            register(ModelAlias("dangling-7b", model_type="no-such-type", hf_repo_id="org/dangling-7b"))

    load(lenient, Dangling(), "dangling")
    lenient.check_references()
    assert lenient.infos["dangling"].errors == [
        "plugin 'dangling' from distribution 'dist-dangling' registers checkpoint 'dangling-7b' of model type "
        "'no-such-type', which no loaded plugin registers (hint: install the plugin that provides it, or fix the name)",
        "plugin 'dangling' from distribution 'dist-dangling' registers model type 'dangling' whose default template "
        "'no-such-template' no loaded plugin registers (hint: install the plugin that provides it, or fix the name)",
    ]


def test_list_marks_a_name_registered_twice_as_unusable(register_plugin, capsys, monkeypatch):
    from vistune.cli import main

    monkeypatch.delenv("VISTUNE_STRICT_PLUGINS", raising=False)
    register_plugin(reward_plugin("twice-registered"), name="first-owner")
    register_plugin(reward_plugin("twice-registered"), name="second-owner", allow_errors=True)
    assert main(["list", "rewards"]) == 0
    out = capsys.readouterr().out
    line = next(line for line in out.splitlines() if "twice-registered" in line)
    assert "AMBIGUOUS, not usable" in line and "first-owner" in line and "second-owner" in line
    assert main(["list", "rewards", "--json"]) == 0
    rows = [row for row in json.loads(capsys.readouterr().out) if row["name"] == "twice-registered"]
    assert len(rows) == 1 and len(rows[0]["ambiguous"]) == 2


def test_vistune_data_dir_generates_embedded_datasets_there(tmp_path, monkeypatch, plugin_manager):
    from vistune.data.locate import locate_dataset

    monkeypatch.setenv("VISTUNE_DATA_DIR", str(tmp_path))
    datasets = plugin_manager.registries.datasets
    embedded = next(spec for spec in datasets if spec.builder is not None)
    location = locate_dataset(embedded.name, datasets)
    assert location.found and location.needs_build
    assert location.data_file == tmp_path / embedded.name / embedded.data_file
    downloaded = next((spec for spec in datasets if spec.builder is None), None)
    if downloaded is not None:  # not generated: VISTUNE_DATA_DIR is only one place it may be
        missing = locate_dataset(downloaded.name, datasets)
        assert not missing.found and "is not on this machine" in missing.how
