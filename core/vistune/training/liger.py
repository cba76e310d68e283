"""Liger kernels: whether a run applies them (``liger``: true, false or ``auto``).

liger-kernel replaces the decoder's RMSNorm, SwiGLU MLP and rotary embedding with Triton
kernels, and the LM head plus cross-entropy with one fused kernel that never builds the
logits.  transformers applies them at the start of ``train()`` when
``TrainingArguments.use_liger_kernel`` is set, choosing the patch by the model's
``config.model_type`` (a type it does not know is left as it is, with a log line).

Why ``auto`` is the default: on one H200, QLoRA SFT of a Llava-1.5-7B-shaped model at batch
1 reserved 8.81 GiB with the kernels against 10.05-10.18 GiB without (3.82k tokens/s, within
the 3.51k-4.19k of runs without), and the package is something a user installs on purpose;
:func:`liger_decision` has the rule.  The package needs triton and a CUDA GPU, so it is an extra
(``pip install 'vistune[gpu]'``), never a requirement.
"""

from __future__ import annotations

import importlib.util
from typing import Any


def model_types(model_config: Any) -> tuple[str, ...]:
    """The model's ``model_type`` and, for a VLM, its text model's: Liger patches a VLM's
    language model by the text type, and warns of "unexpected side effects" when it does not know it."""
    if model_config is None:
        return ()
    types = [getattr(model_config, "model_type", None)]
    text_config = getattr(model_config, "text_config", None)
    if text_config is not None:
        types.append(getattr(text_config, "model_type", None))
    return tuple(str(t) for t in types if t)


def installed_model_types() -> tuple[str, frozenset[str]]:
    """``(version, model types)`` of the installed liger-kernel; raises what its import raises."""
    from importlib.metadata import version

    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    return version("liger-kernel"), frozenset(MODEL_TYPE_TO_APPLY_LIGER_FN)


def liger_decision(setting: Any, *, task: str, device: str, model_config: Any, prequantized: bool = False,
                   compiling: bool = False) -> tuple[bool, str]:  # fmt: skip
    """``(apply?, why)`` for a ``liger`` setting (true, false or ``"auto"``).

    ``true`` and ``false`` decide outright (``true`` without the package is refused before the
    model loads, :func:`vistune.training.arguments.check_liger`).  ``auto`` applies the kernels
    when all of these hold:

    - the liger-kernel package is installed (found without importing it);
    - training runs on a CUDA GPU (the kernels are Triton);
    - the task is ``sft``: RL and preference runs take log-probabilities from the logits they
      ask for, so the fused cross-entropy (most of the gain) never runs, and a separately
      loaded reference model would compute with other kernels than the policy;
    - the base model is not a prequantized checkpoint (awq, gptq, fp8): the fused
      cross-entropy multiplies by ``lm_head.weight`` directly, right for a float head (as
      bitsandbytes loading keeps it, so QLoRA runs get the kernels) but not for whatever a
      quantized checkpoint saved;
    - the transformer blocks are not compiled (``torch_compile``): on an H200 with torch 2.11
      and liger-kernel 0.8.5, every compiled Llava run stopped in dynamo inside Liger's RMSNorm
      before its first step, so compiled runs (the long ones) keep the compiled PyTorch kernels
      and the others (short runs, QLoRA) get Liger's;
    - the model's type and its text model's type are ones Liger patches
      (the installed package's table, read only once the checks above passed).
    """
    if setting is not True and setting != "auto":
        return False, "liger is false"
    if setting is True:
        return True, "liger is true"
    if importlib.util.find_spec("liger_kernel") is None:
        return False, "the liger-kernel package is not installed"
    if device != "cuda":
        return False, "training runs on the CPU (Liger's kernels need a CUDA GPU)"
    if task != "sft":
        return False, f"{task} takes log-probabilities from the logits, so the fused cross-entropy would not run"
    if prequantized:
        return False, "the base model is a prequantized checkpoint (set liger: true to apply the kernels anyway)"
    if compiling:
        return False, "the transformer blocks are compiled, and torch.compile fails inside Liger's RMSNorm"
    types = model_types(model_config)
    if not types:
        return False, "the model's type is unknown"
    try:
        version, installed = installed_model_types()
    except Exception as exc:  # noqa: BLE001 - a broken triton or CUDA setup must not stop an auto run
        return False, f"liger_kernel does not import ({type(exc).__name__}: {exc})"
    unknown = [t for t in types if t not in installed]
    if unknown:
        return False, f"liger-kernel {version} has no kernels for model type {unknown[0]}"
    return True, f"liger-kernel {version} supports {' with '.join(dict.fromkeys(types))}"


def use_liger(config: Any, device: str, model_config: Any, *, compiling: bool = False) -> bool:
    """``TrainingArguments.use_liger_kernel`` for ``config``; under ``auto`` on a GPU, the main
    process says in one line what was chosen and why (as ``torch_compile: auto`` does)."""
    from vistune import launch
    from vistune.quantization import get_scheme

    scheme = get_scheme(config.quantization)
    chosen, why = liger_decision(config.liger, task=config.task, device=device, model_config=model_config,
                                 prequantized=scheme is not None and scheme.method == "prequantized",
                                 compiling=compiling)  # fmt: skip
    if config.liger == "auto" and device == "cuda" and launch.is_main_process():
        action = "applying Liger kernels" if chosen else "not applying Liger kernels"
        print(f"vistune: liger auto: {action} ({why})", flush=True)
    return chosen
