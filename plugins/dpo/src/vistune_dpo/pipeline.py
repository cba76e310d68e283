"""``vistune rl --algorithm dpo|orpo|simpo|kto``: preference optimisation on stored data.

The order is ``vistune sft``'s: everything that can refuse the run (output directory,
resume policy, the algorithm's options, every record of the preference file) is checked
before the model loads, and a distributed run hands over to torchrun first.  The policy
starts as in ``vistune rl`` (:func:`vistune.pipelines.rl.load_policy`): a checkpoint, or
what ``vistune sft`` wrote, with the configured adapter.  The reference model is the
starting policy: the adapter disabled (no copy of the weights), a frozen copy of an SFT
adapter, or, under full fine-tuning, a frozen copy of the model, unless its
log-probabilities are computed once up front (``precompute_ref_log_probs``).  Outputs are
those of ``vistune sft``: checkpoints, the adapter or model, ``metrics.jsonl`` (with
``rewards/*`` and ``logps/*``), TensorBoard and ``loss_curve.png``.
"""

from __future__ import annotations

from typing import Any

from vistune import launch
from vistune.plan import Plan


def run(plan: Plan) -> None:
    """Train the plan's model with its preference algorithm; save the result to ``output_dir``."""
    from vistune.outputs import prepare_output_dir
    from vistune.pipelines.rl import save_final
    from vistune.pipelines.sft import ensure_built, train
    from vistune.specs import load_ref
    from vistune.training import checkpoints
    from vistune.training.arguments import check_liger

    config = plan.config
    prepare_output_dir(config.output_dir, f"{plan.loaded.where('output_dir')}: output_dir")
    check_liger(plan.loaded)
    objective = load_ref(plan.algorithm.factory)(config)  # bad algorithm_options stop the run here
    resume_from = checkpoints.resolve_resume(config, where=plan.loaded.where("resume"),
                                             may_delete=launch.is_main_process())  # fmt: skip
    if launch.is_main_process():
        checkpoints.remove_stale_staging(config.output_dir)
    for location in (plan.dataset, plan.eval_dataset):
        if location is not None:
            ensure_built(location)
    if launch.relaunch_if_needed(plan):
        return
    trainer, processor, base_dir = build_trainer(plan, objective)
    train(trainer, resume_from)
    if launch.is_main_process():
        print(f"vistune: training data: {trainer.train_dataset.summary()}", flush=True)
    save_final(trainer, processor, plan, base_dir)


def build_trainer(plan: Plan, objective: Any):
    """Records, policy, reference, collator and :class:`PreferenceTrainer`; fires ``vistune_trainer_created``.

    Returns ``(trainer, processor, base_dir)``.
    """
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback
    from trl.trainer.utils import disable_dropout_in_model

    from vistune import loading
    from vistune.data.collate import PAD_TO_MULTIPLE_OF
    from vistune.data.validation import print_line
    from vistune.pipelines.rl import load_policy
    from vistune.pipelines.sft import adapter_trainer_overrides, pad_token_id
    from vistune.plugins import get_plugin_manager
    from vistune.training.arguments import training_arguments
    from vistune.training.metrics import MetricsCallback
    from vistune_dpo.batches import PreferenceCollator, PreferenceItems
    from vistune_dpo.records import read_preferences
    from vistune_dpo.trainer import PreferenceTrainer

    config = plan.config
    set_seed(config.seed)
    log = print_line if launch.is_main_process() else None
    # every record checked before the model loads
    train_records = read_preferences(plan.dataset, config, paired=objective.paired, log=log)
    eval_records = read_preferences(plan.eval_dataset, config, paired=objective.paired, log=log) if plan.eval_dataset else None
    precompute = objective.needs_reference and objective.precompute_ref_log_probs
    needs_reference_model = objective.needs_reference and not precompute
    model, processor, base_dir, ref_adapter, ref_model = load_policy(plan, needs_reference_model)
    disable_dropout_in_model(model)  # as TRL: dropout would make the policy differ from its reference at step 0
    encoder = loading.make_encoder(plan, processor)
    train_items = PreferenceItems(train_records, encoder, paired=objective.paired)
    eval_items = PreferenceItems(eval_records, encoder, paired=objective.paired) if eval_records is not None else None
    collator = PreferenceCollator(encoder, pad_token_id(processor), pad_to_multiple_of=PAD_TO_MULTIPLE_OF)
    # with held-out pairs, the first evaluation is of the starting policy: the figures training is judged against
    args = training_arguments(config, plan.launch.device, has_eval=eval_items is not None,
                              include_num_input_tokens_seen="no", eval_on_start=eval_items is not None,
                              model_config=getattr(model, "config", None),
                              **loader_workers(config, plan.launch.device), **adapter_trainer_overrides(plan))  # fmt: skip
    trainer = PreferenceTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=train_items,
        eval_dataset=eval_items,
        processing_class=processor,
        vistune_config=config,
        model_type=plan.model_type,
        objective=objective,
        ref_model=ref_model,
        ref_adapter=ref_adapter,
    )
    if ref_model is not None:  # where the Trainer has put the policy
        ref_model.to(next(model.parameters()).device)
    if precompute:
        trainer.precompute_reference(train_items, config.per_device_batch_size)
        if eval_items is not None:
            trainer.precompute_reference(eval_items, config.per_device_batch_size, split="eval")
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(MetricsCallback(config.output_dir, config.report_to))
    if launch.is_main_process():
        reference = ("none" if not objective.needs_reference else "precomputed" if precompute
                     else "frozen copy" if ref_model is not None else f"adapter {ref_adapter}" if ref_adapter
                     else "adapter disabled")  # fmt: skip
        print(f"vistune: {objective!r}; {len(train_items)} {'pairs' if objective.paired else 'answers'}; "
              f"reference: {reference}", flush=True)  # fmt: skip
    get_plugin_manager().hook.vistune_trainer_created(trainer=trainer, config=config)
    return trainer, processor, base_dir


def loader_workers(config, device: str) -> dict[str, Any]:
    """DataLoader workers as ``vistune sft`` starts them (``dataloader_num_workers``, auto: CPUs on a GPU machine).

    Each pair is two template encodings with image preprocessing: on a GPU, done in the
    training process, they would stall every step.
    """
    from vistune.training.arguments import PREFETCH_FACTOR, dataloader_workers

    workers = dataloader_workers(config.dataloader_num_workers, device, config.gpu_num)
    if not workers:
        return {}
    return {"dataloader_num_workers": workers, "dataloader_persistent_workers": True,
            "dataloader_prefetch_factor": PREFETCH_FACTOR}  # fmt: skip
