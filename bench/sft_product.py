"""SFT on the product path: ``vistune sft`` against a Trainer script, TRL and ms-swift, each as a user runs it.

Every system runs as its own process on the same saved checkpoint and the same data
files, with the same LoRA targets (language model only), batch, max length, dtype
(bf16), attention kernel (SDPA) and length of run: one epoch of ``--run-steps`` steps
(what a user's run is; a system that decides something from the run's length, such
as vistune's ``torch_compile: auto``, decides as it would for that run), stopped by
the step timer after ``--steps`` steps:

* ``vistune``: ``python -m vistune sft --config FILE`` with a YAML of documented keys;
* ``hf``: a typical transformers ``Trainer`` + peft script, the processor as collator
  (bench/peers/hf_trainer_sft.py);
* ``trl``: TRL's ``SFTTrainer`` VLM recipe (bench/peers/trl_sft.py);
* ``swift``: ``python -m swift.cli.main sft`` (ms-swift, when importable from ``--swift-site``).

Settings: ``A`` LoRA q,v, batch 4 of ~1k tokens (576 image tokens each), no
checkpointing; ``B`` LoRA on all linear layers + gradient checkpointing; ``C`` an
LLaVA-Instruct-like length mix, padded batches of 4 for every system plus vistune's
``packing: true`` (rows of 4096; the peers have no packing for Llava: TRL refuses it
for vision data, ms-swift for Llava templates); ``D`` the QLoRA reference config
(``quantization: q4_k_m``) at batch 1.  Each system runs with its defaults; A and B
once more with its documented speed switches (``--configs defaults,best``):
torch.compile and Liger where installed, and four loader workers for the peers
(vistune sizes its own).

Timing: bench/step_timer (a ``sitecustomize`` put on every run's ``PYTHONPATH``)
records each step's begin and end after a GPU synchronisation, the input tokens the
model saw, the first logged loss and the peak reserved memory, the same way in every
system.  tokens/s is steady state: non-pad input tokens (image tokens included) of
the steps after ``--warmup``, over their wall time.  ``data_wait_s`` is the median
time a step waited for its batch, ``step_s`` the median step.

Usage on a GPU (one call; see README's Benchmarks section)::

    python bench/sft_product.py --site /tmp/site --swift-site /tmp/swift-site --out results.json

``--smoke`` runs a tiny Llava on the CPU for a few steps per installed system (the
test suite runs it).  Rows: ``{setting, system, config, tokens_per_s,
peak_reserved_gib, first_loss, steps, data_wait_s, step_s, ...}``.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
SYSTEMS = ("vistune", "hf", "trl", "swift")
LORA_REGEX = {"qv": r"^model\.language_model\..*\.(q_proj|v_proj)$", "all-linear": None}
#: Each setting's switches, the same for every system.
SETTINGS = {
    "A": {"data": "fixed", "batch": 4, "targets": "qv", "checkpointing": False},
    "B": {"data": "fixed", "batch": 4, "targets": "all-linear", "checkpointing": True},
    "C": {"data": "mix", "batch": 4, "targets": "qv", "checkpointing": False},
    "D": {"data": "fixed", "batch": 1, "targets": "qv", "checkpointing": False, "nf4": True},
}
#: Settings whose "best" rows are measured too.
BEST_SETTINGS = ("A", "B")
WORDS = (
    "the a red blue green small large circle square picture shows left right top bottom near far object "
    "colour bright dark two three four light shadow table window person dog cat car tree sky road street"
).split()


# -- the checkpoint ----------------------------------------------------------------------------


def build_checkpoint(path: Path, smoke: bool) -> Path:
    """A Llava-1.5-7B-shaped checkpoint with random weights (``--smoke``: vistune's tiny Llava)."""
    if (path / "config.json").is_file():
        return path
    sys.path.insert(0, str(ROOT / "core"))
    from vistune import tiny_models

    if smoke:
        return tiny_models.build_tiny_model("llava", path)
    import torch
    import transformers
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration, LlavaProcessor

    tokenizer = tiny_models.build_tokenizer()
    processor_class = getattr(transformers, "CLIPImageProcessor")
    if importlib.util.find_spec("torchvision") is None:
        processor_class = getattr(transformers, "CLIPImageProcessorPil", processor_class)
    image_processor = processor_class(
        size={"shortest_edge": 336}, crop_size={"height": 336, "width": 336}, do_center_crop=True,
        image_mean=[0.48145466, 0.4578275, 0.40821073], image_std=[0.26862954, 0.26130258, 0.27577711],
    )  # fmt: skip
    LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                   chat_template=tiny_models.CHAT_TEMPLATES["llava"]).save_pretrained(path)  # fmt: skip
    vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                              image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")  # fmt: skip
    text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=32, vocab_size=32064, max_position_embeddings=4096, rms_norm_eps=1e-5,
                       pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
                       eos_token_id=tokenizer.eos_token_id)  # fmt: skip
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         image_seq_length=576, vision_feature_layer=-2, vision_feature_select_strategy="default",
                         projector_hidden_act="gelu")  # fmt: skip
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16)
    with torch.no_grad():  # small random weights keep activations and the first loss finite and alike
        for param in model.parameters():
            if param.dim() > 1:
                param.normal_(std=0.02)
    model.save_pretrained(path)
    del model
    torch.cuda.empty_cache()
    return path


# -- the data --------------------------------------------------------------------------------------


def write_image(path: Path, rng: random.Random, size: tuple[int, int]) -> None:
    """A JPEG of smooth random colour (LLaVA-Instruct's COCO pictures are about 640x480 JPEGs)."""
    from PIL import Image

    small = Image.new("RGB", (8, 6))
    small.putdata([tuple(rng.randrange(256) for _ in range(3)) for _ in range(48)])
    small.resize(size, Image.BILINEAR).save(path, quality=90)


def text_of(rng: random.Random, tokenizer, tokens: int) -> str:
    """Random words that tokenise to about ``tokens`` tokens."""
    words: list[str] = []
    while len(tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]) < tokens:
        words += [rng.choice(WORDS) for _ in range(max(1, (tokens - len(words)) // 3))]
    return " ".join(words)


def write_image_records(path: Path, model_dir: Path, count: int, record, *, smoke: bool, repeat: int = 1) -> Path:
    """A JSONL of ``count`` records (``repeat`` times over), each with one JPEG beside the file; kept if it exists.

    ``record(rng, tokenizer, image)`` makes a record around ``image``, the JPEG's absolute path.
    """
    if path.is_file():
        return path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(0)
    images = path.parent / f"{path.stem}-images"
    images.mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(count):
        image = images.resolve() / f"{i:05d}.jpg"
        write_image(image, rng, (64, 48) if smoke else (640, 480))
        lines.append(json.dumps(record(rng, tokenizer, str(image))))
    path.write_text("\n".join(lines * repeat) + "\n")
    return path


def rl_command(args, run: Path, setting: dict, data: Path, lines: list[str]) -> list[str]:
    """``vistune rl --config`` on the benchmark's checkpoint and ``data`` with LoRA on ``setting``'s targets;
    ``lines`` are the run's own config keys."""
    targets = "[all-linear]" if setting["targets"] == "all-linear" else "[q_proj, v_proj]"
    lines = [f"model: {args.work / 'model'}", f"dataset: {data}", f"output_dir: {run / 'out'}", *lines,
             f"lora_target_modules: {targets}", f"gradient_checkpointing: {str(setting['checkpointing']).lower()}",
             "num_train_epochs: 1", "logging_steps: 1", "save_steps: 100000"]  # fmt: skip
    if args.smoke:
        lines += ["device: cpu", "dtype: float32"]
    config = run / "run.yaml"
    config.write_text("\n".join(lines) + "\n")
    return [sys.executable, "-m", "vistune", "rl", "--config", str(config)]


def write_dataset(path: Path, model_dir: Path, kind: str, count: int, *, smoke: bool, repeat: int = 1,
                  seed: int = 0) -> Path:  # fmt: skip
    """A JSONL of ``{messages, images}`` records with JPEGs beside it.

    ``fixed``: every sample one image and ~442 text tokens (~1018 in all at 576 image
    tokens).  ``mix``: LLaVA-Instruct-like: 90% one image and lognormal text (median
    ~150 tokens), 10% text only and longer; no sample over 2048 tokens.  ``count``
    distinct records, the file holding them ``repeat`` times (an epoch as long as a real
    run's, without writing thousands of pictures).
    """
    if path.is_file():
        return path
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    rng = random.Random(seed)
    images = path.parent / f"{path.stem}-images"
    images.mkdir(parents=True, exist_ok=True)
    size = (64, 48) if smoke else (640, 480)
    scale = 0.1 if smoke else 1.0
    lines = []
    for i in range(count):
        if kind == "fixed":
            with_image, text = True, 442
        elif rng.random() < 0.1:
            with_image, text = False, min(max(int(math.exp(rng.gauss(5.5, 0.9))), 32), 2000)
        else:
            with_image, text = True, min(max(int(math.exp(rng.gauss(5.0, 0.8))), 16), 1400)
        text = max(8, int(text * scale))
        question = text_of(rng, tokenizer, min(24, text // 4))
        answer = text_of(rng, tokenizer, text - min(24, text // 4))
        record = {"messages": [{"role": "user", "content": ("<image>\n" if with_image else "") + question},
                               {"role": "assistant", "content": answer}]}  # fmt: skip
        if with_image:
            name = f"{i:05d}.jpg"
            write_image(images / name, rng, size)
            record["images"] = [str(images.resolve() / name)]  # absolute: ms-swift reads paths from its own folder
        lines.append(json.dumps(record))
    path.write_text("\n".join(lines * repeat) + "\n")
    return path


# -- one run per system ----------------------------------------------------------------------------


def vistune_command(work: Path, run: Path, setting: dict, data: Path, args, best: bool, packing: bool) -> list[str]:
    targets = ["all-linear"] if setting["targets"] == "all-linear" else ["q_proj", "v_proj"]
    lines = [
        f"model: {work / 'model'}",
        f"dataset: {data}",
        f"output_dir: {run / 'out'}",
        f"per_device_batch_size: {1 if packing else setting['batch']}",
        "max_length: 2048",
        f"lora_target_modules: [{', '.join(targets)}]",
        f"gradient_checkpointing: {str(setting['checkpointing']).lower()}",
        "logging_steps: 1",
        "save_steps: 100000",
    ]
    if packing:
        lines += ["packing: true", "max_packed_length: 4096"]
    if setting.get("nf4"):
        lines += ["quantization: q4_k_m", "adapter: lora"]
    if args.smoke:
        lines += ["device: cpu"]
    if best:
        lines += ["torch_compile: true"] + (["liger: true"] if importlib.util.find_spec("liger_kernel") else [])
    lines += args.vistune_set
    config = run / "run.yaml"
    config.write_text("\n".join(lines) + "\n")
    return [sys.executable, "-m", "vistune", "sft", "--config", str(config)]


def peer_command(script: str, run: Path, setting: dict, data: Path, args, best: bool) -> list[str]:
    command = [sys.executable, str(HERE / "peers" / script), "--model", str(args.work / "model"), "--data", str(data),
               "--output-dir", str(run / "out"), "--batch", str(setting["batch"]),
               "--max-length", "2048", "--targets", setting["targets"]]  # fmt: skip
    command += ["--gradient-checkpointing"] * setting["checkpointing"] + ["--nf4"] * bool(setting.get("nf4"))
    return command + ["--best"] * best + ["--cpu"] * args.smoke


def swift_command(run: Path, setting: dict, data: Path, args, best: bool) -> list[str]:
    command = [sys.executable, "-m", "swift.cli.main", "sft", "--model", str(args.work / "model"),
               "--model_type", "llava1_5_hf", "--template", "llava1_5_hf", "--dataset", str(data),
               "--tuner_type", "lora", "--lora_rank", "8", "--lora_alpha", "16", "--lora_dropout", "0.05",
               "--torch_dtype", "float32" if args.smoke else "bfloat16", "--attn_impl", "sdpa",
               "--per_device_train_batch_size", str(setting["batch"]), "--gradient_accumulation_steps", "1",
               "--num_train_epochs", "1", "--max_length", "2048", "--logging_steps", "1", "--save_steps", "100000",
               "--split_dataset_ratio", "0", "--check_model", "false", "--report_to", "none",
               "--gradient_checkpointing", str(setting["checkpointing"]).lower(), "--output_dir", str(run / "out")]  # fmt: skip
    if setting["targets"] == "qv":
        command += ["--target_regex", LORA_REGEX["qv"]]
    if setting.get("nf4"):
        command += ["--quant_method", "bnb", "--quant_bits", "4", "--bnb_4bit_quant_type", "nf4",
                    "--bnb_4bit_use_double_quant", "true", "--bnb_4bit_compute_dtype", "bfloat16"]  # fmt: skip
    if best:
        command += ["--torch_compile", "true", "--dataloader_num_workers", "4"]
        if importlib.util.find_spec("liger_kernel"):
            command += ["--use_liger_kernel", "true"]
    return command


def environment(args, timings: Path, system: str) -> dict:
    env = dict(os.environ, SFT_BENCH_TIMINGS=str(timings), SFT_BENCH_STOP_AFTER=str(args.steps), PYTHONUNBUFFERED="1")
    paths = [str(HERE / "step_timer")]
    if system == "swift":
        paths.append(str(args.swift_site))
        env.update(USE_HF="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                   MODELSCOPE_CACHE=str(args.work / "ms-cache"))  # fmt: skip
    else:
        if args.site:
            paths.append(str(args.site))
        paths.append(str(HERE / "peers"))
    if args.common_site:
        paths.append(str(args.common_site))
    paths.append(env.get("PYTHONPATH", ""))
    env["PYTHONPATH"] = os.pathsep.join(p for p in paths if p)
    return env


def available(system: str, args) -> str | None:
    """Why ``system`` cannot run here, or None."""
    if system == "swift":
        if not (args.swift_site and (Path(args.swift_site) / "swift").is_dir()) and not importlib.util.find_spec("swift"):
            return "ms-swift is not installed (--swift-site)"
    if system == "trl" and not importlib.util.find_spec("trl") and not (args.site and (Path(args.site) / "trl").is_dir()):
        return "trl is not installed"
    return None


def summarise(timings: Path, warmup: int, timed_steps: int) -> dict:
    """tokens/s and phase medians of the first ``timed_steps`` steps, from the timer's file of the process that trained."""
    files = sorted(timings.glob("*.json"))
    if not files:
        raise RuntimeError("the run wrote no step timings (did training start?)")
    record = max((json.loads(f.read_text()) for f in files), key=lambda r: len(r["tokens"]))
    steps = min(len(record["tokens"]), timed_steps)
    begins, ends, tokens = record["step_begin_s"], record["step_end_s"], record["tokens"]
    warm = min(warmup, steps - 1)
    elapsed = ends[steps] - ends[warm]
    waits = [begins[i] - ends[i] for i in range(warm, steps)]
    spans = [ends[i + 1] - ends[i] for i in range(warm, steps)]
    return {
        "tokens_per_s": sum(tokens[warm:]) / elapsed if elapsed > 0 else 0.0,
        "peak_reserved_gib": round(record["peak_reserved_gib"], 2),
        "first_loss": record["first_loss"],
        "steps": steps,
        "measured_steps": steps - warm,
        "tokens_per_step": statistics.mean(tokens[warm:]) if steps > warm else 0,
        "data_wait_s": statistics.median(waits) if waits else 0.0,
        "step_s": statistics.median(spans) if spans else 0.0,
        "first_step_s": ends[1] - ends[0] if steps else None,
        "step_spans_s": [round(ends[i + 1] - ends[i], 4) for i in range(steps)],
        "profile": record.get("profile"),
    }


def run_one(args, setting_name: str, system: str, config: str, *, packing: bool = False) -> dict:
    setting = SETTINGS[setting_name]
    label = f"{setting_name}-{system}-{config}" + ("-packed" if packing else "") + (f"-{args.label}" if args.label else "")
    row = {"setting": setting_name, "system": system, "config": config, "layout": "packed" if packing else "padded",
           **({"label": args.label} if args.label else {})}  # fmt: skip
    reason = available(system, args)
    if reason:
        return {**row, "skipped": reason}
    run = args.work / "runs" / label
    shutil.rmtree(run, ignore_errors=True)
    run.mkdir(parents=True)
    data = args.work / f"data-{setting['data']}.jsonl"
    best = config == "best"
    if system == "vistune":
        command = vistune_command(args.work, run, setting, data, args, best, packing)
    elif system == "swift":
        command = swift_command(run, setting, data, args, best)
    else:
        command = peer_command(f"{'hf_trainer' if system == 'hf' else 'trl'}_sft.py", run, setting, data, args, best)
    env = environment(args, run / "timings", system)
    if system == "vistune" and args.profile and config == "defaults":  # three steps after the timed ones
        env.update(SFT_BENCH_PROFILE=f"{args.steps + 1}-{args.steps + 3}", SFT_BENCH_STOP_AFTER=str(args.steps + 3))
    return execute(command, env, run, args, row)


def execute(command: list[str], env: dict, run: Path, args, row: dict) -> dict:
    """Run one system's command in ``run`` (log in ``log.txt``) and return ``row`` with its timings, or why it failed."""
    start = time.perf_counter()
    with (run / "log.txt").open("w") as log:
        log.write(" ".join(command) + "\n")
        log.flush()
        try:
            code = subprocess.run(command, env=env, stdout=log, stderr=subprocess.STDOUT, timeout=args.timeout,
                                  cwd=run).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            code = "timeout"
    row["wall_s"] = round(time.perf_counter() - start, 1)
    try:
        row.update(summarise(run / "timings", args.warmup, args.steps))
    except Exception as exc:  # noqa: BLE001 - a failed run is a row that says why
        tail = (run / "log.txt").read_text().splitlines()[-15:]
        return {**row, "error": f"exit {code}: {exc}", "log_tail": tail}
    if code != 0:
        row["error"] = f"exit {code} after training"
        row["log_tail"] = (run / "log.txt").read_text().splitlines()[-15:]
    return row


# -- the whole benchmark -------------------------------------------------------------------------------


def plan(args) -> list[tuple[str, str, str, bool]]:
    """(setting, system, config, packing) of every run, in order."""
    runs = []
    for setting in args.settings:
        for config in args.configs:
            if config == "best" and setting not in BEST_SETTINGS:
                continue
            for system in args.systems:
                runs.append((setting, system, config, False))
            if setting == "C" and config == "defaults" and "vistune" in args.systems:
                runs.append((setting, "vistune", config, True))
    return runs


def table(rows: list[dict]) -> str:
    lines = ["| setting | system | config | layout | tokens/s | peak reserved GiB | first loss | data wait s | step s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]  # fmt: skip
    for r in rows:
        if "tokens_per_s" not in r:
            lines.append(f"| {r['setting']} | {r['system']} | {r['config']} | {r['layout']} | "
                         f"{r.get('skipped') or r.get('error')} | | | | |")  # fmt: skip
            continue
        lines.append(f"| {r['setting']} | {r['system']} | {r['config']} | {r['layout']} | {r['tokens_per_s']:.0f} | "
                     f"{r['peak_reserved_gib']:.1f} | {r['first_loss']} | {r['data_wait_s']:.3f} | {r['step_s']:.3f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", default="A,B,C,D", type=lambda s: s.split(","))
    parser.add_argument("--systems", default=",".join(SYSTEMS), type=lambda s: s.split(","))
    parser.add_argument("--configs", default="defaults,best", type=lambda s: s.split(","))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=10, help="first steps left out of tokens/s")
    parser.add_argument("--run-steps", type=int, default=1500,
                        help="steps of batch 4 in the one-epoch run every system is configured for (stopped after --steps)")
    parser.add_argument("--work", type=Path, default=Path(os.environ.get("TMPDIR", "/tmp")) / "sft-product")
    parser.add_argument("--site", type=Path, help="folder vistune, trl and datasets are installed into (--target)")
    parser.add_argument("--swift-site", type=Path, help="folder ms-swift's wheels are installed into")
    parser.add_argument("--common-site", type=Path, help="folder every system finds (bitsandbytes, liger-kernel)")
    parser.add_argument("--label", help="added to every row (e.g. the vistune version measured)")
    parser.add_argument("--vistune-set", action="append", default=[], metavar="'KEY: VALUE'",
                        help="a line added to every vistune config (a candidate default; name it with --label)")
    parser.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "sft_product.json")
    parser.add_argument("--timeout", type=int, default=900, help="seconds per run")
    parser.add_argument("--profile", action="store_true", help="torch profiler table of vistune's default runs")
    parser.add_argument("--smoke", action="store_true", help="tiny Llava on the CPU, a few steps per system")
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.warmup, args.run_steps = min(args.steps, 3), min(args.warmup, 1), min(args.run_steps, 20)
        SETTINGS.update({k: {**v, "batch": 2} for k, v in SETTINGS.items()})
    unknown = [s for s in args.settings if s not in SETTINGS] + [s for s in args.systems if s not in SYSTEMS]
    if unknown:
        parser.error(f"unknown settings or systems: {unknown}")
    args.work.mkdir(parents=True, exist_ok=True)
    model = build_checkpoint(args.work / "model", args.smoke)
    count = args.steps * 4 + 40
    for kind in {SETTINGS[s]["data"] for s in args.settings}:
        distinct = count * (3 if kind == "mix" else 1)
        write_dataset(args.work / f"data-{kind}.jsonl", model, kind, distinct, smoke=args.smoke,
                      repeat=max(1, args.run_steps * 4 // distinct))  # fmt: skip
    info = {"machine": machine(), "steps": args.steps, "warmup": args.warmup}
    rows = []
    for setting, system, config, packing in plan(args):
        row = run_one(args, setting, system, config, packing=packing)
        profile = row.pop("profile", None)
        if profile:
            name = "-".join([setting, system, config] + ([args.label] if args.label else []))
            (args.out.parent / f"profile-{name}.txt").write_text(profile)
        rows.append(row)
        print(json.dumps(row), flush=True)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({**info, "rows": rows}, indent=1) + "\n")
    print(table(rows))
    return 1 if any("error" in r for r in rows) else 0


def machine() -> str:
    try:
        import torch

        if torch.cuda.is_available():
            return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    except ImportError:
        pass
    return f"CPU ({os.cpu_count()} cores)"


if __name__ == "__main__":
    sys.exit(main())
