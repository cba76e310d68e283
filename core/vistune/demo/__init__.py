"""``vistune demo``: fine-tune a tiny Llava to caption generated shapes, on CPU, in minutes.

Everything is local: the tiny Llava is built from a config with random weights
(:mod:`vistune.tiny_models`), the ``shapes-captions`` datasets are generated
(:mod:`vistune.demo.shapes`).  Training runs the real ``vistune sft`` command on a
config file the demo writes, so the demo exercises exactly what a user's run does;
then the trained model, loaded back from its output directory, captions the
held-out images.

The recipe is full fine-tuning: the tiny model's output layer and norms are random,
so LoRA on the attention and MLP weights alone cannot make its predictions
confident; training every weight learns the task in a couple of thousand steps.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from vistune import hookimpl

#: Optimizer steps of the default demo (batch 16: 32 epochs of the 1000 training images).  Measured on
#: the 2-core machine: 1200 steps gave 37/40 held-out captions in 61 s, 2000 steps 38/40 in 104 s.
DEFAULT_STEPS = 2000

DEMO_CONFIG = {
    "dataset": "shapes-captions",
    "eval_dataset": "shapes-captions-eval",
    "adapter": "full",
    "freeze_vision_tower": False,
    "dtype": "float32",
    "device": "cpu",
    "learning_rate": 1e-3,
    "lr_scheduler_type": "cosine",
    "warmup_ratio": 0.05,
    "per_device_batch_size": 16,
    "save_total_limit": 1,
    "overwrite_output_dir": True,
    "seed": 0,
    "max_length": 128,
    # 1000 images seen ~20 times: encode each once (the tiny model trains faster than it encodes)
    "cache_encoded": True,
}


def write_config(output_dir: Path, model_dir: Path, max_steps: int) -> Path:
    """The demo's sft config, as a user would write it."""
    import yaml

    values = {
        "task": "sft",
        "model": str(model_dir),
        **DEMO_CONFIG,
        "max_steps": max_steps,
        "save_steps": max(max_steps // 4, 1),  # also how often the held-out loss is measured
        "logging_steps": max(1, min(20, max_steps // 10)),
        "output_dir": str(output_dir / "model"),
    }
    path = output_dir / "demo_sft.yaml"
    path.write_text("# written by `vistune demo`; run it yourself with: vistune sft --config " + str(path) + "\n"
                    + yaml.safe_dump(values, sort_keys=False))  # fmt: skip
    return path


class _EvaluateBeforeTraining:
    """A plugin for the demo's run: evaluate once before the first step, for a 'before' loss."""

    @hookimpl
    def vistune_trainer_created(self, trainer, config):
        trainer.args.eval_on_start = True


def _train(config_path: Path) -> None:
    from vistune.cli import main
    from vistune.plugins import get_plugin_manager

    pm = get_plugin_manager()
    pm.add_plugin(_EvaluateBeforeTraining(), name="vistune-demo-evaluation", distribution="vistune")
    try:
        code = main(["sft", "--config", str(config_path)])
    finally:
        pm.remove_plugin("vistune-demo-evaluation")
    if code != 0:
        raise SystemExit(code)


def _caption_held_out(model_dir: Path, max_new_tokens: int = 8) -> list[dict[str, Any]]:
    """Load the trained model the way ``vistune infer`` would and caption the eval split."""
    from vistune import loading
    from vistune.config import load_config
    from vistune.data.readers import read_dataset
    from vistune.demo.captioning import caption_samples
    from vistune.plan import make_plan
    from vistune.plugins import get_plugin_manager

    loaded = load_config(None, ["--model", str(model_dir), "--dataset", "shapes-captions-eval", "--device", "cpu",
                                "--dtype", "float32"], task="infer")  # fmt: skip
    plan = make_plan(loaded, get_plugin_manager())
    plan.raise_if_not_ready()
    model, processor = loading.load_model(plan, for_training=False)
    encoder = loading.make_encoder(plan, processor)
    samples = list(read_dataset(plan.dataset))
    return caption_samples(model, encoder, samples, max_new_tokens=max_new_tokens)


def summarise(records: list[dict[str, Any]], captions: list[dict[str, Any]], wall_time: float, steps: int) -> dict:
    train = [r["loss"] for r in records if isinstance(r.get("loss"), (int, float))]
    evals = [r["eval_loss"] for r in records if isinstance(r.get("eval_loss"), (int, float))]
    correct = sum(c["correct"] for c in captions)
    return {
        "steps": steps,
        "train_loss_start": train[0] if train else None,
        "train_loss_end": train[-1] if train else None,
        "eval_loss_start": evals[0] if evals else None,
        "eval_loss_end": evals[-1] if evals else None,
        "held_out_correct": correct,
        "held_out_total": len(captions),
        "held_out_accuracy": correct / len(captions) if captions else None,
        "wall_time_s": round(wall_time, 1),
        "examples": captions[:8],
        "mistakes": [c for c in captions if not c["correct"]],
    }


def run_demo(output_dir: str | Path = "vistune-demo", max_steps: int | None = None) -> dict[str, Any]:
    """Build the tiny Llava and the shapes data, fine-tune, caption the held-out images.

    Writes ``demo_sft.yaml``, ``model/`` (the trained model, ``metrics.jsonl``,
    ``loss_curve.png``) and ``demo_summary.json`` into ``output_dir``, prints the
    summary and returns it.
    """
    from vistune.tiny_models import tiny_model_path
    from vistune.training.metrics import read_metrics

    start = time.perf_counter()
    output_dir = Path(output_dir).resolve()
    output_dir.mkdir(parents=True, exist_ok=True)
    steps = DEFAULT_STEPS if max_steps is None else max_steps
    print(f"vistune demo: building the tiny Llava ({tiny_model_path('llava')})", flush=True)
    config_path = write_config(output_dir, tiny_model_path("llava"), steps)
    print(f"vistune demo: vistune sft --config {config_path}", flush=True)
    import torch

    # The tiny model's matrices are too small to split between threads: one thread is about
    # twice as fast as two on a 2-core machine (measured), and leaves the other core to the OS.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        _train(config_path)
        model_dir = output_dir / "model"
        print("vistune demo: captioning the held-out images", flush=True)
        captions = _caption_held_out(model_dir)
    finally:
        torch.set_num_threads(threads)
    summary = summarise(read_metrics(model_dir / "metrics.jsonl"), captions, time.perf_counter() - start, steps)
    summary["config"] = str(config_path)
    summary["loss_curve"] = str(model_dir / "loss_curve.png")
    (output_dir / "demo_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    _print_summary(summary, output_dir)
    return summary


def _print_summary(summary: dict[str, Any], output_dir: Path) -> None:
    def fmt(value):
        return "-" if value is None else f"{value:.3f}"

    print()
    print(f"caption loss (held-out)  {fmt(summary['eval_loss_start'])} -> {fmt(summary['eval_loss_end'])}")
    print(f"training loss            {fmt(summary['train_loss_start'])} -> {fmt(summary['train_loss_end'])}")
    print(f"held-out exact match     {summary['held_out_correct']}/{summary['held_out_total']}"
          f" ({100 * (summary['held_out_accuracy'] or 0):.0f}%)")  # fmt: skip
    shown = summary["examples"][:5] + [m for m in summary["mistakes"][:5] if m not in summary["examples"][:5]]
    for example in shown:
        mark = "ok " if example["correct"] else "BAD"
        print(f"  {mark} {example['reference']!r:24} -> {example['prediction']!r}")
    print(f"wall time                {summary['wall_time_s']:.0f} s ({summary['steps']} steps)")
    print(f"summary                  {output_dir / 'demo_summary.json'}")
    print(f"loss curve               {summary['loss_curve']}")
