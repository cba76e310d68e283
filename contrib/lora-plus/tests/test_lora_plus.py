"""LoRA+ as a third-party adapter: its option is checked like any key and reaches the optimizer."""

import importlib
import importlib.util
import json
from pathlib import Path

import pytest
import yaml
from vistune import hookimpl
from vistune.cli import main
from vistune.config import load_config
from vistune.errors import ConfigError
from vistune.testing import check_adapter, check_options


@pytest.fixture
def lora_plus(plugin_manager, register_plugin):
    """The lora-plus spec, from the installed distribution or, when it is not installed, from this checkout."""
    if "lora-plus" not in plugin_manager.infos:
        try:
            module = importlib.import_module("vistune_lora_plus")
        except ImportError:
            path = Path(__file__).parents[1] / "vistune_lora_plus.py"
            spec = importlib.util.spec_from_file_location("vistune_lora_plus", path)
            module = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(module)
        register_plugin(module, name="lora-plus")
    return plugin_manager.registries.adapters.get("lora-plus")


class TrainerRecorder:
    def __init__(self):
        self.trainers = []

    @hookimpl
    def vistune_trainer_created(self, trainer, config):
        self.trainers.append(trainer)


def test_declared_options_and_the_adapter_pass_their_contracts(lora_plus, tiny_llama):
    from transformers import AutoModelForCausalLM

    options = check_options(lora_plus)
    assert [o.name for o in options][-1] == "lr_ratio" and lora_plus.peft_adapter
    causal_lm = __import__("vistune.plugins", fromlist=["x"]).get_plugin_manager().registries.models.get("causal-lm")
    config = load_config(None, ["--adapter", "lora-plus", "--lora-plus.rank", "2"], task="sft").config
    trained = check_adapter(lora_plus, AutoModelForCausalLM.from_pretrained(tiny_llama), causal_lm, config)
    assert trained.peft_config["default"].r == 2


def test_lr_ratio_is_checked_where_it_is_written(lora_plus, tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("adapter: lora-plus\nlora-plus:\n  lr_ratio: 0.5\n")
    with pytest.raises(ConfigError, match=f"{path}:3: lora-plus.lr_ratio must be at least 1, got 0.5"):
        load_config(str(path), task="sft")
    path.write_text("adapter: lora-plus\nlora-plus:\n  lr_ratoi: 4\n")
    with pytest.raises(ConfigError, match=r"run.yaml:3: adapter lora-plus has no option 'lr_ratoi' \(did you mean lr_ratio\?\)"):
        load_config(str(path), task="sft")


def test_lr_ratio_reaches_the_optimizer_param_groups(lora_plus, tiny_llama, tmp_path, register_plugin):
    recorder = TrainerRecorder()
    register_plugin(recorder)
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Say {i}."},
                                                     {"role": "assistant", "content": f"{i} {i}"}]}) + "\n"
                            for i in range(4)))  # fmt: skip
    config = {"model": str(tiny_llama), "dataset": str(data), "adapter": "lora-plus", "device": "cpu",
              "dtype": "float32", "max_steps": 1, "learning_rate": 1e-3, "report_to": ["jsonl"],
              "output_dir": str(tmp_path / "out"), "lora-plus": {"lr_ratio": 4, "target_modules": "all-linear"}}  # fmt: skip
    (tmp_path / "run.yaml").write_text(yaml.safe_dump(config))
    assert main(["sft", "--config", str(tmp_path / "run.yaml")]) == 0
    trainer = recorder.trainers[-1]
    lr_of = {}
    for group in trainer.optimizer.param_groups:
        for param in group["params"]:
            lr_of[id(param)] = group["initial_lr"]  # the scheduler's base rate of the group
    names = {name: param for name, param in trainer.model.named_parameters() if param.requires_grad}
    a = [n for n in names if "lora_A" in n]
    b = [n for n in names if "lora_B" in n]
    assert a and b and len(a) == len(b)
    # LoRA+: eta_B = lambda * eta_A, with eta_A the run's learning rate
    assert [lr_of[id(names[n])] for n in a] == pytest.approx([1e-3] * len(a))
    assert [lr_of[id(names[n])] for n in b] == pytest.approx([4e-3] * len(b))
    assert (tmp_path / "out" / "adapter_config.json").is_file()  # saved as a plain peft adapter
