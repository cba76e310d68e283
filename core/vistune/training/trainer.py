"""vistune's ``transformers.Trainer``: atomic checkpoints, per-part learning rates, a leaner loss.

Everything else (the loop, mixed precision, DDP/FSDP through accelerate, gradient
accumulation, the checkpoint content: weights, optimizer, scheduler, RNG states,
trainer state) is the Trainer's own.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

from transformers import Trainer

from vistune.outputs import disk_full_error
from vistune.training import checkpoints
from vistune.training.lm_loss import accepts_logits_to_keep, causal_lm_loss
from vistune.training.param_groups import param_groups, part_learning_rates


class VistuneTrainer(Trainer):
    """A Trainer whose checkpoints appear atomically and fire ``vistune_checkpoint_saved``.

    :param vistune_config: the run's :class:`vistune.config.RunConfig`.
    :param model_type: the :class:`vistune.specs.ModelType`, for per-part learning rates.
    """

    def __init__(self, *args: Any, vistune_config: Any, model_type: Any = None, **kwargs: Any):
        self.vistune_config = vistune_config
        self.model_type = model_type
        self._staging_root: Path | None = None
        super().__init__(*args, **kwargs)

    # -- optimizer ---------------------------------------------------------------

    def create_optimizer(self, model=None):
        """The Trainer's optimizer, with one parameter group per model part when their learning rates differ."""
        rates = part_learning_rates(self.vistune_config)
        if self.optimizer is not None or len(set(rates.values())) == 1:
            return super().create_optimizer(model)
        opt_model = self.model if model is None else model
        groups = param_groups(
            opt_model, self.model_type, rates, self.args.weight_decay, self.get_decay_parameter_names(opt_model)
        )
        optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
        optimizer_kwargs.pop("params", None)
        optimizer_kwargs.pop("lr", None)  # each group carries its own
        self.optimizer = optimizer_cls(groups, lr=rates["language_model"], **optimizer_kwargs)
        return self.optimizer

    # -- loss ------------------------------------------------------------------------

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        """The causal LM loss from the labelled positions' logits only (:mod:`vistune.training.lm_loss`).

        Same value as the model's own loss; the Trainer's path stays in charge where it
        computes something else: label smoothing, a custom loss function, Liger's fused
        cross-entropy (which never builds the logits at all), or a model without
        ``logits_to_keep``.
        """
        if (
            "labels" not in inputs
            or self.label_smoother is not None
            or self.compute_loss_func is not None
            or self.args.use_liger_kernel
            or not accepts_logits_to_keep(model)
        ):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        # the Trainer hands the model its window-wide target count only when the model takes it
        count = num_items_in_batch if self.model_accepts_loss_kwargs else None
        loss, outputs = causal_lm_loss(model, inputs, count)
        if self.args.average_tokens_across_devices and self.model_accepts_loss_kwargs and count is not None:
            # as the Trainer does: the count is summed over processes, gradients are averaged over them
            get_tp_size = getattr(self, "get_tp_size", lambda: 1)
            loss = loss * (self.accelerator.num_processes // get_tp_size() if self.args.n_gpu <= 1 else self.args.n_gpu)
        return (loss, outputs) if return_outputs else loss

    # -- checkpoints -----------------------------------------------------------------

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Restore full-model weights through ``from_pretrained``.

        ``save_pretrained`` writes some models (Llava, Qwen-VL) under their original
        checkpoint key names, while the Trainer's own resume loads the file with a plain
        ``load_state_dict`` and only warns when nothing matches (transformers issue
        #43701): training would silently continue from the base weights.  Loading the
        checkpoint with the model class applies the same key conversion as any load.
        """
        from transformers import PreTrainedModel

        model = self.model if model is None else model
        directory = Path(resume_from_checkpoint)
        has_weights = (directory / "model.safetensors").is_file() or (
            directory / "model.safetensors.index.json"
        ).is_file()
        if (
            not has_weights
            or not isinstance(model, PreTrainedModel)
            or self.is_fsdp_enabled
            or self.is_deepspeed_enabled
        ):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        saved = type(model).from_pretrained(
            str(directory), dtype=model.dtype, trust_remote_code=self.vistune_config.trust_remote_code
        )
        model.load_state_dict(saved.state_dict(), strict=True)
        del saved

    def _get_output_dir(self, trial) -> str:
        # While a checkpoint is being written, the Trainer's run directory is the staging
        # directory, so every file (from every process) lands there first.
        if self._staging_root is not None:
            return str(self._staging_root)
        return super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Stage the Trainer's checkpoint, commit it as ``checkpoint-N`` and rotate old ones.

        A save that fails leaves no trace: the staged files are removed (a full disk gets
        its space back), and ``checkpoint-N`` never appears, so ``resume: auto`` keeps to the
        last complete checkpoint.  A full disk is reported in one line (:mod:`vistune.outputs`).
        """
        step = self.state.global_step
        output_dir = Path(self.args.output_dir)
        staging_root = checkpoints.staging_dir(output_dir, step)
        final = output_dir / f"{checkpoints.PREFIX}-{step}"
        if self.args.should_save:
            shutil.rmtree(staging_root, ignore_errors=True)
        self.accelerator.wait_for_everyone()
        try:
            self._stage_and_commit(model, trial, staging_root, final)
        except Exception as exc:
            if self.args.should_save:
                shutil.rmtree(staging_root, ignore_errors=True)
            error = disk_full_error(exc, final, f"the checkpoint of step {step}",
                                    outcome="the partial checkpoint was removed")  # fmt: skip
            if error is None:
                raise
            raise error from exc
        if self.args.should_save:
            if self.state.best_model_checkpoint and Path(self.state.best_model_checkpoint).parent == staging_root:
                self.state.best_model_checkpoint = str(final)
            checkpoints.rotate(output_dir, self.vistune_config.save_total_limit)
            fire_checkpoint_saved(str(final), step, self.vistune_config)
        self.accelerator.wait_for_everyone()

    def _stage_and_commit(self, model, trial, staging_root: Path, final: Path) -> None:
        """Every process writes its part into ``staging_root``; the main process then commits it to ``final``."""
        self._staging_root = staging_root
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self._staging_root = None
        self.accelerator.wait_for_everyone()  # every process has written its RNG state
        if self.args.should_save:
            checkpoints.commit(staging_root / final.name, final)
            os.rmdir(staging_root)


def fire_checkpoint_saved(path: str, step: int, config: Any) -> None:
    """Tell plugins that ``path`` is a complete checkpoint (or the final model) of ``step``."""
    from vistune.plugins import get_plugin_manager

    get_plugin_manager().hook.vistune_checkpoint_saved(path=path, step=step, config=config)
