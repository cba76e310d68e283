"""Building the plan's inference engine through its backend's factory."""

from __future__ import annotations

import sys
from typing import Any

from vistune.plan import Plan
from vistune.specs import load_ref


def create_engine(plan: Plan) -> Any:
    """``Backend.factory(model_path, model_type, config)`` for the plan's backend and model."""
    config = plan.config
    if config.tensor_parallel_size > 1 and not plan.backend.tensor_parallel:
        print(f"note: backend {plan.backend.name} runs the whole model on one device; tensor_parallel_size "
              f"{config.tensor_parallel_size} applies to backends that split a model (vllm, sglang)",
              file=sys.stderr)  # fmt: skip
    factory = load_ref(plan.backend.factory)
    return factory(str(plan.model_dir), plan.model_type, config)
