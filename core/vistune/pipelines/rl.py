"""``vistune rl``: reinforcement learning with an algorithm plugin and reward plugins.

The policy starts from the plan's model: a checkpoint, or what ``vistune sft`` wrote.
An SFT adapter directory (``adapter_config.json`` next to ``vistune_run.json``, or
``adapter_path``) is loaded onto its base model and, under an adapter whose spec says
``peft_adapter`` (LoRA, DoRA, QLoRA, or a plugin's), trained further, so the result is
again one adapter on the original base model; under any other adapter it is merged first.  Otherwise the configured adapter is applied as in
``sft``.  The reference model of a KL term is the starting policy: the base with the
adapter disabled, a frozen copy of the SFT adapter, or (full fine-tuning) a second,
frozen copy of the model.

Algorithm ``defaults`` (DAPO's ``epsilon_high: 0.28``) apply to every key the user's
config does not set.  An algorithm whose spec names a ``pipeline`` (preference
optimisation on stored pairs) is handed the plan, defaults applied, and runs itself.  The run writes ``metrics.jsonl`` and TensorBoard logs (rewards
per function, KL, clip fractions, completion lengths, filtered groups), checkpoints,
and at the end the adapter or model, the processor, ``vistune_run.json`` and
``reward_curve.png`` into ``output_dir``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs

from vistune import launch
from vistune.config import build_config
from vistune.errors import ConfigError
from vistune.outputs import prepare_output_dir
from vistune.pipelines.export import ADAPTER_CONFIG, resolve_dirs
from vistune.plan import Plan
from vistune.training import checkpoints
from vistune.training.arguments import check_liger

#: Name of the frozen copy of an SFT adapter that serves as the KL reference.
REFERENCE_ADAPTER = "reference"
REWARD_CURVE = "reward_curve.png"


def run(plan: Plan) -> None:
    """Train the plan's model with its algorithm and rewards; save the result to ``output_dir``."""
    from vistune.pipelines.sft import ensure_built

    plan = with_algorithm_defaults(plan)
    if plan.algorithm is not None and plan.algorithm.pipeline is not None:
        from vistune.specs import load_ref

        return load_ref(plan.algorithm.pipeline)(plan)  # an algorithm that trains its own way (offline data)
    config = plan.config
    prepare_output_dir(config.output_dir, f"{plan.loaded.where('output_dir')}: output_dir")
    check_liger(plan.loaded)
    refuse_unsupported(plan)
    resume_from = checkpoints.resolve_resume(
        config, where=plan.loaded.where("resume"), may_delete=launch.is_main_process()
    )
    if plan.dataset is not None:
        ensure_built(plan.dataset)
    if launch.relaunch_if_needed(plan):
        return
    trainer, processor, base_dir = build_trainer(plan)
    if resume_from is not None:
        print(f"vistune: resuming from {resume_from}", flush=True)
    try:
        trainer.train(resume_from_checkpoint=str(resume_from) if resume_from else None)
    finally:
        trainer.close_engine()
    # a run shorter than the scorer's limit, which a reward failed throughout, trained on nothing from it
    trainer.scorer.raise_if_failing_throughout(finished=True)
    save_final(trainer, processor, plan, base_dir)
    if trainer.args.should_save:
        from vistune.training.metrics import read_metrics

        plot_reward_curve(
            read_metrics(Path(config.output_dir) / "metrics.jsonl"), Path(config.output_dir) / REWARD_CURVE
        )


def with_algorithm_defaults(plan: Plan) -> Plan:
    """The plan with its algorithm's ``defaults`` filled in where the user set nothing."""
    spec = plan.algorithm
    if spec is None or not spec.defaults:
        return plan
    unset = {key: value for key, value in spec.defaults.items() if key not in plan.loaded.sources}
    if not unset:
        return plan
    converted = build_config(unset, path=f"defaults of algorithm {spec.name!r}").config
    config = attrs.evolve(plan.config, **{key: getattr(converted, key) for key in unset})
    if config.epsilon_high is not None and config.epsilon_high < config.epsilon:
        raise ConfigError(
            f"{plan.loaded.where('epsilon')}: epsilon {config.epsilon} is above algorithm {spec.name}'s epsilon_high "
            f"{config.epsilon_high}",
            hint="set epsilon_high too, at least as large as epsilon",
        )
    return attrs.evolve(plan, loaded=attrs.evolve(plan.loaded, config=config))


def refuse_unsupported(plan: Plan) -> None:
    """Raise ConfigError, before anything loads, for a backend that cannot sample from the policy in memory."""
    from vistune.rl.rollout import engine_factory

    engine_factory(plan.backend)


def policy_dirs(plan: Plan) -> tuple[Path, Path | None]:
    """``(base model directory, SFT adapter directory or None)`` the policy starts from."""
    if plan.config.adapter_path or (plan.model_dir / ADAPTER_CONFIG).is_file():
        return resolve_dirs(plan)
    return plan.model_dir, None


def load_policy(plan: Plan, needs_reference: bool) -> tuple[Any, Any, Path, str | None, Any]:
    """The trainable policy and what a KL term compares it with.

    ``needs_reference`` is the algorithm's :meth:`~vistune.rl.algorithm.RLAlgorithm.needs_reference_model`.
    Returns ``(model, processor, base_dir, ref_adapter, ref_model)``:
    ``ref_adapter`` names a frozen adapter holding the reference, ``ref_model`` is a separate
    frozen model; both None means "the policy with its adapter disabled".
    """
    from vistune import loading
    from vistune.plugins import get_plugin_manager

    base_dir, adapter_dir = policy_dirs(plan)
    base_plan = attrs.evolve(plan, model_dir=base_dir)
    model, processor = loading.load_model(base_plan, for_training=True)
    ref_adapter = ref_model = None
    if adapter_dir is not None and plan.adapter.peft_adapter:
        from peft import PeftModel

        print(f"vistune: training on the adapter {adapter_dir} (base {base_dir})", flush=True)
        model = PeftModel.from_pretrained(model, str(adapter_dir), is_trainable=True)
        if needs_reference:
            model.load_adapter(str(adapter_dir), adapter_name=REFERENCE_ADAPTER, is_trainable=False)
            model.set_adapter("default")
            ref_adapter = REFERENCE_ADAPTER
        get_plugin_manager().hook.vistune_adapter_applied(model=model, adapter=plan.adapter, config=plan.config)
        return model, processor, base_dir, ref_adapter, None
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    if needs_reference and not plan.adapter.peft_adapter:
        import copy

        ref_model = copy.deepcopy(model).eval()
        for param in ref_model.parameters():
            param.requires_grad_(False)
    model = loading.apply_adapter(base_plan, model)
    return model, processor, base_dir, None, ref_model


def build_trainer(plan: Plan):
    """Policy, prompts, rewards, algorithm and :class:`RLTrainer`; fires ``vistune_trainer_created``.

    Returns ``(trainer, processor, base_dir)``.
    """
    from transformers import set_seed
    from transformers.trainer_callback import PrinterCallback, ProgressCallback

    from vistune import loading
    from vistune.data.validation import print_line, read_validated
    from vistune.pipelines.sft import adapter_trainer_overrides
    from vistune.plugins import get_plugin_manager
    from vistune.rl.rewards import FAILED_BATCHES_LIMIT, RewardScorer, load_rewards
    from vistune.rl.rollout import PromptDataset
    from vistune.rl.trainer import RLTrainer
    from vistune.specs import load_ref
    from vistune.training.arguments import training_arguments
    from vistune.training.metrics import MetricsCallback

    config = plan.config
    pm = get_plugin_manager()
    set_seed(config.seed)
    algorithm = load_ref(plan.algorithm.factory)(config)
    scorer = RewardScorer(load_rewards(plan.rewards, pm), config.reward_error_policy,
                          max_failed_batches=FAILED_BATCHES_LIMIT)  # fmt: skip
    # every record checked before the model loads
    records = read_validated(plan.dataset, config, log=print_line if launch.is_main_process() else None)
    model, processor, base_dir, ref_adapter, ref_model = load_policy(plan, algorithm.needs_reference_model())
    encoder = loading.make_encoder(plan, processor)
    prompts = PromptDataset(records)
    args = training_arguments(config, plan.launch.device, has_eval=False, include_num_input_tokens_seen="no",
                              model_config=getattr(model, "config", None),
                              **adapter_trainer_overrides(plan))  # fmt: skip
    trainer = RLTrainer(
        model=model,
        args=args,
        train_dataset=prompts,
        processing_class=processor,
        vistune_config=config,
        model_type=plan.model_type,
        algorithm=algorithm,
        scorer=scorer,
        encoder=encoder,
        backend=plan.backend,
        ref_model=ref_model,
        ref_adapter=ref_adapter,
    )
    if ref_model is not None:  # where the Trainer has put the policy
        ref_model.to(next(model.parameters()).device)
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(MetricsCallback(config.output_dir, config.report_to))
    print(f"vistune: {algorithm!r}; rewards: "
          + ", ".join(f"{name} x {weight:g}" for name, weight in scorer.weights.items()), flush=True)  # fmt: skip
    pm.hook.vistune_trainer_created(trainer=trainer, config=config)
    return trainer, processor, base_dir


def save_final(trainer, processor, plan: Plan, base_dir: Path) -> Path:
    """Save the trained adapter (or model), processor and ``vistune_run.json`` to ``output_dir``.

    The frozen reference adapter is dropped first, so the directory holds only the
    trained adapter, on the original base model, loadable with plain peft.
    """
    from vistune.pipelines.sft import save_final as save_trained

    model = trainer.accelerator.unwrap_model(trainer.model)
    if REFERENCE_ADAPTER in (getattr(model, "peft_config", None) or {}):
        model.delete_adapter(REFERENCE_ADAPTER)
    return save_trained(trainer, processor, attrs.evolve(plan, model_dir=Path(base_dir)))


def plot_reward_curve(records: list[dict[str, Any]], path: Path) -> Path | None:
    """Save the mean total reward, and each reward's mean, against step as a PNG; None when nothing was logged."""
    from matplotlib.figure import Figure

    total = [(r["step"], r["reward"]) for r in records if isinstance(r.get("reward"), (int, float))]
    if not total:
        return None
    names = sorted({k for r in records for k in r if k.startswith("reward/")})
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.add_subplot()
    ax.plot(*zip(*total), label="reward (weighted total)", linewidth=2)
    for name in names if len(names) > 1 else []:
        points = [(r["step"], r[name]) for r in records if isinstance(r.get(name), (int, float))]
        if points:
            ax.plot(*zip(*points), label=name, alpha=0.7)
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.set_title("RL rollout reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return path
