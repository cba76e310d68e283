"""A trained output used later: its recorded template is used, an adapter of another model type is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("peft")

from vistune.cli import main
from vistune.config import load_config
from vistune.demo.shapes import write_split
from vistune.models import RUN_FILE
from vistune.plan import make_plan


@pytest.fixture(scope="module")
def trained(tiny_llava, tmp_path_factory):
    """A LoRA adapter trained by ``vistune sft`` on the tiny Llava with a template that is not its type's default."""
    import yaml

    from vistune.plugins import get_plugin_manager

    if "llava" not in get_plugin_manager().registries.models:
        pytest.skip("the llava plugin is not installed (pip install -e plugins/llava)")
    root = tmp_path_factory.mktemp("trained")
    config = {"model": str(tiny_llava), "dataset": str(write_split(root, "train", count=4)), "output_dir": str(root / "out"),
              "template": "llava-next", "adapter": "lora", "max_steps": 1, "per_device_batch_size": 2,
              "dtype": "float32", "device": "cpu", "seed": 0}  # fmt: skip
    (root / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["sft", "--config", str(root / "run.yaml")]) == 0
    out = root / "out"
    assert json.loads((out / RUN_FILE).read_text())["template"] == "llava-next"
    return out


def plan_for(tmp_path, task, **values):
    import yaml

    from vistune.plugins import get_plugin_manager

    values.setdefault("dataset", "shapes-captions")
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(values))
    return make_plan(load_config(str(path), [], task=task), get_plugin_manager())


@pytest.mark.parametrize("task", ["infer", "serve"])
def test_the_template_an_adapter_was_trained_with_is_used(trained, tiny_llava, tmp_path, task):
    plan = plan_for(tmp_path, task, model=str(tiny_llava), adapter_path=str(trained))
    assert plan.template.name == "llava-next"  # the llava type's default is llava-1.5
    assert plan.config.template == "llava-next"  # what every engine reads
    line = dict(plan.lines)["template"]
    assert f"(recorded in {trained / RUN_FILE})" in line
    assert plan.ready, plan.render()


def test_the_template_of_a_trained_model_directory_is_used(trained, tmp_path):
    plan = plan_for(tmp_path, "infer", model=str(trained))
    assert plan.model_type.name == "llava" and plan.template.name == "llava-next"


def test_the_engine_encodes_with_the_recorded_template(trained, tiny_llava, tmp_path):
    from vistune.inference.backends import create_engine

    plan = plan_for(tmp_path, "infer", model=str(tiny_llava), adapter_path=str(trained), backend="transformers")
    from vistune import hub_chat_templates
    from vistune.templates import Sample

    engine = create_engine(plan)
    try:
        # llava-next renders Mistral's [INST]; the llava type's default, llava-1.5, renders Vicuna's USER:
        assert engine.encoder.template == hub_chat_templates.LLAVA_NEXT_MISTRAL
        ids = engine.encoder.encode_prompt(Sample([{"role": "user", "content": "Name a colour."}]))["input_ids"]
        text = engine.tokenizer.decode(ids)
        assert "[INST]" in text and "USER:" not in text
    finally:
        engine.close()


def test_a_template_other_than_the_recorded_one_is_noted(trained, tiny_llava, tmp_path):
    plan = plan_for(tmp_path, "infer", model=str(tiny_llava), adapter_path=str(trained), template="llava-1.5")
    assert plan.template.name == "llava-1.5"
    (note,) = [n for n in plan.notes if "records that the model was trained with" in n]
    assert str(trained / RUN_FILE) in note and "'llava-next'" in note and "'llava-1.5'" in note


def test_an_unknown_recorded_template_is_a_problem_naming_the_run_file(trained, tiny_llava, tmp_path):
    adapter = shutil.copytree(trained, tmp_path / "adapter")
    run = json.loads((adapter / RUN_FILE).read_text())
    (adapter / RUN_FILE).write_text(json.dumps(run | {"template": "no-such-template"}))
    plan = plan_for(tmp_path, "infer", model=str(tiny_llava), adapter_path=str(adapter))
    (problem,) = [p for p in plan.problems if p.field == "template"]
    assert problem.where == str(adapter / RUN_FILE) and "unknown templates 'no-such-template'" in problem.message


def test_an_adapter_of_another_model_type_is_refused_naming_its_run_file(trained, tiny_qwen2_vl, tmp_path, capsys):
    plan = plan_for(tmp_path, "infer", model=str(tiny_qwen2_vl), adapter_path=str(trained))
    (problem,) = [p for p in plan.problems if p.field == "adapter_path"]
    assert problem.message.startswith(f"{trained / RUN_FILE}: the adapter was trained on a llava model")
    assert "but model is a qwen2-vl model" in problem.message
    assert main(["infer", "--config", str(tmp_path / "run.yaml"), "--dry-run"]) == 2
    assert "the adapter was trained on a llava model" in capsys.readouterr().out


def peft_only_copy(trained: Path, tmp_path: Path, base: str | None = None) -> Path:
    """A copy of the adapter as peft alone writes it (no run file), its base model renamed to ``base``."""
    adapter = shutil.copytree(trained, tmp_path / "adapter")
    (adapter / RUN_FILE).unlink()
    if base is not None:
        config = json.loads((adapter / "adapter_config.json").read_text())
        (adapter / "adapter_config.json").write_text(json.dumps(config | {"base_model_name_or_path": base}))
    return adapter


def test_without_a_run_file_peft_s_base_model_decides(trained, tiny_llava, tiny_qwen2_vl, tmp_path):
    """An adapter written by peft alone: ``base_model_name_or_path`` names the tiny Llava's directory."""
    adapter = peft_only_copy(trained, tmp_path)
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == str(tiny_llava)
    plan = plan_for(tmp_path, "infer", model=str(tiny_qwen2_vl), adapter_path=str(adapter))
    (problem,) = [p for p in plan.problems if p.field == "adapter_path"]
    assert problem.message.startswith(f"{adapter / 'adapter_config.json'}: the adapter was trained on a llava model")
    assert plan_for(tmp_path, "infer", model=str(tiny_llava), adapter_path=str(adapter)).ready


def test_a_base_model_named_by_a_checkpoint_alias_is_recognised(trained, tiny_qwen2_vl, tmp_path):
    adapter = peft_only_copy(trained, tmp_path, "llava-hf/llava-1.5-7b-hf")
    plan = plan_for(tmp_path, "infer", model=str(tiny_qwen2_vl), adapter_path=str(adapter))
    (problem,) = [p for p in plan.problems if p.field == "adapter_path"]
    assert "'llava-hf/llava-1.5-7b-hf' is checkpoint 'llava-v1.5-7b'" in problem.message


def test_an_adapter_whose_base_cannot_be_found_is_noted(trained, tiny_qwen2_vl, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    adapter = peft_only_copy(trained, tmp_path, "someone/unknown-vlm")
    plan = plan_for(tmp_path, "infer", model=str(tiny_qwen2_vl), adapter_path=str(adapter))
    assert not [p for p in plan.problems if p.field == "adapter_path"]
    (note,) = [n for n in plan.notes if "cannot tell which model type the adapter" in n]
    assert "'someone/unknown-vlm' is not on this machine" in note and "qwen2-vl model" in note
