"""``torch_compile``: when ``auto`` compiles, and how many steps a run plans."""

from types import SimpleNamespace

import pytest

from vistune.config import build_config
from vistune.errors import ConfigError
from vistune.training import compile as compile_module
from vistune.training.compile import AUTO_MIN_STEPS, compile_decision, planned_steps


@pytest.fixture
def toolchain(monkeypatch):
    """Pretend triton and a C compiler are present (the CPU machine may lack triton)."""
    monkeypatch.setattr(compile_module.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(compile_module.shutil, "which", lambda name: f"/usr/bin/{name}")


def test_auto_is_the_default_and_yaml_spellings_convert():
    assert build_config({"task": "sft"}).config.torch_compile == "auto"
    assert build_config({"task": "sft", "torch_compile": "AUTO"}).config.torch_compile == "auto"
    assert build_config({"task": "sft", "torch_compile": "yes"}).config.torch_compile is True
    assert build_config({"task": "sft", "torch_compile": False}).config.torch_compile is False
    with pytest.raises(ConfigError, match="torch_compile must be true, false or auto"):
        build_config({"task": "sft", "torch_compile": "sometimes"})


def test_auto_compiles_long_gpu_runs_only(toolchain):
    long_run = dict(device="cuda", planned_steps=AUTO_MIN_STEPS, parallel_method="none")
    assert compile_decision("auto", **long_run)[0] is True
    assert compile_decision("auto", **{**long_run, "parallel_method": "ddp"})[0] is True
    short, why = compile_decision("auto", **{**long_run, "planned_steps": AUTO_MIN_STEPS - 1})
    assert short is False and f"fewer than {AUTO_MIN_STEPS}" in why
    assert compile_decision("auto", **{**long_run, "planned_steps": None})[0] is False
    on_cpu, why = compile_decision("auto", **{**long_run, "device": "cpu"})
    assert on_cpu is False and "CPU" in why
    fsdp, why = compile_decision("auto", **{**long_run, "parallel_method": "fsdp"})
    assert fsdp is False and "FSDP" in why


def test_explicit_settings_win(toolchain):
    assert compile_decision(True, device="cuda", planned_steps=3, parallel_method="fsdp")[0] is True
    assert compile_decision(False, device="cuda", planned_steps=10_000, parallel_method="none")[0] is False
    assert compile_decision(True, device="cpu", planned_steps=10_000, parallel_method="none")[0] is False


def test_auto_needs_the_compiler_toolchain(monkeypatch):
    monkeypatch.setattr(compile_module.importlib.util, "find_spec", lambda name: None)
    chosen, why = compile_decision("auto", device="cuda", planned_steps=10_000, parallel_method="none")
    assert chosen is False and "triton" in why


def test_planned_steps_follow_the_trainer():
    from transformers import TrainingArguments

    def args(**kw):
        return TrainingArguments("unused", use_cpu=True, report_to="none", **{"num_train_epochs": 1, **kw})

    data = list(range(1000))
    assert planned_steps(args(per_device_train_batch_size=4), data, 1) == 250
    assert planned_steps(args(per_device_train_batch_size=4, num_train_epochs=2), data, 2) == 250
    assert planned_steps(args(per_device_train_batch_size=4, gradient_accumulation_steps=8), data, 1) == 32
    assert planned_steps(args(per_device_train_batch_size=4, max_steps=7), data, 1) == 7
    assert planned_steps(args(), SimpleNamespace(), 1) is None  # no length


def test_auto_leaves_quantized_models_alone(toolchain):
    chosen, why = compile_decision("auto", device="cuda", planned_steps=10_000, parallel_method="none", quantized=True)
    assert chosen is False and "quantized" in why
    assert compile_decision(True, device="cuda", planned_steps=10, parallel_method="none", quantized=True)[0] is True
