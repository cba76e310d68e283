"""The hook specifications: their documentation, the register callback, and every hook called through pluggy."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import vistune
from vistune import hookimpl, hookspecs, specs
from vistune.config import LoadedConfig, RunConfig
from vistune.plan import Plan
from vistune.plugins import REGISTRATION_HOOKS, PluginManager, hook_names

LIFECYCLE_HOOKS = [
    "vistune_model_loaded",
    "vistune_adapter_applied",
    "vistune_trainer_created",
    "vistune_checkpoint_saved",
    "vistune_rollout_scored",
    "vistune_server_started",
]


def spec_args(name: str) -> list[str]:
    return list(inspect.signature(getattr(hookspecs, name)).parameters)


def test_hook_api_version_and_markers_are_published():
    assert isinstance(vistune.HOOK_API_VERSION, int) and vistune.HOOK_API_VERSION >= 1
    assert vistune.ENTRY_POINT_GROUP == "vistune"
    assert vistune.hookimpl.project_name == vistune.hookspec.project_name == "vistune"


def test_there_are_eight_registration_hooks_and_six_lifecycle_hooks():
    kinds = ["models", "templates", "adapters", "algorithms", "rewards", "backends", "datasets", "data_formats"]
    assert list(REGISTRATION_HOOKS) == [f"vistune_register_{kind}" for kind in kinds]
    assert sorted(hook_names()) == sorted([*REGISTRATION_HOOKS, *LIFECYCLE_HOOKS])
    for name in REGISTRATION_HOOKS:
        assert spec_args(name) == ["register"]


@pytest.mark.parametrize("name", sorted([*REGISTRATION_HOOKS, *LIFECYCLE_HOOKS]))
def test_every_hookspec_has_a_complete_docstring(name):
    function = getattr(hookspecs, name)
    doc = inspect.getdoc(function)
    summary = doc.splitlines()[0]
    assert summary.endswith(".") and len(summary) < 100, summary
    documented = re.findall(r":param (\w+):", doc)
    assert documented == spec_args(name)
    assert ":returns:" in doc
    assert re.search(r"^Called\b", doc, re.MULTILINE), "say when the hook is called"
    if function.vistune_spec.get("firstresult"):  # pluggy stores the hookspec options there
        assert "first non-None result" in doc
    assert all(p.annotation is not inspect.Parameter.empty for p in inspect.signature(function).parameters.values())


# -- registration hooks: each receives a register callback that fills a typed registry --


def _register_test(hook: str, kind: str, spec):
    pm = PluginManager()

    class Plugin:
        pass

    def implementation(register):
        register(spec)

    setattr(Plugin, hook, staticmethod(hookimpl(implementation)))
    info = pm.add_plugin(Plugin(), name="registering", distribution="dist-registering", version="2.0")
    assert not info.errors
    assert info.hooks == [hook]
    registry = pm.registries.by_kind[kind]
    assert registry.get(spec.name) is spec
    assert str(registry.owner(spec.name)) == "plugin 'registering' (distribution 'dist-registering')"
    assert info.registered == {kind: [spec.name]}


def test_vistune_register_models():
    _register_test("vistune_register_models", "models",
                   specs.ModelType("toy", loader="toy.load:load", default_template="toy-chat", architectures=["ToyForX"]))  # fmt: skip
    _register_test("vistune_register_models", "checkpoints",
                   specs.ModelAlias("toy-1b", model_type="toy", hf_repo_id="org/toy-1b"))  # fmt: skip


def test_vistune_register_templates():
    _register_test("vistune_register_templates", "templates", specs.Template("toy-chat", factory="toy.chat:Encoder"))


def test_vistune_register_adapters():
    _register_test("vistune_register_adapters", "adapters", specs.Adapter("toy-lora", apply="toy.lora:apply"))


def test_vistune_register_algorithms():
    _register_test("vistune_register_algorithms", "algorithms",
                   specs.Algorithm("toy-po", factory="toy.po:Algo", defaults={"epsilon_high": 0.28}))  # fmt: skip


def test_vistune_register_rewards():
    _register_test("vistune_register_rewards", "rewards", specs.Reward("toy-reward", factory=lambda: None))


def test_vistune_register_backends():
    _register_test("vistune_register_backends", "backends", specs.Backend("toy-engine", factory="toy.engine:Engine"))


def test_vistune_register_datasets():
    _register_test("vistune_register_datasets", "datasets",
                   specs.Dataset("toy-data", format="messages", data_file="train.jsonl"))  # fmt: skip


def test_vistune_register_data_formats():
    _register_test("vistune_register_data_formats", "formats",
                   specs.DataFormat("toy-records", read="toy.records:read", detect="toy.records:detect"))  # fmt: skip


# -- lifecycle hooks: called through the plugin manager with the documented arguments --


class Recorder:
    """Implements every lifecycle hook, taking every documented argument, and records the calls."""

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []


def _recording_impl(name):
    args = spec_args(name)
    namespace: dict = {}
    exec(f"def {name}(self, {', '.join(args)}):\n    self.calls.append(({name!r}, dict({', '.join(f'{a}={a}' for a in args)})))",
         namespace)  # fmt: skip
    return hookimpl(namespace[name])


for _name in LIFECYCLE_HOOKS:
    setattr(Recorder, _name, _recording_impl(_name))


class OnlyStep:
    """A plugin may accept only the arguments it needs."""

    def __init__(self):
        self.steps = []

    @hookimpl
    def vistune_checkpoint_saved(self, step):
        self.steps.append(step)


@pytest.fixture
def recorder(register_plugin):
    plugin = Recorder()
    info = register_plugin(plugin)
    assert not info.errors and info.hooks == sorted(LIFECYCLE_HOOKS)
    return plugin


def _plan(**kwargs) -> Plan:
    return Plan(LoadedConfig(RunConfig(task="sft"), {}), **kwargs)


def test_vistune_model_loaded(recorder, tmp_path):
    model, processor = object(), object()
    seen = []

    def loader(path, options):
        seen.append((path, options.for_training))
        return model, processor

    spec = specs.ModelType("toy", loader=loader, default_template="toy-chat")
    plan = _plan(model_dir=tmp_path, model_type=spec)
    from vistune.loading import load_model

    assert load_model(plan, for_training=True) == (model, processor)
    assert seen == [(str(tmp_path), True)]
    assert recorder.calls == [("vistune_model_loaded",
                               {"model": model, "processor": processor, "model_type": spec, "config": plan.config})]  # fmt: skip


def test_vistune_adapter_applied(recorder):
    wrapped = object()
    adapter = specs.Adapter("toy", apply=lambda model, model_type, config: wrapped)
    plan = _plan(model_type=specs.ModelType("toy", loader="a:b", default_template="t"), adapter=adapter)
    from vistune.loading import apply_adapter

    assert apply_adapter(plan, object()) is wrapped
    assert recorder.calls == [("vistune_adapter_applied", {"model": wrapped, "adapter": adapter, "config": plan.config})]


def test_vistune_trainer_created(recorder, plugin_manager):
    trainer, config = object(), RunConfig()
    assert plugin_manager.hook.vistune_trainer_created(trainer=trainer, config=config) == []
    assert recorder.calls == [("vistune_trainer_created", {"trainer": trainer, "config": config})]


def test_vistune_checkpoint_saved(recorder, plugin_manager, register_plugin):
    only_step = OnlyStep()
    register_plugin(only_step)
    config = RunConfig()
    plugin_manager.hook.vistune_checkpoint_saved(path="/out/checkpoint-5", step=5, config=config)
    assert recorder.calls == [("vistune_checkpoint_saved", {"path": "/out/checkpoint-5", "step": 5, "config": config})]
    assert only_step.steps == [5]


def test_vistune_rollout_scored(recorder, plugin_manager):
    kwargs = {"prompts": ["p", "p"], "completions": ["a", "b"], "rewards": {"bleu": [0.5, None]}, "step": 7}
    plugin_manager.hook.vistune_rollout_scored(**kwargs)
    assert recorder.calls == [("vistune_rollout_scored", kwargs)]


def test_vistune_server_started(recorder, plugin_manager):
    app, config = object(), RunConfig(task="serve")
    plugin_manager.hook.vistune_server_started(app=app, config=config)
    assert recorder.calls == [("vistune_server_started", {"app": app, "config": config})]


@pytest.mark.parametrize("name", LIFECYCLE_HOOKS)
def test_lifecycle_hook_arguments_match_the_plugin_guide(name):
    guide = (Path(__file__).parents[1] / "PLUGINS.md").read_text()
    section = guide.split(f"\n### {name}\n", 1)[1].split("\n### ", 1)[0]
    documented = re.findall(r"^- `(\w+)`", section, re.MULTILINE)
    assert documented == spec_args(name)
