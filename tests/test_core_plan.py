"""Resolving configs into plans: the reference config on a machine without its model, data or GPUs."""

from __future__ import annotations

import importlib.util
import json

import pytest
from vistune import hookimpl
from vistune.cli import main
from vistune.config import load_config
from vistune.plan import make_plan
from vistune.plugins import PluginManager
from vistune.specs import Algorithm, Dataset, ModelAlias, ModelType, Reward, Template
from vistune.testing import check_dataset


class StandInLlavaModel:
    """What plugins/llava registers for the reference config, used while that distribution is not installed."""

    @hookimpl
    def vistune_register_models(self, register):
        register(ModelType("llava", loader="vistune_llava.loader:load_llava", default_template="llava-1.5",
                           architectures=("LlavaForConditionalGeneration",), hf_model_types=("llava",),
                           vision_tower=("model.vision_tower",), projector=("model.multi_modal_projector",),
                           language_model=("model.language_model", "lm_head")))  # fmt: skip
        register(ModelAlias("llava-v1.5-7b", model_type="llava", hf_repo_id="llava-hf/llava-1.5-7b-hf"))

    @hookimpl
    def vistune_register_templates(self, register):
        register(Template("llava-1.5", factory="vistune_llava.template:LlavaEncoder"))


class StandInLlavaDataset:
    @hookimpl
    def vistune_register_datasets(self, register):
        register(Dataset("llava-instruct-en", format="llava-instruct", data_file="llava_instruct_150k.json",
                         image_dir="coco/train2017", hf_repo_id="liuhaotian/LLaVA-Instruct-150K"))  # fmt: skip


@pytest.fixture
def llava(plugin_manager, register_plugin, monkeypatch, tmp_path):
    """The reference config's names registered, on a machine with no GPU and nothing downloaded."""
    if "llava-v1.5-7b" not in plugin_manager.registries.checkpoints:
        assert not register_plugin(StandInLlavaModel()).errors
    if "llava-instruct-en" not in plugin_manager.registries.datasets:
        assert not register_plugin(StandInLlavaDataset()).errors
    monkeypatch.setattr("vistune.plan.visible_gpu_count", lambda: 0)
    for name in ("VISTUNE_MODEL_LLAVA_V1_5_7B", "VISTUNE_DATASET_LLAVA_INSTRUCT_EN", "VISTUNE_MODELS_DIR",
                 "VISTUNE_DATA_DIR"):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # online, the run would download it
    return plugin_manager.registries


@pytest.fixture
def reference_config(tmp_path, reference_config_text):
    path = tmp_path / "reference.yaml"
    path.write_text(reference_config_text)
    return str(path)


def local_llava_copy(tmp_path, registries):
    """A llava-instruct dataset directory laid out as the dataset spec says."""
    from PIL import Image

    spec = registries.datasets.get("llava-instruct-en")
    data_dir = tmp_path / "llava-instruct"
    (data_dir / spec.image_dir).mkdir(parents=True)
    Image.new("RGB", (16, 16), (180, 30, 30)).save(data_dir / spec.image_dir / "000000001.jpg")
    record = {"id": "1", "image": "000000001.jpg", "conversations": [
        {"from": "human", "value": "<image>\nWhat is on the table?"}, {"from": "gpt", "value": "A red cup."}]}  # fmt: skip
    data_file = data_dir / (spec.data_file or "llava_instruct.json")
    data_file.write_text(json.dumps([record]))
    return data_dir


def problems_by_field(plan):
    out: dict[str, list[str]] = {}
    for problem in plan.problems:
        out.setdefault(problem.field, []).append(f"{problem.message} | fix: {problem.hint}")
    return out


def test_reference_config_dry_run_says_what_is_missing_and_how_to_fix_it(llava, reference_config, capsys):
    assert main(["sft", "--config", reference_config, "--dry-run"]) == 2  # not ready: a script can tell
    out = capsys.readouterr().out
    alias = llava.checkpoints.get("llava-v1.5-7b")
    dataset = llava.datasets.get("llava-instruct-en")
    assert out.startswith(f"vistune sft plan ({reference_config})")
    bitsandbytes_missing = importlib.util.find_spec("bitsandbytes") is None
    assert f"not ready: {5 if bitsandbytes_missing else 4} problem(s)" in out
    # the model: which Hugging Face repo to download and which key or variable names the local copy
    assert f"{reference_config}:1: model: 'llava-v1.5-7b' is the Hugging Face checkpoint {alias.hf_repo_id}" in out
    assert "HF_HUB_OFFLINE is set, so nothing is downloaded" in out
    assert f"`hf download {alias.hf_repo_id} --local-dir DIR` and set model_path: DIR" in out
    assert f"export {alias.env_var}=DIR" in out
    # the dataset: the same, with the layout the directory must have
    assert f"{reference_config}:3: dataset: dataset 'llava-instruct-en' is not on this machine" in out
    assert f"set dataset_path (or {dataset.env_var}) to its directory" in out
    assert dataset.hf_repo_id in out
    # four GPUs, and bitsandbytes on CUDA for q4_k_m
    assert f"{reference_config}:8: gpu_num: 4 GPU(s) per node asked for, but this machine has 0 visible GPU(s)" in out
    assert f"{reference_config}:4: quantization: quantization q4_k_m needs a CUDA GPU" in out
    assert "quantization  q4_k_m: bitsandbytes 4-bit NF4" in out
    if bitsandbytes_missing:
        assert "quantization q4_k_m needs the Python package(s) bitsandbytes" in out and "pip install bitsandbytes" in out
    # what did resolve
    model_type = llava.models.get(alias.model_type)
    assert f"template      {model_type.default_template}  [" in out
    # the adapter's options, as its spec declares them (the flat lora_target_modules of the file included)
    assert "lora          rank=8 alpha=16 dropout=0.05 target_modules=[q_proj, v_proj] scope=language_model" in out


def test_local_model_and_dataset_directories_make_those_problems_disappear(llava, reference_config, tmp_path, capsys,
                                                                           tiny_llava):
    model_dir, data_dir = tiny_llava, local_llava_copy(tmp_path, llava)
    loaded = load_config(reference_config, ["--model_path", str(model_dir), "--dataset_path", str(data_dir)], task="sft")
    plan = make_plan(loaded, __import__("vistune.plugins", fromlist=["x"]).get_plugin_manager())
    problems = problems_by_field(plan)
    assert set(problems) == {"gpu_num", "quantization"}, problems
    assert plan.model_dir == model_dir
    assert plan.model_type.name == llava.checkpoints.get("llava-v1.5-7b").model_type
    assert plan.dataset.data_file.is_file() and plan.dataset.format == "llava-instruct"
    assert ("model", f"llava-v1.5-7b -> {model_dir}  (model_path in the config)") in plan.lines
    (sample,) = check_dataset(llava.datasets.get("llava-instruct-en"), data_dir)  # the layout the hint describes
    assert sample.messages[-1] == {"role": "assistant", "content": "A red cup."}

    assert main(["sft", "--config", reference_config, "--model_path", str(model_dir), "--dataset_path", str(data_dir),
                 "--gpu_num", "1", "--quantization", "none", "--dry-run"]) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert out.rstrip().endswith("\nready"), out


def test_environment_variables_point_at_local_copies_too(llava, reference_config, tmp_path, monkeypatch, tiny_llava):
    model_dir, data_dir = tiny_llava, local_llava_copy(tmp_path, llava)
    monkeypatch.setenv(llava.checkpoints.get("llava-v1.5-7b").env_var, str(model_dir))
    monkeypatch.setenv(llava.datasets.get("llava-instruct-en").env_var, str(data_dir))
    from vistune.plugins import get_plugin_manager

    plan = make_plan(load_config(reference_config, task="sft"), get_plugin_manager())
    assert set(problems_by_field(plan)) == {"gpu_num", "quantization"}
    assert plan.model_dir == model_dir


def test_cpu_processes_are_allowed_when_asked_for(llava, reference_config, tmp_path):
    from vistune.plugins import get_plugin_manager

    plan = make_plan(load_config(reference_config, ["--device", "cpu"], task="sft"), get_plugin_manager())
    assert "gpu_num" not in problems_by_field(plan)
    assert plan.launch.processes_per_node == 4 and plan.launch.device == "cpu" and plan.launch.distributed


# -- other resolutions ------------------------------------------------------------------


@pytest.fixture
def pm(plugin_manager, monkeypatch):
    monkeypatch.setattr("vistune.plan.visible_gpu_count", lambda: 0)
    return plugin_manager


def plan_for(pm, tmp_path, text, task, *overrides):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    return make_plan(load_config(str(path), list(overrides), task=task), pm)


def test_model_directory_is_detected_from_config_json(pm, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    plan = plan_for(pm, tmp_path, f"model: {tmp_path / 'm'}\ndataset: shapes-captions\n", "sft")
    assert plan.model_type.name == "causal-lm" and plan.template.name == "chat-template"
    assert any(k == "model_type" and "config.json architectures ['LlamaForCausalLM']" in v for k, v in plan.lines)
    assert plan.ready, plan.render()
    assert plan.dataset.needs_build or plan.dataset.data_file.exists()


def test_hub_repo_id_offline_names_hf_download(pm, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-hf-cache"))
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    plan = plan_for(pm, tmp_path, "model: llava-hf/llava-1.5-7b-hf\n", "infer", "--dataset", "shapes-captions")
    (message,) = problems_by_field(plan)["model"]
    assert "'llava-hf/llava-1.5-7b-hf' is a Hugging Face repo id, which is not on this machine" in message
    assert "HF_HUB_OFFLINE is set" in message
    assert "`hf download llava-hf/llava-1.5-7b-hf --local-dir DIR`" in message and "huggingface-cli" not in message
    assert plan.model_download is None


def test_hub_ids_online_are_downloaded_by_the_run_not_the_plan(llava, pm, tmp_path, monkeypatch):
    import huggingface_hub

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda *a, **k: pytest.fail("the plan downloaded"))
    plan = plan_for(pm, tmp_path, "model: llava-v1.5-7b\n", "infer", "--dataset", "shapes-captions")
    assert plan.model_download == "llava-hf/llava-1.5-7b-hf" and plan.model_dir is None
    assert "model" not in problems_by_field(plan)
    assert plan.model_type.name == "llava" and plan.template.name == "llava-1.5"  # from the alias, before any download
    assert any(k == "model" and "will download llava-hf/llava-1.5-7b-hf from the hub" in v for k, v in plan.lines)
    # a repo id with no alias: its model type waits for its config.json
    raw = plan_for(pm, tmp_path, "model: someone/some-vlm\n", "infer", "--dataset", "shapes-captions")
    assert raw.model_download == "someone/some-vlm" and raw.model_type is None and raw.ready, raw.render()
    # a copy in the Hugging Face cache is used as it is
    snapshot = tmp_path / "empty-hf-cache" / "models--someone--some-vlm" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    cached = plan_for(pm, tmp_path, "model: someone/some-vlm\n", "infer", "--dataset", "shapes-captions")
    assert cached.model_download is None and cached.model_dir == snapshot and cached.model_type.name == "causal-lm"


def test_a_missing_local_path_is_not_taken_for_a_hub_id(pm, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    plan = plan_for(pm, tmp_path, "model: models/llava-typo\n", "infer", "--dataset", "shapes-captions")
    assert plan.model_download is None
    assert "'models/llava-typo' is neither a local directory nor a registered alias" in problems_by_field(plan)["model"][0]


def test_unknown_names_are_problems_with_suggestions(pm, tmp_path):
    plan = plan_for(pm, tmp_path, "model: nowhere\nadapter: lroa\nbackend: transformer\n", "rl", "--rewards", "[]")
    problems = problems_by_field(plan)
    assert "unknown adapters 'lroa' (did you mean 'lora'" in problems["adapter"][0]
    assert "unknown backends 'transformer' (did you mean 'transformers'?)" in problems["backend"][0]
    assert "RL needs at least one reward" in problems["rewards"][0]
    assert "needs a dataset" in problems["dataset"][0]


def test_rewards_from_a_local_file_and_from_plugins(pm, tmp_path, register_plugin):
    class Rewards:
        @hookimpl
        def vistune_register_rewards(self, register):
            register(Reward("plan-test-reward", factory=lambda: None))

    register_plugin(Rewards())
    (tmp_path / "my_rewards.py").write_text("def brevity(prompts, completions, **kw):\n    return [1.0] * len(completions)\n")
    rewards = f"[{tmp_path}/my_rewards.py:brevity, {{name: plan-test-reward, weight: 2}}, {tmp_path}/my_rewards.py:nope]"
    plan = plan_for(pm, tmp_path, "model: nowhere\n", "rl", "--rewards", rewards)
    assert [(r.name, r.weight, r.attribute) for r in plan.rewards] == [
        (f"{tmp_path}/my_rewards.py:brevity", 1.0, "brevity"), ("plan-test-reward", 2.0, None)]  # fmt: skip
    assert "defines no 'nope' (top-level names: brevity)" in problems_by_field(plan)["rewards"][0]


def test_a_reward_file_may_import_or_annotate_its_reward(pm, tmp_path):
    (tmp_path / "imports.py").write_text("from math import isclose as close_enough\nimport os.path\nscale: float = 2.0\n")
    (tmp_path / "star.py").write_text("from math import *\n")  # what it binds is known only once imported
    rewards = [f"{tmp_path}/imports.py:close_enough", f"{tmp_path}/imports.py:scale", f"{tmp_path}/star.py:isclose",
               f"{tmp_path}/imports.py:nope"]  # fmt: skip
    plan = plan_for(pm, tmp_path, "model: nowhere\n", "rl", "--rewards", f"[{', '.join(rewards)}]")
    assert [r.attribute for r in plan.rewards] == ["close_enough", "scale", "isclose"]
    (problem,) = problems_by_field(plan)["rewards"]
    assert "imports.py defines no 'nope' (top-level names: close_enough, os, scale)" in problem


def test_packing_needs_a_model_type_that_supports_it(pm, tmp_path, register_plugin):
    class NoPacking:
        @hookimpl
        def vistune_register_models(self, register):
            register(ModelType("plan-no-packing", loader="a.b:c", default_template="chat-template"))

    register_plugin(NoPacking())
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text("{}")
    plan = plan_for(pm, tmp_path, f"model: {tmp_path / 'm'}\nmodel_type: plan-no-packing\npacking: true\n", "sft")
    assert "cannot isolate packed samples" in problems_by_field(plan)["packing"][0]


def test_galore_refuses_per_part_learning_rates(pm, tmp_path):
    text = "model: nowhere\ndataset: shapes-captions\nadapter: galore\nprojector_lr: 0.001\nvision_tower_lr: 0.0001\n"
    plan = plan_for(pm, tmp_path, text, "sft", "--learning_rate", "0.0001")
    problems = problems_by_field(plan)
    assert "adapter galore trains with one learning rate, so projector_lr cannot differ" in problems["projector_lr"][0]
    assert "vision_tower_lr" not in problems  # equal to learning_rate: nothing to refuse


def test_export_needs_an_adapter_and_unused_keys_are_noted(pm, tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"]}')
    plan = plan_for(pm, tmp_path, f"model: {tmp_path / 'm'}\nport: 9000\n", "export")
    assert "export merges an adapter" in problems_by_field(plan)["adapter_path"][0]
    assert any(note.startswith("port (") and "is not used by `vistune export`" in note for note in plan.notes)


def test_keys_an_algorithm_reads_are_not_noted_as_unused(pm, tmp_path, register_plugin):
    class Offline:
        @hookimpl
        def vistune_register_algorithms(self, register):
            register(Algorithm("plan-offline", factory="a.b:c", pipeline="a.b:run", reads=("dataloader_num_workers",)))

    register_plugin(Offline())
    text = "model: nowhere\ndataset: shapes-captions\ndataloader_num_workers: 2\n"
    online = plan_for(pm, tmp_path, text, "rl", "--rewards", "[]")
    noted = [note for note in online.notes if note.startswith("dataloader_num_workers (")]
    assert noted and "is not used by `vistune rl`" in noted[0]
    offline = plan_for(pm, tmp_path, text, "rl", "--algorithm", "plan-offline")
    assert not any(note.startswith("dataloader_num_workers (") for note in offline.notes), offline.notes


def test_plugin_problems_are_shown_in_the_plan(pm, tmp_path, register_plugin):
    class Broken:
        @hookimpl
        def vistune_register_rewards(self, register):
            raise RuntimeError("plugin bug")

    register_plugin(Broken(), name="plan-broken", allow_errors=True)
    plan = plan_for(pm, tmp_path, "model: nowhere\n", "serve")
    assert any("plugin 'plan-broken'" in note and "plugin bug" in note for note in plan.notes)


def test_a_name_two_distributions_registered_fails_clearly_when_used(tmp_path, monkeypatch):
    monkeypatch.delenv("VISTUNE_STRICT_PLUGINS", raising=False)
    pm = PluginManager()

    class Twice:
        @hookimpl
        def vistune_register_rewards(self, register):
            register(Reward("bleu", factory=lambda: None))

        @hookimpl
        def vistune_register_models(self, register):
            register(ModelAlias("twice-7b", model_type="twice", hf_repo_id="org/twice-7b"))

        @hookimpl
        def vistune_register_datasets(self, register):
            register(Dataset("twice-data", format="messages"))

    pm.add_plugin(Twice(), name="twice-a", distribution="vistune-twice-a")
    pm.add_plugin(Twice(), name="twice-b", distribution="vistune-twice-b")
    plan = plan_for(pm, tmp_path, "model: twice-7b\ndataset: twice-data\nrewards: [bleu]\n", "rl")
    problems = problems_by_field(plan)
    for field, what in (("rewards", "rewards 'bleu'"), ("model", "checkpoints 'twice-7b'"),
                        ("dataset", "datasets 'twice-data'")):  # fmt: skip
        (problem,) = problems[field]
        assert problem.startswith(f"{what} is ambiguous: registered by plugin 'twice-a' (distribution "
                                  "'vistune-twice-a') and plugin 'twice-b' (distribution 'vistune-twice-b')")  # fmt: skip
    assert any("registered twice" in note for note in plan.notes)


def test_one_process_on_each_of_two_nodes_is_a_ddp_run(pm, tmp_path):
    plan = plan_for(pm, tmp_path, "model: nowhere\ndevice: cpu\nnnodes: 2\n", "sft")
    assert plan.launch.distributed and plan.launch.method == "ddp"
    assert ("launch", "ddp on cpu, 2 node(s) x 1 process(es)") in plan.lines
    assert "2 processes with parallel_method none: using ddp" in plan.notes
