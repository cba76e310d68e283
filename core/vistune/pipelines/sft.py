"""``vistune sft``: supervised fine-tuning with ``transformers.Trainer``.

The order matters: everything that can refuse the run (resume policy, missing
optional packages) is checked before the model is loaded, and a distributed run
hands over to torchrun before anything heavy is imported.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from vistune import launch
from vistune.data.collate import PAD_TO_MULTIPLE_OF
from vistune.errors import VistuneError
from vistune.outputs import disk_full_error, prepare_output_dir
from vistune.plan import Plan
from vistune.training import checkpoints
from vistune.training.arguments import check_liger


def run(plan: Plan) -> None:
    """Train the plan's model on its dataset and save the result to ``output_dir``."""
    config = plan.config
    prepare_output_dir(config.output_dir, f"{plan.loaded.where('output_dir')}: output_dir")
    check_liger(plan.loaded)
    resume_from = checkpoints.resolve_resume(
        config, where=plan.loaded.where("resume"), may_delete=launch.is_main_process()
    )
    if launch.is_main_process():
        checkpoints.remove_stale_staging(config.output_dir)  # a crashed save's leftovers
    for location in (plan.dataset, plan.eval_dataset):
        if location is not None:
            ensure_built(location)
    if launch.relaunch_if_needed(plan):
        return
    trainer, processor = build_trainer(plan)
    train(trainer, resume_from)
    if launch.is_main_process():
        print(f"vistune: training data: {trainer.encoded_train_dataset.summary()}", flush=True)
    save_final(trainer, processor, plan)


def train(trainer, resume_from: Any = None) -> None:
    """``trainer.train()``, from ``resume_from`` when given; a bad record a DataLoader worker met is raised
    with its own message and hint, not as the worker's traceback."""
    if resume_from is not None:
        print(f"vistune: resuming from {resume_from}", flush=True)
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    except VistuneError as exc:
        from vistune.data.encoded import error_from_worker

        error = error_from_worker(exc)
        if error is exc:
            raise
        raise error from exc


def build_trainer(plan: Plan):
    """Model, data, adapter, collator and :class:`VistuneTrainer`; fires ``vistune_trainer_created``.

    Returns ``(trainer, processor)``.
    """
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from vistune import loading
    from vistune.data.collate import Collator
    from vistune.data.encoded import EncodedDataset
    from vistune.data.validation import print_line, read_validated
    from vistune.plugins import get_plugin_manager
    from vistune.training.arguments import training_arguments
    from vistune.training.liger import use_liger
    from vistune.training.metrics import MetricsCallback
    from vistune.training.trainer import VistuneTrainer

    config = plan.config
    set_seed(config.seed)  # adapter weights are initialised before the Trainer seeds
    log = print_line if launch.is_main_process() else None
    train_records = read_validated(plan.dataset, config, log=log)  # every record checked before the model loads
    eval_records = read_validated(plan.eval_dataset, config, log=log) if plan.eval_dataset else None
    model, processor = loading.load_model(plan, for_training=True)
    encoder = loading.make_encoder(plan, processor)
    train_dataset = encoded_train = EncodedDataset(train_records, encoder)
    eval_dataset = EncodedDataset(eval_records, encoder) if eval_records is not None else None
    if config.cache_encoded and not config.packing:
        train_dataset = MemoryCachedDataset(train_dataset)
        eval_dataset = MemoryCachedDataset(eval_dataset) if eval_dataset is not None else None
    overrides = adapter_trainer_overrides(plan)
    if config.packing:
        from vistune.data import packing

        train_dataset = packing.pack_dataset(train_dataset, config.max_packed_length, model, plan.model_type)
        if eval_dataset is not None:
            eval_dataset = packing.pack_dataset(eval_dataset, config.max_packed_length, model, plan.model_type)
        collator = packing.collate_packed
        overrides = {**packing.trainer_overrides(), **overrides}
    else:
        # aligned lengths: compiled blocks specialise on alignment, and tensor cores prefer it
        collator = Collator(pad_token_id(processor), pad_to_multiple_of=PAD_TO_MULTIPLE_OF)
    model = loading.apply_adapter(plan, model)
    args = training_arguments(config, plan.launch.device, has_eval=eval_dataset is not None, **overrides)
    compiled = maybe_compile(model, plan, args, train_dataset)
    args.use_liger_kernel = use_liger(config, plan.launch.device, getattr(model, "config", None), compiling=compiled)
    trainer = VistuneTrainer(
        model=model,
        args=args,
        data_collator=collator,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        processing_class=processor,
        vistune_config=config,
        model_type=plan.model_type,
    )
    trainer.encoded_train_dataset = encoded_train  # its dropped/skipped counts end the run's log
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(MetricsCallback(config.output_dir, config.report_to))
    get_plugin_manager().hook.vistune_trainer_created(trainer=trainer, config=config)
    return trainer, processor


def maybe_compile(model, plan: Plan, args, train_dataset) -> bool:
    """Compile the model's transformer blocks when ``torch_compile`` (default ``auto``) says so, and say why."""
    from vistune.training.compile import compile_blocks, compile_decision, planned_steps

    config = plan.config
    processes = config.gpu_num * config.nnodes
    steps = planned_steps(args, train_dataset, processes)
    chosen, why = compile_decision(config.torch_compile, device=plan.launch.device, planned_steps=steps,
                                   parallel_method=config.parallel_method,
                                   quantized=config.quantization != "none")  # fmt: skip
    if chosen:
        blocks = compile_blocks(model)
        message = f"compiling {blocks} transformer blocks ({why}); the first steps include the compile"
    else:
        message = f"not compiling ({why})"
    if launch.is_main_process() and (chosen or config.torch_compile == "auto" and plan.launch.device == "cuda"):
        print(f"vistune: torch_compile {config.torch_compile}: {message}", flush=True)
    return chosen


class MemoryCachedDataset:
    """A map-style dataset that keeps each item after its first read (``cache_encoded: true``).

    Encoding (image preprocessing, chat template, tokenizing) can cost more than a
    small model's training step; a small dataset trained for many epochs then pays it
    once.  Every process keeps its own copy, so this is for datasets that fit in memory.
    """

    def __init__(self, dataset: Any):
        self.dataset = dataset
        self._items: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> Any:
        item = self._items.get(index)
        if item is None:
            item = self._items[index] = self.dataset[index]
        return item


def adapter_trainer_overrides(plan: Plan) -> dict[str, Any]:
    """``TrainingArguments`` keywords an adapter needs (GaLore's optimizer, for one).

    An adapter asks for them with its spec's ``trainer_overrides(config, model_type)``.
    """
    from vistune.specs import load_ref

    if plan.adapter is None or plan.adapter.trainer_overrides is None:
        return {}
    return dict(load_ref(plan.adapter.trainer_overrides)(plan.config, plan.model_type))


def ensure_built(location) -> None:
    """Generate an embedded dataset (``Dataset.builder``) on first use, with the dataset's option values."""
    if not location.needs_build or (location.data_file is not None and location.data_file.exists()):
        return
    from vistune.data.builders import run_builder

    spec = location.spec
    root = location.data_file.parents[len(Path(spec.data_file).parts) - 1]
    run_builder(spec, root, location.options)
    if not location.data_file.exists():
        raise VistuneError(f"the builder of dataset {spec.name!r} ({spec.builder}) did not write {location.data_file}")


def pad_token_id(processor: Any) -> int:
    tokenizer = getattr(processor, "tokenizer", processor)
    pad = getattr(tokenizer, "pad_token_id", None)
    if pad is None:
        pad = getattr(tokenizer, "eos_token_id", None)
    if pad is None:
        raise VistuneError("the tokenizer has neither a pad token nor an end-of-sequence token to pad batches with")
    return pad


def save_final(trainer, processor, plan: Plan) -> Path:
    """Save the trained model (or adapter) and processor to ``output_dir`` with vistune's run file.

    The run file goes in last: its presence marks a complete output, and it tells
    ``vistune infer`` / ``export`` the model type, template and base model.
    """
    from vistune.models import RUN_FILE
    from vistune.training.trainer import fire_checkpoint_saved

    config = plan.config
    output_dir = Path(config.output_dir)
    try:
        _save_outputs(trainer, processor, plan, output_dir)
    except Exception as exc:
        error = disk_full_error(exc, output_dir, "the trained model",
                                outcome=f"what was written there is incomplete (no {RUN_FILE} marks it done)")
        if error is None:
            raise
        raise error from exc
    if trainer.args.should_save:
        fire_checkpoint_saved(str(output_dir), trainer.state.global_step, config)
    return output_dir


def _save_outputs(trainer, processor, plan: Plan, output_dir: Path) -> None:
    """Write the weights, the processor and, last, the run file that marks the output complete.

    A run file from an earlier run goes first: until the new one is written, the weights
    in ``output_dir`` may be half replaced, and nothing should take them as complete.
    """
    from vistune import __version__
    from vistune.config import config_to_dict
    from vistune.models import RUN_FILE

    config = plan.config
    if trainer.args.should_save:
        (output_dir / RUN_FILE).unlink(missing_ok=True)
    trainer.save_model(str(output_dir))
    if not trainer.args.should_save:
        return
    if processor is not None and trainer.processing_class is None:
        processor.save_pretrained(str(output_dir))
    run = {
        "vistune_version": __version__,
        "model_type": plan.model_type.name if plan.model_type else None,
        "template": plan.template.name if plan.template else None,
        "adapter": plan.adapter.name if plan.adapter else None,
        "base_model": str(plan.model_dir.resolve()) if plan.model_dir else None,
        "step": trainer.state.global_step,
        "config": config_to_dict(config),
    }
    tmp = output_dir / f".{RUN_FILE}.tmp"
    tmp.write_text(json.dumps(run, indent=2, default=str) + "\n")
    os.replace(tmp, output_dir / RUN_FILE)
