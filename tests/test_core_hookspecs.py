"""The hook specifications: their documentation, the register callback, and every lifecycle hook fired by a real run."""

from __future__ import annotations

import inspect
import re
from pathlib import Path

import pytest
import vistune
from vistune import hookimpl, hookspecs, specs
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


# -- lifecycle hooks: fired by vistune's own pipelines, on tiny models, with the documented arguments --


class Recorder:
    """Implements every lifecycle hook, taking every documented argument, and records the calls.

    ``vistune_checkpoint_saved`` also records what the directory holds when the hook runs.
    """

    def __init__(self):
        self.calls: list[tuple[str, dict]] = []
        self.checkpoint_files: list[set[str]] = []

    def named(self, hook: str) -> list[dict]:
        return [kwargs for name, kwargs in self.calls if name == hook]


def _recording_impl(name):
    args = spec_args(name)
    namespace: dict = {}
    exec(f"def {name}(self, {', '.join(args)}):\n    self.calls.append(({name!r}, dict({', '.join(f'{a}={a}' for a in args)})))",
         namespace)  # fmt: skip
    return hookimpl(namespace[name])


for _name in LIFECYCLE_HOOKS:
    setattr(Recorder, _name, _recording_impl(_name))
_record_checkpoint = Recorder.vistune_checkpoint_saved


@hookimpl
def _checkpoint_saved(self, path, step, config):
    self.checkpoint_files.append({p.name for p in Path(path).iterdir()})
    _record_checkpoint(self, path, step, config)


Recorder.vistune_checkpoint_saved = _checkpoint_saved


class OnlyStep:
    """A plugin may accept only the arguments it needs."""

    def __init__(self):
        self.steps = []

    @hookimpl
    def vistune_checkpoint_saved(self, step):
        self.steps.append(step)


TEXT_RECORDS = [{"messages": [{"role": "user", "content": f"Name colour number {i}."},
                              {"role": "assistant", "content": f"a {c} circle"}]}
                for i, c in enumerate(["red", "green", "blue", "yellow"] * 2)]  # fmt: skip
REWARD = "def brevity(prompts, completions, **columns):\n    return [1.0 / (1 + len(c)) for c in completions]\n"


def _run(tmp_path, plugin_manager, task: str, *plugins, **values):
    """``vistune <task>`` on the tiny Llama through the CLI, with ``plugins`` loaded; returns the output dir."""
    import json

    import yaml
    from vistune.cli import main

    data = tmp_path / "text.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in TEXT_RECORDS))
    config = {"dataset": str(data), "output_dir": str(tmp_path / "out"), "device": "cpu", "dtype": "float32",
              "per_device_batch_size": 2, "seed": 0, "report_to": ["jsonl"], **values}  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    names = [f"lifecycle-{i}" for i in range(len(plugins))]
    for plugin, name in zip(plugins, names):
        assert not plugin_manager.add_plugin(plugin, name=name).errors
    try:
        assert main([task, "--config", str(tmp_path / "run.yaml")]) == 0
    finally:
        for name in names:
            plugin_manager.remove_plugin(name)
    return tmp_path / "out"


@pytest.fixture(scope="module")
def sft_run(tiny_llama, tmp_path_factory):
    """One ``vistune sft`` run (LoRA, 2 steps, a checkpoint each step) and the hook calls it made."""
    pytest.importorskip("peft")
    from vistune.plugins import get_plugin_manager

    recorder, only_step = Recorder(), OnlyStep()
    out = _run(tmp_path_factory.mktemp("sft"), get_plugin_manager(), "sft", recorder, only_step,
               model=str(tiny_llama), adapter="lora", max_steps=2, save_steps=1)  # fmt: skip
    return recorder, only_step, out


def test_vistune_model_loaded(sft_run, tiny_llama):
    from transformers import PreTrainedModel
    from vistune.plugins import get_plugin_manager

    recorder, _, out = sft_run
    (call,) = recorder.named("vistune_model_loaded")
    assert isinstance(call["model"], PreTrainedModel) and type(call["model"]).__name__ == "LlamaForCausalLM"
    assert call["model"].name_or_path == str(tiny_llama) and call["processor"].name_or_path == str(tiny_llama)
    assert call["model_type"] is get_plugin_manager().registries.models.get("causal-lm")
    assert (call["config"].task, call["config"].output_dir, call["config"].max_steps) == ("sft", str(out), 2)
    assert recorder.calls[0][0] == "vistune_model_loaded"


def test_vistune_adapter_applied(sft_run):
    from peft import PeftModel
    from vistune.plugins import get_plugin_manager

    recorder, _, _ = sft_run
    (loaded,) = recorder.named("vistune_model_loaded")
    (call,) = recorder.named("vistune_adapter_applied")
    assert isinstance(call["model"], PeftModel) and call["model"].get_base_model() is loaded["model"]
    assert call["adapter"] is get_plugin_manager().registries.adapters.get("lora")
    assert call["config"] is loaded["config"]
    names = [name for name, _ in recorder.calls]
    assert names.index("vistune_adapter_applied") < names.index("vistune_trainer_created")


def test_vistune_trainer_created(sft_run):
    from vistune.training.trainer import VistuneTrainer

    recorder, _, _ = sft_run
    (applied,) = recorder.named("vistune_adapter_applied")
    (call,) = recorder.named("vistune_trainer_created")
    assert isinstance(call["trainer"], VistuneTrainer) and call["trainer"].model is applied["model"]
    assert call["config"] is applied["config"]
    assert call["trainer"].state.global_step == 2  # the same trainer then trained


def test_vistune_checkpoint_saved(sft_run):
    from vistune.training.checkpoints import COMPLETE_MARKER

    recorder, only_step, out = sft_run
    calls = recorder.named("vistune_checkpoint_saved")
    assert [(c["path"], c["step"]) for c in calls] == [
        (str(out / "checkpoint-1"), 1), (str(out / "checkpoint-2"), 2), (str(out), 2)]  # fmt: skip
    (trained,) = recorder.named("vistune_trainer_created")
    assert all(c["config"] is trained["config"] for c in calls)
    # complete when the hook runs: the checkpoints carry their marker, the final output its weights
    assert all({COMPLETE_MARKER, "adapter_model.safetensors"} <= files for files in recorder.checkpoint_files[:2])
    assert "adapter_model.safetensors" in recorder.checkpoint_files[2]
    assert only_step.steps == [1, 2, 2]


def test_vistune_rollout_scored(tiny_llama, tmp_path, plugin_manager):
    recorder = Recorder()
    (tmp_path / "rewards.py").write_text(REWARD)
    _run(tmp_path, plugin_manager, "rl", recorder, model=str(tiny_llama), algorithm="grpo", max_steps=2,
         num_generations=3, max_completion_length=4, rewards=[f"{tmp_path / 'rewards.py'}:brevity"])  # fmt: skip
    calls = recorder.named("vistune_rollout_scored")
    assert [c["step"] for c in calls] == [0, 1]
    for call in calls:
        # 2 prompts per step, 3 completions each; the prompts are the dataset's conversations up to the question
        assert len(call["completions"]) == len(call["prompts"]) == 6
        assert all(isinstance(c, str) for c in call["completions"])
        assert all(p[-1]["role"] == "user" and p[-1]["content"].startswith("Name colour") for p in call["prompts"])
        assert call["rewards"] == {"rewards:brevity": [1.0 / (1 + len(c)) for c in call["completions"]]}


def test_vistune_server_started(tiny_llama, tmp_path, plugin_manager, monkeypatch):
    """``vistune serve``: the hook gets the application before it serves, and a route it adds is served."""
    httpx = pytest.importorskip("httpx")
    from vistune.serving.server import ServerThread

    answers = []

    class AddsRoute:
        @hookimpl
        def vistune_server_started(self, app, config):
            app.add_api_route("/hooked", lambda: {"model": config.model}, methods=["GET"])

    def serve(app, host, port):  # instead of serving until interrupted: one request, then return
        with ServerThread(app) as server:
            answers.append(httpx.get(server.url + "/hooked", timeout=30).json())

    monkeypatch.setattr("vistune.serving.server.serve", serve)
    recorder = Recorder()
    _run(tmp_path, plugin_manager, "serve", recorder, AddsRoute(), model=str(tiny_llama))
    (call,) = recorder.named("vistune_server_started")
    assert type(call["app"]).__name__ == "FastAPI" and call["config"].task == "serve"
    assert answers == [{"model": str(tiny_llama)}]
    (loaded,) = recorder.named("vistune_model_loaded")  # the serving engine loads through the hook too
    assert loaded["config"] is call["config"] and type(loaded["model"]).__name__ == "LlamaForCausalLM"


@pytest.mark.parametrize("name", LIFECYCLE_HOOKS)
def test_lifecycle_hook_arguments_match_the_plugin_guide(name):
    guide = (Path(__file__).parents[1] / "PLUGINS.md").read_text()
    section = guide.split(f"\n### {name}\n", 1)[1].split("\n### ", 1)[0]
    documented = re.findall(r"^- `(\w+)`", section, re.MULTILINE)
    assert documented == spec_args(name)
