"""The pipelines: each turns a ready :class:`vistune.plan.Plan` into work.

Each task lives in its own module with a ``run(plan)`` function, imported only when
that task runs.
"""

from __future__ import annotations

import importlib

from vistune.plan import Plan


def run_pipeline(plan: Plan) -> None:
    module = importlib.import_module(f"vistune.pipelines.{plan.config.task}")
    module.run(plan)
