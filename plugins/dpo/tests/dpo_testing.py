"""What the preference plugin's tests share besides fixtures: writing records, building the trainer `vistune rl` builds.

A module name of its own: every test folder is on one import path, where `conftest` is the core's.
"""

from __future__ import annotations

import json


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(record) + "\n" for record in records))
    return path


def vistune_trainer(model_dir, dataset, output_dir, algorithm="dpo", *overrides, template="llava-checkpoint"):
    """The trainer ``vistune rl --algorithm ALGORITHM`` builds (same plan, same data path), not yet training.

    ``template`` None: the model type's default template.
    """
    from vistune.config import load_config
    from vistune.pipelines.rl import with_algorithm_defaults
    from vistune.plan import make_plan
    from vistune.plugins import get_plugin_manager
    from vistune.specs import load_ref
    from vistune_dpo.pipeline import build_trainer

    args = ["--model", str(model_dir), "--dataset", str(dataset), "--algorithm", algorithm, "--device", "cpu",
            "--dtype", "float32", "--output_dir", str(output_dir), "--report_to", "[]", *overrides]  # fmt: skip
    if template:
        args += ["--template", template]
    plan = make_plan(load_config(None, args, task="rl"), get_plugin_manager())
    plan.raise_if_not_ready()
    plan = with_algorithm_defaults(plan)
    objective = load_ref(plan.algorithm.factory)(plan.config)
    trainer, processor, _ = build_trainer(plan, objective)
    return trainer, processor
