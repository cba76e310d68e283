"""``transformers.TrainingArguments`` from a vistune config."""

from __future__ import annotations

import dataclasses
import importlib.util
from typing import Any

from vistune.errors import ConfigError
from vistune.hardware import usable_cpus
from vistune.reporting import trainer_integrations


def default_bf16(device: str) -> bool:
    """bf16 mixed precision when training on a GPU that supports it."""
    import torch

    return device == "cuda" and torch.cuda.is_available() and torch.cuda.is_bf16_supported()


def check_liger(loaded: Any) -> None:
    """``liger: true`` needs the liger-kernel package; say so before anything loads (``auto`` does without it)."""
    if loaded.config.liger is True and importlib.util.find_spec("liger_kernel") is None:
        raise ConfigError(
            f"{loaded.where('liger')}: liger is true, but the liger-kernel package is not installed",
            hint="pip install liger-kernel (it needs a CUDA GPU and triton), or set liger: false",
        )


def parallel_arguments(config: Any, device: str) -> dict[str, Any]:
    """DDP needs nothing beyond torchrun's environment; FSDP shards whole decoder layers."""
    kwargs: dict[str, Any] = {}
    if device == "cpu" and config.gpu_num * config.nnodes > 1:
        kwargs["ddp_backend"] = "gloo"
    if config.parallel_method == "fsdp":
        kwargs["fsdp"] = "full_shard auto_wrap"
        # frozen and trainable parameters share layers under LoRA: keep the original parameters
        kwargs["fsdp_config"] = {"use_orig_params": True, "activation_checkpointing": config.gradient_checkpointing}
    return kwargs


#: Most DataLoader workers ``dataloader_num_workers: auto`` starts per training process.
MAX_AUTO_WORKERS = 8
#: Batches each worker prepares ahead (PyTorch's default is 2).  Encoding time varies with
#: image sizes and sample lengths; a deeper queue absorbs a slow batch without a GPU stall.
PREFETCH_FACTOR = 4


def dataloader_workers(setting: str, device: str, processes_per_node: int) -> int:
    """How many DataLoader worker processes each training process starts (``dataloader_num_workers``).

    A number is taken as given.  ``auto`` keeps data preparation (image preprocessing,
    chat template, tokenizing) off the training loop on a GPU: the node's usable CPUs are
    shared among its ``processes_per_node`` training processes, one CPU of each share is
    left to the training process itself, and at most :data:`MAX_AUTO_WORKERS` are started
    (beyond that the workers mostly hold memory).  On CPU the workers would compete with
    training for the same cores, so ``auto`` is 0 there.
    """
    if setting != "auto":
        return int(setting)
    if device != "cuda":
        return 0
    return min(MAX_AUTO_WORKERS, max(1, usable_cpus() // max(1, processes_per_node) - 1))


def dataloader_arguments(config: Any, device: str) -> dict[str, Any]:
    """Worker processes for the Trainer's DataLoaders (``vistune sft``; RL reads its prompts in-process).

    Workers persist across epochs and evaluations, keeping what they hold (``cache_encoded``),
    except for packed rows: a packed dataset is told its epoch (its shuffle) in this process,
    which workers started afresh each epoch see and persistent ones would not.
    """
    setting = config.dataloader_num_workers if config.task == "sft" else "0"
    workers = dataloader_workers(setting, device, config.gpu_num)
    kwargs: dict[str, Any] = {"dataloader_num_workers": workers, "dataloader_pin_memory": device == "cuda"}
    if workers:
        kwargs.update(dataloader_persistent_workers=not config.packing, dataloader_prefetch_factor=PREFETCH_FACTOR)
    return kwargs


def training_arguments(config: Any, device: str, *, has_eval: bool, model_config: Any = None, **overrides: Any):
    """The Trainer's arguments for ``config``.

    Checkpoint rotation and the jsonl and TensorBoard sinks are vistune's own (atomic
    checkpoints, :mod:`vistune.training.metrics`); the Trainer reports only to the
    integrations ``report_to`` names besides them (wandb, mlflow, ...).  ``model_config``
    (the loaded model's ``config``) tells ``liger: auto`` whether Liger has kernels for
    the model; without it only ``liger: true`` turns them on (a caller that decides
    ``auto`` later, once it knows whether blocks are compiled, sets ``use_liger_kernel`` itself).
    """
    from transformers import TrainingArguments

    from vistune.training.liger import use_liger

    bf16 = config.bf16 if config.bf16 is not None else default_bf16(device)
    fsdp = config.parallel_method == "fsdp"
    kwargs: dict[str, Any] = dict(
        output_dir=config.output_dir,
        learning_rate=config.learning_rate,
        num_train_epochs=config.num_train_epochs,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_batch_size,
        per_device_eval_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        warmup_steps=config.warmup_ratio,  # transformers reads a float below 1 as a ratio of the total steps
        weight_decay=config.weight_decay,
        lr_scheduler_type=config.lr_scheduler_type,
        max_grad_norm=config.max_grad_norm,
        bf16=bf16,
        logging_strategy="steps",
        logging_steps=config.logging_steps,
        save_strategy="steps",
        save_steps=config.save_steps,
        save_total_limit=None,  # vistune rotates complete checkpoints itself
        eval_strategy="steps" if has_eval else "no",
        eval_steps=config.save_steps if has_eval else None,
        prediction_loss_only=True,  # evaluation reports the held-out loss; gathering logits would only cost memory
        seed=config.seed,
        data_seed=config.seed,
        remove_unused_columns=False,
        label_names=["labels"],
        report_to=trainer_integrations(config.report_to),  # jsonl and tensorboard are vistune's own
        disable_tqdm=True,
        include_num_input_tokens_seen="non_padding",
        use_cpu=device == "cpu",
        use_liger_kernel=use_liger(config, device, model_config) if model_config is not None else config.liger is True,
        # Each process reads its own batches.  Dispatching (accelerate's default for iterable
        # datasets such as packed rows) slices every tensor of a batch along dimension 0 for
        # each process, which cuts image tensors (one entry per image, not per row) and mrope
        # position ids (batch on dimension 1).
        accelerator_config={"dispatch_batches": False},
        **dataloader_arguments(config, device),
        **parallel_arguments(config, device),
    )
    # transformers 5.2x renamed gradient_checkpointing to activation_checkpointing; older 5.x has only the old name
    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    prefix = "activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing"
    kwargs[prefix] = config.gradient_checkpointing and not fsdp  # FSDP checkpoints through its own config
    # non-reentrant checkpointing works with frozen embeddings (LoRA) without forcing input gradients
    kwargs[f"{prefix}_kwargs"] = {"use_reentrant": False} if config.gradient_checkpointing else None
    kwargs.update(overrides)
    return TrainingArguments(**kwargs)
