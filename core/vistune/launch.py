"""Starting the processes of a distributed run.

``vistune sft`` (or ``rl``) with ``gpu_num`` > 1 or ``nnodes`` > 1 runs once as a
launcher: before loading anything it starts the same command under
``torch.distributed.run`` (torchrun), which starts ``gpu_num`` worker processes on this
node and waits for them.  The workers see ``LOCAL_RANK`` in their environment and
train; ``transformers.Trainer`` (through accelerate) sets up DDP, or FSDP with
``parallel_method: fsdp``.  On CPU (``device: cpu``) the processes talk through the
gloo backend, which is how the multi-process path is tested without GPUs; FSDP is
refused there, since accelerate shards only across GPUs and would run DDP instead.

Multi-node: run the same command with the same config on every node, giving each node
its own ``node_rank`` and all of them the first node's address::

    # on node 0 (address 10.0.0.1)
    vistune sft --config run.yaml --nnodes 2 --node_rank 0 --master_addr 10.0.0.1 --master_port 29500
    # on node 1
    vistune sft --config run.yaml --nnodes 2 --node_rank 1 --master_addr 10.0.0.1 --master_port 29500

Every node needs the model, the dataset and ``output_dir`` at the same paths; with
a shared ``output_dir`` only the global main process writes checkpoints and the final
model.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from vistune.errors import VistuneError

#: Set by torchrun in every worker process.
WORKER_ENV = "LOCAL_RANK"
#: The resolved config the launcher hands to its workers, inside output_dir.
LAUNCH_CONFIG_FILE = "vistune_launch_config.yaml"


def inside_launcher() -> bool:
    """True in a process that torchrun (or another launcher setting LOCAL_RANK) started."""
    return WORKER_ENV in os.environ


def is_main_process() -> bool:
    """The global rank 0 (or a single-process run)."""
    return int(os.environ.get("RANK", "0")) == 0


def worker_config(loaded: Any) -> dict[str, Any]:
    """The values the user set (file and flags), already validated, for the workers."""
    config = loaded.config
    return {name: getattr(config, name) for name in loaded.sources if hasattr(config, name)} | {"task": config.task}


def torchrun_command(plan: Any, config_file: str | Path) -> list[str]:
    """``python -m torch.distributed.run ... -m vistune.cli <task> --config <file>``."""
    config = plan.config
    return [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc_per_node", str(config.gpu_num),
        "--nnodes", str(config.nnodes),
        "--node_rank", str(config.node_rank),
        "--master_addr", config.master_addr,
        "--master_port", str(config.master_port),
        "-m", "vistune.cli", config.task, "--config", str(config_file),
    ]  # fmt: skip


def relaunch_if_needed(plan: Any) -> bool:
    """Run the plan's command under torchrun when it asks for several processes.

    Returns False when this process should do the work itself (a single-process run,
    or already a worker); otherwise runs the workers to completion and returns True,
    raising :class:`VistuneError` when they fail.
    """
    import yaml

    if plan.launch is None or not plan.launch.distributed or inside_launcher():
        return False
    output_dir = Path(plan.config.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config_file = output_dir / LAUNCH_CONFIG_FILE
    values = worker_config(plan.loaded)
    # the workers read back exactly the values this process validated
    config_file.write_text(yaml.safe_dump(values, sort_keys=False))
    command = torchrun_command(plan, config_file)
    env = dict(os.environ)
    if plan.launch.device == "cpu":
        env.setdefault("OMP_NUM_THREADS", "1")
    print(f"vistune: starting {plan.config.gpu_num} process(es) on node {plan.config.node_rank}: {' '.join(command)}",
          file=sys.stderr)  # fmt: skip
    result = subprocess.run(command, env=env, check=False)
    if result.returncode != 0:
        raise VistuneError(
            f"the distributed run failed (torchrun exited with {result.returncode})",
            hint="the worker processes' errors are printed above",
        )
    return True
