"""GRPO on the product path: the step time and peak memory of ``vistune rl --algorithm grpo`` on the 7B shape.

Why: a GRPO step is a rollout (generation of every completion) and a training pass over
the completions, and both were unmeasured on a Llava-1.5-7B-shaped model; and the
rollout engine's KV cache is freed before the training pass, so the question is
whether the allocator keeps holding what generation took (the whole card) while
training runs.  It should not: peak reserved memory should stay within 1.5x peak
allocated (``reserved_over_allocated`` in the rows).

The run is ``python -m vistune rl --config FILE`` as its own process, as a user runs it,
on the Llava-1.5-7B-shaped checkpoint with random weights of bench/sft_product.py's
``build_checkpoint`` (reused from ``--work``/model when present), algorithm ``grpo``
(its defaults: beta 0, so no reference pass; one optimizer step per rollout), reward
``bleu`` against each record's reference answer, LoRA on the language model, bf16,
SDPA, the transformers rollout engine.  Each step: 8 prompts (one 640x480 JPEG and a
short question each, ~590 prompt tokens with the 576 image tokens) x 8 generations x
at most 64 new tokens.  The run is set up as one epoch of ``--run-steps`` steps and
stopped after ``--steps``.

Settings: ``A`` LoRA q,v with gradient checkpointing; ``B`` the same without it (it has
run out of memory on an H200: a row that records the out-of-memory error, or the plan's
refusal, with its message is a result, not a failure of the benchmark).

Timing is bench/step_timer's, as in the SFT and DPO benchmarks: each step's wall time
between GPU synchronisations, the seconds of the step spent in the rollout's generation
(the RL trainer's ``_sample``), and the peak allocated and reserved memory
(``torch.cuda.max_memory_allocated`` / ``max_memory_reserved``) of the run.  ``step_s``,
``generation_s`` and ``train_s`` (the rest of the step: scoring, log-probabilities,
backward, optimizer) are means over the steps after ``--warmup``.  ``first_loss`` is the
first logged loss: with beta 0 the first step is on-policy (ratio 1) and its advantages
sum to zero per group, so it is 0 give or take rounding; a non-finite value is the sign
of trouble.

Usage on a GPU::

    python bench/grpo_step.py --work /tmp/bench --site /tmp/site --common-site /tmp/common --out grpo_step.json

``--smoke`` runs vistune's tiny Llava on the CPU for a few steps with tiny generations
(the test suite runs it).  Rows: ``{system, setting, step_s, generation_s, train_s,
peak_allocated_gib, peak_reserved_gib, reserved_over_allocated, first_loss, steps, ...}``
or ``{system, setting, error, log_tail}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from sft_product import build_checkpoint, environment, execute, machine, rl_command, text_of, write_image_records  # noqa: E402

SETTINGS = {
    "A": {"targets": "qv", "checkpointing": True},
    "B": {"targets": "qv", "checkpointing": False},
}
#: prompts per step, completions per prompt, longest completion (``--smoke`` shrinks them).
SHAPE = {"prompts": 8, "generations": 8, "new_tokens": 64}
SMOKE_SHAPE = {"prompts": 2, "generations": 2, "new_tokens": 4}


def write_prompts(path: Path, model_dir: Path, count: int, question_tokens: int, answer_tokens: int, *,
                  smoke: bool, repeat: int = 1) -> Path:  # fmt: skip
    """A JSONL of RL prompts: the user's question with one JPEG, and the ``answer`` bleu scores against."""

    def record(rng, tokenizer, image: str) -> dict:
        return {
            "messages": [{"role": "user", "content": "<image>\n" + text_of(rng, tokenizer, question_tokens)}],
            "answer": text_of(rng, tokenizer, answer_tokens),
            "images": [image],
        }

    return write_image_records(path, model_dir, count, record, smoke=smoke, repeat=repeat)


def vistune_command(args, run: Path, setting: dict, data: Path) -> list[str]:
    return rl_command(args, run, setting, data, [
        "algorithm: grpo",
        "rewards: [bleu]",
        f"per_device_batch_size: {args.shape['prompts']}",
        f"num_generations: {args.shape['generations']}",
        f"max_completion_length: {args.shape['new_tokens']}",
        "report_to: [jsonl]",
    ])  # fmt: skip


def generation_and_memory(timings: Path, warmup: int, timed_steps: int) -> dict:
    """What the step timer records beyond sft_product's ``summarise``: generation seconds and peak allocated memory.

    Read from the same record ``summarise`` reads (the process with the most steps).
    """
    record = max((json.loads(f.read_text()) for f in timings.glob("*.json")), key=lambda r: len(r["tokens"]))
    steps = min(len(record["tokens"]), timed_steps)
    warm = min(warmup, steps - 1)
    spans = [record["step_end_s"][i + 1] - record["step_end_s"][i] for i in range(warm, steps)]
    generation = record.get("generation_s", [])[warm:steps]
    allocated, reserved = record["peak_allocated_gib"], record["peak_reserved_gib"]
    out = {
        "step_s": statistics.mean(spans),
        "peak_allocated_gib": round(allocated, 2),
        "peak_reserved_gib": round(reserved, 2),
        "reserved_over_allocated": round(reserved / allocated, 3) if allocated else None,
    }
    if len(generation) == len(spans):  # the timer saw the RL trainer's rollouts
        out["generation_s"] = statistics.mean(generation)
        out["train_s"] = out["step_s"] - out["generation_s"]
        out["generation_spans_s"] = [round(g, 4) for g in record["generation_s"][:steps]]
    return out


def failure(row: dict) -> dict:
    """``row``'s error with the run's own message (an out-of-memory error, the plan's refusal) appended."""
    markers = ("OutOfMemoryError", "out of memory", "Error:", "error:")
    lines = [line.strip() for line in row.get("log_tail", []) if any(m in line for m in markers)]
    if lines:
        row["error"] = f"{row['error']}: {lines[-1]}"
    return row


def run_one(args, setting_name: str, data: Path) -> dict:
    setting = SETTINGS[setting_name]
    row = {"system": "vistune", "setting": setting_name, **({"label": args.label} if args.label else {})}
    run = args.work / "runs" / f"grpo-{setting_name}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    command = vistune_command(args, run, setting, data)
    # environment() reads the timer's stop step from args.steps and puts --site and --common-site on the path
    row = execute(command, environment(args, run / "timings", "vistune"), run, args, row)
    row.pop("profile", None)
    if "error" in row and "step_s" not in row:
        return failure(row)
    row.update(generation_and_memory(run / "timings", args.warmup, args.steps))
    return failure(row) if "error" in row else row


def table(rows: list[dict]) -> str:
    lines = ["| setting | system | step s | generation s | train s | peak allocated GiB | peak reserved GiB | "
             "reserved / allocated | first loss |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        if "step_s" not in r:
            lines.append(f"| {r['setting']} | {r['system']} | {r.get('error')} | | | | | | |")
            continue
        gen, train = r.get("generation_s"), r.get("train_s")
        lines.append(f"| {r['setting']} | {r['system']} | {r['step_s']:.3f} | "
                     f"{'' if gen is None else f'{gen:.3f}'} | {'' if train is None else f'{train:.3f}'} | "
                     f"{r['peak_allocated_gib']:.1f} | {r['peak_reserved_gib']:.1f} | {r['reserved_over_allocated']} | "
                     f"{r['first_loss']} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default=",".join(SETTINGS), type=lambda s: s.split(","))
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=3, help="first steps left out of the means")
    parser.add_argument("--run-steps", type=int, default=500, help="steps of the one-epoch run the config is set up for")
    parser.add_argument("--question-tokens", type=int, default=8, help="text tokens of each prompt besides the image")
    parser.add_argument("--answer-tokens", type=int, default=64, help="tokens of each reference answer (for bleu)")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "grpo-step")
    parser.add_argument("--site", type=Path, help="folder vistune and its dependencies are installed into (--target)")
    parser.add_argument("--common-site", type=Path, help="further folder put on the run's path (bitsandbytes, liger-kernel)")
    parser.add_argument("--label", help="added to every row")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "grpo_step.json")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per run")
    parser.add_argument("--smoke", action="store_true", help="tiny Llava on the CPU, a few steps, tiny generations")
    args = parser.parse_args(argv)
    args.shape = dict(SHAPE)
    if args.smoke:
        args.steps, args.warmup, args.run_steps = min(args.steps, 3), 1, 6
        args.question_tokens, args.answer_tokens, args.shape = 4, 6, dict(SMOKE_SHAPE)
    unknown = [s for s in args.settings if s not in SETTINGS]
    if unknown:
        parser.error(f"--settings: unknown settings {unknown} (known: {', '.join(SETTINGS)})")
    if not 0 <= args.warmup < args.steps:
        parser.error(f"--warmup must be below --steps ({args.steps}), got {args.warmup}")
    args.swift_site = None  # environment() of the SFT benchmark also serves ms-swift, which this one does not run
    args.work.mkdir(parents=True, exist_ok=True)
    model = build_checkpoint(args.work / "model", args.smoke)
    distinct = (args.steps + 2) * args.shape["prompts"]
    data = write_prompts(args.work / "grpo-prompts.jsonl", model, distinct,
                         args.question_tokens, args.answer_tokens, smoke=args.smoke,
                         repeat=max(1, args.run_steps * args.shape["prompts"] // distinct))  # fmt: skip
    info = {"machine": machine(), "steps": args.steps, "warmup": args.warmup, **args.shape}
    rows = []
    for setting in args.settings:
        row = run_one(args, setting, data)
        rows.append(row)
        print(json.dumps(row), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**info, "rows": rows}, indent=1) + "\n")
    print(table(rows))
    # a run that failed (B out of memory) is a result in its row; a benchmark that could not write rows is not
    return 0


if __name__ == "__main__":
    sys.exit(main())
