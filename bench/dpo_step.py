"""DPO on the product path: ``vistune rl --algorithm dpo`` against TRL's ``DPOTrainer``, each as a user runs it.

Both systems run as their own processes on the same saved Llava-1.5-7B-shaped checkpoint
(random weights, built by bench/sft_product.py's ``build_checkpoint``) and the same
preference pairs (one JPEG per pair, a question, a chosen and a rejected answer of about
``--answer-tokens`` tokens each), with the same LoRA targets (language model only),
batch of pairs, max length, bf16, SDPA, beta 0.1, and a LoRA reference (the adapter
disabled: neither system copies the weights):

* ``vistune``: ``python -m vistune rl --algorithm dpo --config FILE``;
* ``trl``: TRL's DPOTrainer VLM recipe (bench/peers/trl_dpo.py).

Settings: ``A`` LoRA q,v, 4 pairs per step, no checkpointing; ``B`` LoRA on all linear
layers + gradient checkpointing; ``P`` as A with the reference log-probabilities
precomputed before training (``precompute_ref_log_probs``: vistune only, TRL's
DPOTrainer refuses it for vision datasets, so its row says so), over the distinct pairs
read once (the precomputing pass over the repeated file would outlast ``--timeout``).

Timing is bench/step_timer's, as in the SFT benchmark: each step's wall time after a GPU
synchronisation, and the peak reserved memory.  ``step_s`` is the median step after
``--warmup``; ``tokens_per_s`` counts the non-pad tokens of the policy's forward (chosen
and rejected sequences, image tokens included).

Usage on a GPU::

    python bench/dpo_step.py --site /tmp/site --out dpo_step.json

``--smoke`` runs vistune's tiny Llava on the CPU for a few steps per system (the test
suite runs it).  Rows: ``{setting, system, step_s, tokens_per_s, peak_reserved_gib,
first_loss, steps, ...}``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from sft_product import build_checkpoint, environment, execute, machine, rl_command, text_of, write_image_records  # noqa: E402

SYSTEMS = ("vistune", "trl")
SETTINGS = {
    "A": {"batch": 4, "targets": "qv", "checkpointing": False, "precompute": False},
    "B": {"batch": 4, "targets": "all-linear", "checkpointing": True, "precompute": False},
    "P": {"batch": 4, "targets": "qv", "checkpointing": False, "precompute": True},
}


def write_pairs(path: Path, model_dir: Path, count: int, answer_tokens: int, *, smoke: bool, repeat: int = 1) -> Path:
    """A JSONL of TRL preference records (``prompt``, ``chosen``, ``rejected``, ``images``) with JPEGs beside it."""

    def record(rng, tokenizer, image: str) -> dict:
        question = text_of(rng, tokenizer, 8 if smoke else 40)
        return {
            "prompt": [{"role": "user", "content": "<image>\n" + question}],
            "chosen": [{"role": "assistant", "content": text_of(rng, tokenizer, answer_tokens)}],
            "rejected": [{"role": "assistant", "content": text_of(rng, tokenizer, answer_tokens)}],
            "images": [image],
        }

    return write_image_records(path, model_dir, count, record, smoke=smoke, repeat=repeat)


def vistune_command(args, run: Path, setting: dict, data: Path) -> list[str]:
    return rl_command(args, run, setting, data, [
        "algorithm: dpo",
        "beta: 0.1",
        f"algorithm_options: {{precompute_ref_log_probs: {str(setting['precompute']).lower()}}}",
        f"per_device_batch_size: {setting['batch']}",
        f"max_length: {args.max_length}",
    ])  # fmt: skip


def trl_command(args, run: Path, setting: dict, data: Path) -> list[str]:
    command = [sys.executable, str(HERE / "peers" / "trl_dpo.py"), "--model", str(args.work / "model"), "--data",
               str(data), "--output-dir", str(run / "out"), "--batch", str(setting["batch"]),
               "--max-length", str(args.max_length), "--targets", setting["targets"]]  # fmt: skip
    return command + ["--gradient-checkpointing"] * setting["checkpointing"] + ["--cpu"] * args.smoke


def run_one(args, setting_name: str, system: str, data: Path) -> dict:
    setting = SETTINGS[setting_name]
    row = {"setting": setting_name, "system": system, **({"label": args.label} if args.label else {})}
    if system == "trl" and setting["precompute"]:
        return {**row, "skipped": "TRL's DPOTrainer refuses precompute_ref_log_probs for vision datasets"}
    run = args.work / "runs" / f"{setting_name}-{system}"
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    command = (vistune_command if system == "vistune" else trl_command)(args, run, setting, data)
    # environment() reads the timer's stop step from args.steps and puts --site on the path (as for the SFT peers)
    env = environment(args, run / "timings", system)
    row = execute(command, env, run, args, row)
    row.pop("profile", None)
    return row


def table(rows: list[dict]) -> str:
    lines = ["| setting | system | step s | tokens/s | peak reserved GiB | first loss |", "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "step_s" not in r:
            lines.append(f"| {r['setting']} | {r['system']} | {r.get('skipped') or r.get('error')} | | | |")
            continue
        lines.append(f"| {r['setting']} | {r['system']} | {r['step_s']:.3f} | {r['tokens_per_s']:.0f} | "
                     f"{r['peak_reserved_gib']:.1f} | {r['first_loss']} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default="A,B,P", type=lambda s: s.split(","))
    parser.add_argument("--systems", default=",".join(SYSTEMS), type=lambda s: s.split(","))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of the timings")
    parser.add_argument("--run-steps", type=int, default=1500, help="steps of the one-epoch run each system is set up for")
    parser.add_argument("--answer-tokens", type=int, default=150, help="tokens of each chosen and rejected answer")
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "dpo-step")
    parser.add_argument("--site", type=Path, help="folder vistune, trl and datasets are installed into (--target)")
    parser.add_argument("--common-site", type=Path, help="folder both systems find (bitsandbytes, liger-kernel)")
    parser.add_argument("--label", help="added to every row")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "dpo_step.json")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per run")
    parser.add_argument("--smoke", action="store_true", help="tiny Llava on the CPU, a few steps per system")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.run_steps, args.answer_tokens = min(args.steps, 3), 1, 12, 12
        SETTINGS.update({k: {**v, "batch": 2} for k, v in SETTINGS.items()})
    unknown = [s for s in args.settings if s not in SETTINGS] + [s for s in args.systems if s not in SYSTEMS]
    if unknown:
        parser.error(f"unknown settings or systems: {unknown}")
    args.swift_site = None  # environment() of the SFT benchmark also serves ms-swift, which this one does not run
    args.work.mkdir(parents=True, exist_ok=True)
    model = build_checkpoint(args.work / "model", args.smoke)
    distinct = args.steps * 4 + 40
    data = write_pairs(args.work / "pairs.jsonl", model, distinct, args.answer_tokens, smoke=args.smoke,
                       repeat=max(1, args.run_steps * 4 // distinct))  # fmt: skip
    # P scores every pair with the reference before its first step: over the long file that pass
    # alone outlasts a run's time limit, so P reads the distinct pairs once.
    once = write_pairs(args.work / "pairs-once.jsonl", model, distinct, args.answer_tokens, smoke=args.smoke)
    rows = []
    for setting in args.settings:
        for system in args.systems:
            row = run_one(args, setting, system, once if SETTINGS[setting]["precompute"] else data)
            rows.append(row)
            print(json.dumps(row), flush=True)
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps({"machine": machine(), "steps": args.steps, "warmup": args.warmup,
                                            "rows": rows}, indent=1) + "\n")  # fmt: skip
    print(table(rows))
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
