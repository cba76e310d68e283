"""LoRA, DoRA and QLoRA through peft, and merging an adapter back into its base model.

What trains under LoRA: only the low-rank weights, on the adapter's ``target_modules``
(``lora: {target_modules: [...]}``, or the flat ``lora_target_modules``) inside the
language model (``scope: all`` extends the search to the vision tower and
projector).  A part whose ``freeze_*`` option is explicitly ``false``
(``freeze_projector: false``, ``freeze_vision_tower: false``) is trained in full as
well, through peft's ``modules_to_save``: its trained copy is saved inside the adapter
directory, so the adapter alone still reproduces the model.  LLaVA's own recipe trains
the projector in full; this is how to ask for that with LoRA.
"""

from __future__ import annotations

from typing import Any

from vistune.adapters.options import lora_options
from vistune.adapters.targets import lora_target_names, parts_trained_in_full, target_regex
from vistune.errors import ConfigError, VistuneError


def lora_config(model: Any, model_type: Any, config: Any, *, use_dora: bool = False):
    """The ``peft.LoraConfig`` a run's config asks for on ``model`` (targets resolved to a regex)."""
    from peft import LoraConfig

    names = lora_target_names(model, model_type, config)
    full_parts = parts_trained_in_full(config)
    modules_to_save = [prefix for part in full_parts for prefix in getattr(model_type, part)] or None
    options = lora_options(config)
    return LoraConfig(
        r=options["rank"],
        lora_alpha=options["alpha"],
        lora_dropout=options["dropout"],
        target_modules=target_regex(names, (name for name, _ in model.named_modules())),
        modules_to_save=modules_to_save,
        use_dora=use_dora,
        task_type="CAUSAL_LM",
    )


def _apply(model: Any, model_type: Any, config: Any, *, use_dora: bool) -> Any:
    from peft import get_peft_model

    if is_kbit(model):
        _upcast_float16_weights(model, config)
    peft_config = lora_config(model, model_type, config, use_dora=use_dora)
    for param in model.parameters():
        param.requires_grad_(False)
    return get_peft_model(model, peft_config)


def apply_lora(model: Any, model_type: Any, config: Any) -> Any:
    """Wrap ``model`` in a peft LoRA model; only the adapter (and parts trained in full) train.

    On a base model loaded quantized (``quantization: q4_k_m`` next to ``adapter: lora``)
    this is QLoRA, prepared as :func:`apply_qlora` does.
    """
    return _apply(model, model_type, config, use_dora=False)


def apply_dora(model: Any, model_type: Any, config: Any) -> Any:
    """Weight-decomposed LoRA (DoRA): LoRA plus a trained magnitude vector per adapted layer."""
    return _apply(model, model_type, config, use_dora=True)


def apply_qlora(model: Any, model_type: Any, config: Any) -> Any:
    """LoRA on a base model the loader quantized to 4 bits (``quantization: nf4``/``q4_k_m``).

    peft's ``prepare_model_for_kbit_training`` is not used: it casts every weight that
    is not 4-bit (vision tower, embeddings, output layer, norms) to float32, about 1 GB
    more for a 7B Llava, which only float16 training needs.  Here the weights stay in the
    dtype they were loaded in, and are upcast only when ``dtype: float16``.  Gradient
    checkpointing is the Trainer's (non-reentrant, so no input-grad hook is needed).
    """
    import torch

    if not torch.cuda.is_available():
        raise VistuneError(
            "adapter qlora needs a CUDA GPU (bitsandbytes 4-bit kernels), and this machine has none",
            hint="run on a machine with an NVIDIA GPU, or use adapter: lora",
        )
    if not is_kbit(model):
        raise ConfigError(
            "adapter qlora trains LoRA on a 4-bit base model, but the model was not loaded quantized",
            hint="set quantization: nf4 (or q4_k_m) next to adapter: qlora",
        )
    return _apply(model, model_type, config, use_dora=False)


def merge_lora(model: Any) -> Any:
    """Fold a peft adapter into its base weights and return the plain transformers model."""
    if hasattr(model, "merge_and_unload"):
        return model.merge_and_unload()
    return model


def is_kbit(model: Any) -> bool:
    """Whether bitsandbytes quantized the model's base weights (4 or 8 bits) when it loaded."""
    return bool(getattr(model, "is_loaded_in_4bit", False) or getattr(model, "is_loaded_in_8bit", False))


def _upcast_float16_weights(model: Any, config: Any) -> None:
    """Float16 training keeps the weights that are not quantized in float32 (bfloat16 needs no upcast)."""
    import torch

    if config.dtype != "float16":
        return
    for param in model.parameters():
        if param.dtype == torch.float16 and param.__class__.__name__ not in ("Params4bit", "Int8Params"):
            param.data = param.data.float()
