"""Every hook a vistune plugin can implement.

A plugin is a module (or object) listed under the ``vistune`` entry-point group.  It
implements any of the hooks below, decorated with :data:`vistune.hookimpl`, and may
accept only the arguments it needs: new arguments can be added to a hook without
breaking existing plugins.  None of the hooks is first-result: every implementation
is called.  PLUGINS.md documents each hook with its exact signature and this content;
tests/test_docs.py keeps the two in step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from vistune import hookspec

# ---------------------------------------------------------------------------
# Registration hooks: called once per process, when the plugin is loaded, with a
# ``register`` callback.  Every result is owned by the core registries.
# ---------------------------------------------------------------------------


@hookspec
def vistune_register_models(register: Callable[[Any], None]) -> None:
    """Register model types and checkpoint aliases.

    :param register: call ``register(vistune.specs.ModelType(...))`` for each model
        family the plugin supports, and ``register(vistune.specs.ModelAlias(...))`` for
        each short checkpoint name (``llava-v1.5-7b``) it knows.
    :returns: nothing; return values are ignored.

    Called once, when plugins are loaded.  Model-type resolution for a checkpoint
    directory tries an explicit ``model_type``, then vistune's saved run config beside
    the checkpoint, then ``config.json``'s ``architectures`` and ``model_type``.
    """


@hookspec
def vistune_register_templates(register: Callable[[Any], None]) -> None:
    """Register chat templates (processors) that encode conversations and images.

    :param register: call ``register(vistune.specs.Template(...))``.  The template's
        factory returns an encoder implementing :class:`vistune.templates.Encoder`.
    :returns: nothing.

    Called once, when plugins are loaded.
    """


@hookspec
def vistune_register_adapters(register: Callable[[Any], None]) -> None:
    """Register adapters: ways to make a model trainable (LoRA, DoRA, full...).

    :param register: call ``register(vistune.specs.Adapter(...))``.
    :returns: nothing.

    Called once, when plugins are loaded.
    """


@hookspec
def vistune_register_algorithms(register: Callable[[Any], None]) -> None:
    """Register RL algorithms (GRPO, DAPO, DPO...).

    :param register: call ``register(vistune.specs.Algorithm(...))``.  The factory
        returns an object implementing :class:`vistune.rl.algorithm.RLAlgorithm`, or, for
        an algorithm with its own ``pipeline`` (learning from stored data), what that
        pipeline trains with.
    :returns: nothing.

    Called once, when plugins are loaded.
    """


@hookspec
def vistune_register_rewards(register: Callable[[Any], None]) -> None:
    """Register reward functions for RL and for scoring inference outputs.

    :param register: call ``register(vistune.specs.Reward(...))``.
    :returns: nothing.

    Called once, when plugins are loaded.
    """


@hookspec
def vistune_register_backends(register: Callable[[Any], None]) -> None:
    """Register inference backends (engines used by ``infer``, ``serve`` and RL rollouts).

    :param register: call ``register(vistune.specs.Backend(...))``.  The factory
        returns an object implementing :class:`vistune.inference.Engine`.
    :returns: nothing.

    Called once, when plugins are loaded.
    """


@hookspec
def vistune_register_datasets(register: Callable[[Any], None]) -> None:
    """Register named datasets and where their local copies live.

    :param register: call ``register(vistune.specs.Dataset(...))``.
    :returns: nothing.

    Called once, when plugins are loaded.
    """


@hookspec
def vistune_register_data_formats(register: Callable[[Any], None]) -> None:
    """Register data formats: how dataset records are written, and sources that are not JSON files.

    :param register: call ``register(vistune.specs.DataFormat(...))``: a record format
        (``read`` and usually ``detect``) or a source format (``open_source`` and
        ``detect_source``).
    :returns: nothing.

    Called once, when plugins are loaded.  A record of a dataset that declares no format
    is read by the one record format whose ``detect`` claims it.
    """


# ---------------------------------------------------------------------------
# Lifecycle hooks: called by the pipelines at fixed points of a run.  Every
# implementation is called; return values are ignored unless stated.
# ---------------------------------------------------------------------------


@hookspec
def vistune_model_loaded(model: Any, processor: Any, model_type: Any, config: Any) -> None:
    """Inspect or modify a model right after it is loaded, before any adapter.

    :param model: the ``transformers`` model, already on its device.
    :param processor: its processor or tokenizer.
    :param model_type: the :class:`vistune.specs.ModelType` it was loaded as.
    :param config: the :class:`vistune.config.RunConfig` of the run.
    :returns: nothing; modify ``model`` in place if needed.

    Called by every pipeline that loads a model (sft, rl, infer, serve, export).
    """


@hookspec
def vistune_adapter_applied(model: Any, adapter: Any, config: Any) -> None:
    """Inspect or modify the trainable model after the adapter is applied.

    :param model: the model returned by the adapter (a ``peft`` model for LoRA).
    :param adapter: the :class:`vistune.specs.Adapter` that was applied.
    :param config: the :class:`vistune.config.RunConfig` of the run.
    :returns: nothing.

    Called by ``sft`` and ``rl`` once, before the trainer is created.
    """


@hookspec
def vistune_trainer_created(trainer: Any, config: Any) -> None:
    """Adjust the trainer before training starts (add callbacks, change arguments).

    :param trainer: the ``transformers.Trainer`` (or TRL trainer) about to train.
    :param config: the :class:`vistune.config.RunConfig` of the run.
    :returns: nothing.

    Called by ``sft`` and ``rl`` in every process, after the trainer is built and
    before ``train()``.
    """


@hookspec
def vistune_checkpoint_saved(path: str, step: int, config: Any) -> None:
    """React to a complete checkpoint (upload it, evaluate it, prune old ones).

    :param path: directory of the checkpoint; it is complete when this is called.
    :param step: the global optimizer step it was saved at.
    :param config: the :class:`vistune.config.RunConfig` of the run.
    :returns: nothing.

    Called on the main process after each checkpoint is atomically in place, and after
    the final model is saved (``step`` is then the last step).
    """


@hookspec
def vistune_rollout_scored(
    prompts: list[Any], completions: list[str], rewards: dict[str, list[float | None]], step: int
) -> None:
    """See every RL rollout batch with its rewards (logging, curriculum, debugging).

    :param prompts: the prompts of the batch, one per completion.
    :param completions: the generated completions.
    :param rewards: reward name -> one score (or ``None``) per completion, unweighted.
    :param step: the global optimizer step.
    :returns: nothing.

    Called by ``rl`` after the rewards of a batch are computed, before advantages.
    """


@hookspec
def vistune_server_started(app: Any, config: Any) -> None:
    """Extend the OpenAI-compatible server (add routes, middleware) before it serves.

    :param app: the ``fastapi.FastAPI`` application.
    :param config: the :class:`vistune.config.RunConfig` of the run.
    :returns: nothing.

    Called by ``serve`` once, after the engine is ready and before the first request.
    """
