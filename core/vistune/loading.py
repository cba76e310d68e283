"""Turning a Plan's resolved specs into live objects: model, processor, encoder, adapter.

Every pipeline loads through these functions so that the lifecycle hooks fire at the
same points whatever the task.
"""

from __future__ import annotations

from typing import Any

from vistune.models import LoadOptions
from vistune.options import spec_option_values
from vistune.plan import Plan
from vistune.plugins import get_plugin_manager
from vistune.specs import load_ref
from vistune.templates import TemplateOptions


def load_options(plan: Plan, *, for_training: bool) -> LoadOptions:
    config = plan.config
    return LoadOptions(
        dtype=config.dtype,
        device=plan.launch.device if plan.launch else config.device,
        attn_implementation=config.attn_implementation,
        quantization=plan.quantization,
        quantization_options=spec_option_values(config, plan.quantization) if plan.quantization else {},
        trust_remote_code=config.trust_remote_code,
        for_training=for_training,
    )


def load_model(plan: Plan, *, for_training: bool) -> tuple[Any, Any]:
    """Load the plan's checkpoint with its model type's loader; fires ``vistune_model_loaded``."""
    spec = plan.model_type
    loader = load_ref(spec.loader)
    model, processor = loader(str(plan.model_dir), load_options(plan, for_training=for_training))
    get_plugin_manager().hook.vistune_model_loaded(model=model, processor=processor, model_type=spec, config=plan.config)
    return model, processor


def make_encoder(plan: Plan, processor: Any):
    """The plan's template, bound to ``processor``."""
    factory = load_ref(plan.template.factory)
    options = TemplateOptions(max_length=plan.config.max_length, truncation=plan.config.truncation,
                              plugin_options=spec_option_values(plan.config, plan.template))  # fmt: skip
    return factory(processor, options)


def apply_adapter(plan: Plan, model: Any) -> Any:
    """Make ``model`` trainable with the plan's adapter; fires ``vistune_adapter_applied``."""
    apply = load_ref(plan.adapter.apply)
    model = apply(model, plan.model_type, plan.config)
    get_plugin_manager().hook.vistune_adapter_applied(model=model, adapter=plan.adapter, config=plan.config)
    return model
