"""``liger``: when ``auto`` applies Liger's kernels, and what ``true`` asks of the machine."""

from types import SimpleNamespace

import pytest

from vistune.config import build_config
from vistune.errors import ConfigError
from vistune.training import liger
from vistune.training.liger import liger_decision

LLAVA = SimpleNamespace(model_type="llava", text_config=SimpleNamespace(model_type="llama"))
#: Some of the model types liger-kernel 0.8.5 patches (its MODEL_TYPE_TO_APPLY_LIGER_FN).
LIGER_TYPES = frozenset({"llava", "llama", "qwen2", "qwen2_vl", "qwen2_vl_text", "qwen2_5_vl", "qwen2_5_vl_text"})
QWEN2_VL = SimpleNamespace(model_type="qwen2_vl", text_config=SimpleNamespace(model_type="qwen2_vl_text"))
ON_GPU = dict(task="sft", device="cuda", model_config=LLAVA)


def liger_found(monkeypatch, found: bool) -> None:
    """Make ``find_spec("liger_kernel")`` find the package or not; other packages are looked up as usual."""
    real = liger.importlib.util.find_spec
    fake = object() if found else None
    monkeypatch.setattr(liger.importlib.util, "find_spec",
                        lambda name, *a: fake if name == "liger_kernel" else real(name, *a))  # fmt: skip


@pytest.fixture
def installed(monkeypatch):
    """Pretend liger-kernel 0.8.5 is installed (this CPU machine has no triton to run it)."""
    liger_found(monkeypatch, True)
    monkeypatch.setattr(liger, "installed_model_types", lambda: ("0.8.5", LIGER_TYPES))


def test_auto_is_the_default_and_yaml_spellings_convert():
    assert build_config({"task": "sft"}).config.liger == "auto"
    assert build_config({"task": "sft", "liger": "AUTO"}).config.liger == "auto"
    assert build_config({"task": "sft", "liger": "yes"}).config.liger is True
    assert build_config({"task": "sft", "liger": False}).config.liger is False
    with pytest.raises(ConfigError, match="liger must be true, false or auto"):
        build_config({"task": "sft", "liger": "fast"})


def test_auto_applies_the_kernels_on_a_gpu_for_a_supported_model(installed):
    chosen, why = liger_decision("auto", **ON_GPU)
    assert chosen is True and why == "liger-kernel 0.8.5 supports llava with llama"
    assert liger_decision("auto", **{**ON_GPU, "model_config": QWEN2_VL})[0] is True
    # a text LM has no text_config: its own type decides
    assert liger_decision("auto", **{**ON_GPU, "model_config": SimpleNamespace(model_type="qwen2")})[0] is True


def test_auto_is_off_on_the_cpu(installed):
    chosen, why = liger_decision("auto", **{**ON_GPU, "device": "cpu"})
    assert chosen is False and "CPU" in why


def test_auto_is_off_without_the_package(monkeypatch):
    liger_found(monkeypatch, False)
    monkeypatch.setattr(liger, "installed_model_types", lambda: pytest.fail("imported liger_kernel"))
    chosen, why = liger_decision("auto", **ON_GPU)
    assert chosen is False and "not installed" in why


def test_auto_is_off_for_models_liger_does_not_patch(installed, monkeypatch):
    unknown_text = SimpleNamespace(model_type="llava", text_config=SimpleNamespace(model_type="opt"))
    chosen, why = liger_decision("auto", **{**ON_GPU, "model_config": unknown_text})
    assert chosen is False and why == "liger-kernel 0.8.5 has no kernels for model type opt"
    assert liger_decision("auto", **{**ON_GPU, "model_config": SimpleNamespace(model_type="gpt2")})[0] is False
    assert liger_decision("auto", **{**ON_GPU, "model_config": None})[0] is False
    # the installed release has the last word: an older one that lacks the type leaves it alone
    monkeypatch.setattr(liger, "installed_model_types", lambda: ("0.5.0", frozenset({"llama", "qwen2"})))
    chosen, why = liger_decision("auto", **ON_GPU)
    assert chosen is False and why == "liger-kernel 0.5.0 has no kernels for model type llava"


def test_auto_survives_a_liger_that_does_not_import(installed, monkeypatch):
    def broken():
        raise RuntimeError("triton: no CUDA driver")

    monkeypatch.setattr(liger, "installed_model_types", broken)
    chosen, why = liger_decision("auto", **ON_GPU)
    assert chosen is False and "RuntimeError: triton: no CUDA driver" in why


def test_auto_is_for_sft_on_float_or_bitsandbytes_weights(installed):
    rl, why = liger_decision("auto", **{**ON_GPU, "task": "rl"})
    assert rl is False and "logits" in why
    prequantized, why = liger_decision("auto", **ON_GPU, prequantized=True)
    assert prequantized is False and "prequantized" in why


def test_explicit_settings_win(installed, monkeypatch):
    liger_found(monkeypatch, False)
    assert liger_decision(True, task="rl", device="cpu", model_config=None) == (True, "liger is true")
    assert liger_decision(False, **ON_GPU) == (False, "liger is false")


def test_training_arguments_carry_the_decision_and_say_what_auto_chose(installed, tmp_path, capsys):
    pytest.importorskip("transformers")
    from vistune.training.arguments import training_arguments

    def args(device="cuda", model_config=LLAVA, **values):
        config = build_config({"task": "sft", "output_dir": str(tmp_path), **values}).config
        return training_arguments(config, device, has_eval=False, model_config=model_config)

    assert args().use_liger_kernel is True
    line = "vistune: liger auto: applying Liger kernels (liger-kernel 0.8.5 supports llava with llama)\n"
    assert capsys.readouterr().out == line
    # QLoRA keeps its float LM head: the kernels apply; a prequantized checkpoint does not get them
    assert args(quantization="nf4", adapter="qlora").use_liger_kernel is True
    assert args(quantization="awq").use_liger_kernel is False
    assert "not applying Liger kernels (the base model is a prequantized" in capsys.readouterr().out
    assert args(device="cpu").use_liger_kernel is False
    assert args(liger=False).use_liger_kernel is False
    assert capsys.readouterr().out == ""  # no line on the CPU, or when the setting is not auto


def test_true_without_the_package_is_refused_naming_the_field(monkeypatch):
    from vistune.training.arguments import check_liger

    liger_found(monkeypatch, False)
    with pytest.raises(ConfigError, match=r"liger is true, but the liger-kernel package is not installed") as error:
        check_liger(build_config({"task": "sft", "liger": True}))
    assert "liger: false" in error.value.hint
    check_liger(build_config({"task": "sft"}))  # auto runs without the package


def test_auto_leaves_compiled_runs_alone(installed):
    chosen, why = liger_decision("auto", **ON_GPU, compiling=True)
    assert chosen is False and "compiled" in why
    assert liger_decision(True, **ON_GPU, compiling=True)[0] is True
