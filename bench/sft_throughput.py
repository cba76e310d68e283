"""SFT throughput on one GPU: plain transformers + peft against vistune's SFT path, in one process.

The model is Llava-1.5-7B-shaped (CLIP ViT-L/14-336 + Llama-2-7B, 576 image tokens per
image) with random weights built from configs, bf16, SDPA: nothing is downloaded.  Both
sides run the same hand-written loop (bf16 autocast, fused AdamW on the trainable
parameters, pre-built batches copied to the GPU inside the step); what differs is how
the model is prepared and how the loss is computed:

* plain: ``peft.get_peft_model`` with LoRA on the language model's q_proj/v_proj
  (a regex, so the CLIP tower is not adapted), ``model(**batch).loss``.
* vistune: ``vistune.adapters.lora.apply_lora`` (same modules), the loss on labelled
  positions only (``vistune.training.lm_loss.causal_lm_loss``), regional
  ``torch.compile`` of the transformer blocks (``vistune.training.compile``,
  ``torch_compile: true``), and for packing ``vistune.data.packing`` with the
  per-sample flash attention of ``vistune.attention``.

Settings (``--settings``, comma-separated; default all):

``check``  packed rows under vistune's attention give the per-sample logits, loss and LoRA
           gradients of unpacked samples (a 2-layer model of the same widths, bf16).
``a``      fixed batches of 4 x 1024 tokens, LoRA r8 on q,v: tokens/s and peak memory.
``a2``     same batches, LoRA on all linear layers of the language model + gradient checkpointing.
``b``      a variable-length mix (LLaVA-Instruct-like: 576 image tokens + lognormal text,
           some text-only samples): effective (non-pad) tokens/s, padding vs packing.
``c``      QLoRA (bitsandbytes NF4 language model) peak memory at 1 x 1024 (skipped
           without bitsandbytes).

Usage: ``python bench/sft_throughput.py [--settings a,b] [--out results.json]``.  Results go
to ``--out``, else ``$OUT/sft_throughput.json``, else ``./sft_throughput.json`` (written after
every measurement), and a markdown table is printed at the end.  One full run takes
longer than ten minutes; split it, e.g. ``--settings check,a,a2``, then ``b``, then ``c``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

try:
    import vistune  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "core"))

from vistune.config import build_config  # noqa: E402
from vistune.specs import ModelType  # noqa: E402
from vistune.templates import IGNORE_INDEX  # noqa: E402

LLAVA = ModelType(
    "llava", loader="transformers:AutoModelForImageTextToText", default_template="llava",
    vision_tower=("model.vision_tower",), projector=("model.multi_modal_projector",),
    language_model=("model.language_model", "lm_head"), supports_packing=True,
)  # fmt: skip
IMAGE_TOKEN = 32000
LM_QV = r"^model\.language_model\..*\.(q_proj|v_proj)$"
LM_ALL_LINEAR = r"^model\.language_model\..*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)$"
RESULTS: list[dict] = []


# -- model -------------------------------------------------------------------------------


def llava_config(smoke: bool = False, layers: int | None = None):
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if smoke:
        vision = CLIPVisionConfig(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
                                  image_size=336, patch_size=14, projection_dim=256)  # fmt: skip
        text = LlamaConfig(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                           num_key_value_heads=8, vocab_size=32064, max_position_embeddings=4096)  # fmt: skip
    else:  # openai/clip-vit-large-patch14-336 and meta-llama/Llama-2-7b-hf
        vision = CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                                  image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu")  # fmt: skip
        text = LlamaConfig(hidden_size=4096, intermediate_size=11008, num_hidden_layers=layers or 32,
                           num_attention_heads=32, num_key_value_heads=32, vocab_size=32064,
                           max_position_embeddings=4096, rms_norm_eps=1e-5)  # fmt: skip
    return LlavaConfig(vision_config=vision, text_config=text, image_token_id=IMAGE_TOKEN, image_seq_length=576,
                       vision_feature_layer=-2, vision_feature_select_strategy="default",
                       projector_hidden_act="gelu")  # fmt: skip


def build_model(config):
    from transformers import LlavaForConditionalGeneration

    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlavaForConditionalGeneration._from_config(config, dtype=torch.bfloat16, attn_implementation="sdpa")
    model.config.get_text_config().use_cache = False
    return model.train()


def free():
    """Release what the last measurement left (its model is gone once its function returned)."""
    gc.collect()
    torch._dynamo.reset()
    torch.cuda.empty_cache()


# -- data --------------------------------------------------------------------------------


def sample(gen, text_len: int, images: int, vocab: int, answer_fraction: float = 0.6):
    """An encoded sample as a template would give it: prompt (+576 image tokens per image), answer."""
    answer = max(1, int(text_len * answer_fraction))
    prompt = [1] + torch.randint(100, vocab - 100, (max(1, text_len - answer - 1),), generator=gen).tolist()
    for _ in range(images):
        prompt = prompt[:2] + [IMAGE_TOKEN] * 576 + prompt[2:]
    answer_ids = torch.randint(100, vocab - 100, (answer,), generator=gen).tolist()
    out = {"input_ids": prompt + answer_ids, "labels": [IGNORE_INDEX] * len(prompt) + answer_ids}
    if images:
        out["pixel_values"] = torch.randn(images, 3, 336, 336, generator=gen).to(torch.bfloat16)
    return out


def fixed_samples(n: int, length: int, vocab: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return [sample(gen, length - 576, 1, vocab) for _ in range(n)]


def mixed_samples(n: int, vocab: int, seed: int = 0, longest: int = 2048):
    """LLaVA-Instruct-like lengths: 90% one image + lognormal text (median ~150), 10% longer text-only."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        if torch.rand(1, generator=gen).item() < 0.1:
            text = int(math.exp(5.5 + 0.9 * torch.randn(1, generator=gen).item()))
            out.append(sample(gen, min(max(text, 32), longest), 0, vocab))
        else:
            text = int(math.exp(5.0 + 0.8 * torch.randn(1, generator=gen).item()))
            out.append(sample(gen, min(max(text, 16), longest - 576), 1, vocab))
    return out


def pad_batch(samples, multiple: int = 8):
    """What a plain padding collator does: right-pad to the longest (a multiple of 8), attention_mask, images stacked."""
    length = -(-max(len(s["input_ids"]) for s in samples) // multiple) * multiple
    ids = torch.zeros(len(samples), length, dtype=torch.long)
    labels = torch.full((len(samples), length), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros(len(samples), length, dtype=torch.long)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[i, :n] = torch.tensor(s["input_ids"])
        labels[i, :n] = torch.tensor(s["labels"])
        mask[i, :n] = 1
    batch = {"input_ids": ids, "labels": labels, "attention_mask": mask}
    pixels = [s["pixel_values"] for s in samples if "pixel_values" in s]
    if pixels:
        batch["pixel_values"] = torch.cat(pixels)
    return batch


def real_tokens(batch) -> int:
    """Tokens of samples in a batch (padding excluded)."""
    if "real_tokens" in batch:
        return int(batch["real_tokens"])
    return int(batch["attention_mask"].sum())


def to_gpu(batch):
    return {k: (v.to("cuda", non_blocking=True) if torch.is_tensor(v) else v) for k, v in batch.items()}


# -- adapters -----------------------------------------------------------------------------


def plain_lora(model, target_regex: str, checkpointing: bool = False):
    from peft import LoraConfig, get_peft_model

    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=target_regex,
                                             task_type="CAUSAL_LM"))  # fmt: skip
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def vistune_config(**values):
    base = {
        "task": "sft",
        "lora_rank": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "lora_target_modules": ["q_proj", "v_proj"],
    }
    return build_config({**base, **values}).config


def vistune_lora(model, *, targets=("q_proj", "v_proj"), checkpointing=False, compile_blocks=True, adapter="lora"):
    from vistune.adapters.lora import apply_lora, apply_qlora
    from vistune.training.compile import compile_blocks as compile_all

    config = vistune_config(lora_target_modules=list(targets), adapter=adapter, gradient_checkpointing=checkpointing,
                            torch_compile=compile_blocks)  # fmt: skip
    model = (apply_qlora if adapter == "qlora" else apply_lora)(model, LLAVA, config)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    if compile_blocks:
        compile_all(model)
    return model


# -- the loop ------------------------------------------------------------------------------


def plain_loss(model, batch):
    return model(**batch).loss


def vistune_loss(model, batch):
    from vistune.training.lm_loss import causal_lm_loss

    return causal_lm_loss(model, batch)[0]


def run_steps(name, setting, make_model, batches, loss_fn, *, warmup, steps, extra=None):
    """Build a model with ``make_model()`` and time ``steps`` optimizer steps after ``warmup`` (batches cycled)."""
    free()
    model = make_model()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, fused=True)
    times, tokens, padded = [], 0, 0
    torch.cuda.synchronize()
    for i in range(warmup + steps):
        if i == warmup:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        cpu_batch = batches[i % len(batches)]
        start = time.perf_counter()
        batch = to_gpu({k: v for k, v in cpu_batch.items() if k != "real_tokens"})
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = loss_fn(model, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - start)
            tokens += real_tokens(cpu_batch)
            padded += int(cpu_batch["input_ids"].numel())
        if not math.isfinite(loss.item()):
            raise RuntimeError(f"{name}: loss is {loss.item()}")
    total = sum(times)
    result = {
        "setting": setting,
        "variant": name,
        "steps": steps,
        "step_s_median": statistics.median(times),
        "tokens_per_s": padded / total,
        "effective_tokens_per_s": tokens / total,
        "peak_gib": torch.cuda.max_memory_allocated() / 2**30,
        "trainable_params": sum(p.numel() for p in params),
        "last_loss": float(loss.item()),
        **(extra or {}),
    }
    if callable(result.get("attention")):
        result["attention"] = result["attention"](model)
    if isinstance(result.get("weights_gib"), dict):
        result["weights_gib"] = result["weights_gib"].get("gib")
    RESULTS.append(result)
    print(json.dumps(result), flush=True)
    save()
    del optimizer, model, params, loss
    free()
    return result


# -- settings -------------------------------------------------------------------------------


def setting_check(args):
    """Packed rows under vistune's attention against the same samples one by one.

    bf16 itself moves logits and gradients, so the errors are compared with that floor:
    reference = the samples one by one in float32; "bf16 floor" = the same, under bf16
    autocast; "packed" = one packed row (vistune attention, bf16 autocast); "not isolated"
    = the same row with positions running on, so samples see each other (what a broken
    packing gives).  Packing is right when its error is near the floor and far below
    the not-isolated one.
    """
    from vistune.adapters.lora import apply_lora
    from vistune.data.packing import collate_packed, make_row, pack_dataset

    config = llava_config(smoke=args.smoke, layers=2)
    model = build_model(config).float()
    model = apply_lora(model, LLAVA, vistune_config())
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(std=0.02)
    gen = torch.Generator().manual_seed(1)
    samples = [sample(gen, t, i, config.text_config.vocab_size) for t, i in ((200, 1), (64, 0), (400, 1), (90, 1))]
    samples = [{k: (v.float() if torch.is_tensor(v) else v) for k, v in s.items()} for s in samples]

    def grads():
        out = {n: p.grad.float().clone() for n, p in model.named_parameters() if p.grad is not None}
        model.zero_grad()
        return out

    def one_by_one(autocast):
        logits, total, count = [], 0.0, 0
        for s in samples:
            batch = to_gpu({"input_ids": torch.tensor([s["input_ids"]]), "labels": torch.tensor([s["labels"]]),
                            **({"pixel_values": s["pixel_values"]} if "pixel_values" in s else {})})  # fmt: skip
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast):
                out = model(**batch)
            n = int((batch["labels"][0, 1:] != IGNORE_INDEX).sum())
            logits.append(out.logits[0].float().detach())
            total, count = total + out.loss * n, count + n
        loss = total / count
        loss.backward()
        return logits, loss.item(), grads()

    def packed(isolated=True):
        batch = collate_packed([make_row(samples)])
        if not isolated:
            batch["position_ids"] = torch.arange(batch["input_ids"].shape[1])[None]
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = model(**to_gpu(batch))
        out.loss.backward()
        logits, start = [], 0
        for s in samples:
            logits.append(out.logits[0, start : start + len(s["input_ids"])].float().detach())
            start += len(s["input_ids"])
        return logits, out.loss.item(), grads()

    def error(run, ref):
        logit = max((a - b).abs().max().item() for a, b in zip(run[0], ref[0]))
        grad = max(((run[2][k] - v).norm() / v.norm().clamp(min=1e-12)).item() for k, v in ref[2].items())
        return {"logits": logit, "loss": abs(run[1] - ref[1]), "grad_rel": grad}

    model.zero_grad()
    reference = one_by_one(autocast=False)
    floor = error(one_by_one(autocast=True), reference)
    pack_dataset([], 4096, model, LLAVA)  # switches the language model to vistune's attention
    attention = model.config.get_text_config()._attn_implementation
    got = error(packed(), reference)
    mixed = error(packed(isolated=False), reference)
    result = {
        "setting": "check",
        "variant": f"packed ({attention}, bf16) vs one by one (float32)",
        "bf16_floor": floor,
        "packed": got,
        "not_isolated": mixed,
        "ok": got["logits"] <= 3 * floor["logits"] + 1e-3
        and got["logits"] * 5 < mixed["logits"]
        and got["grad_rel"] <= 3 * floor["grad_rel"] + 1e-3,
    }
    RESULTS.append(result)
    print(json.dumps(result), flush=True)
    save()


def setting_a(args, all_linear=False):
    setting = "a2" if all_linear else "a"
    config = llava_config(smoke=args.smoke)
    vocab = config.text_config.vocab_size
    samples = fixed_samples(4 * 8, 1024, vocab)
    batches = [pad_batch(samples[i : i + 4]) for i in range(0, len(samples), 4)]
    kw = dict(warmup=args.warmup, steps=args.steps, extra={"batch": "4 x 1024"})
    targets = LM_ALL_LINEAR if all_linear else LM_QV
    ours = ("all-linear",) if all_linear else ("q_proj", "v_proj")
    run_steps("plain transformers+peft", setting, lambda: plain_lora(build_model(config), targets, checkpointing=all_linear),
              batches, plain_loss, **kw)  # fmt: skip
    if not all_linear:
        run_steps("vistune (labelled-positions loss, no compile)", setting,
                  lambda: vistune_lora(build_model(config), targets=ours, compile_blocks=False), batches, vistune_loss, **kw)  # fmt: skip
    run_steps("vistune (labelled-positions loss, torch_compile)", setting,
              lambda: vistune_lora(build_model(config), targets=ours, checkpointing=all_linear), batches, vistune_loss, **kw)  # fmt: skip


def setting_b(args):
    from vistune.data.packing import collate_packed, pack_dataset

    config = llava_config(smoke=args.smoke)
    vocab = config.text_config.vocab_size
    samples = mixed_samples(args.mix_samples, vocab)
    padded = [pad_batch(samples[i : i + 4]) for i in range(0, len(samples) - 3, 4)]
    mean = statistics.mean(len(s["input_ids"]) for s in samples)
    pad_fill = sum(int(b["attention_mask"].sum()) for b in padded) / sum(b["input_ids"].numel() for b in padded)
    kw = dict(warmup=args.warmup, steps=args.steps)
    extra = {"batch": "4 samples, padded", "mean_sample_tokens": mean, "fill": pad_fill}
    run_steps("plain transformers+peft, padding", "b", lambda: plain_lora(build_model(config), LM_QV), padded,
              plain_loss, extra=extra, **kw)  # fmt: skip
    run_steps(
        "vistune, padding", "b", lambda: vistune_lora(build_model(config)), padded, vistune_loss, extra=extra, **kw
    )

    packed, fill = [], []

    def packed_model():
        model = build_model(config)
        rows = list(pack_dataset(samples, args.packed_length, model, LLAVA, shuffle=False))
        for row in rows:
            batch = collate_packed([row])
            batch["real_tokens"] = torch.tensor(len(row["input_ids"]))
            packed.append(batch)
        fill.append(sum(len(r["input_ids"]) for r in rows) / (len(rows) * args.packed_length))
        return vistune_lora(model)

    # the rows exist once the model does: build it first, then hand it (and the rows) to run_steps
    built = [packed_model()]
    run_steps("vistune, packing", "b", built.pop, packed, vistune_loss,
              extra={"batch": f"1 row of <= {args.packed_length}", "mean_sample_tokens": mean, "fill": fill[0],
                     "attention": lambda m: m.config.get_text_config()._attn_implementation}, **kw)  # fmt: skip


def setting_c(args):
    try:
        import bitsandbytes  # noqa: F401
    except ImportError:
        print("setting c skipped: bitsandbytes is not installed", flush=True)
        RESULTS.append({"setting": "c", "variant": "skipped: bitsandbytes not installed"})
        save()
        return
    from peft import prepare_model_for_kbit_training
    from transformers import BitsAndBytesConfig, LlavaForConditionalGeneration

    config = llava_config(smoke=args.smoke)
    vocab = config.text_config.vocab_size
    samples = fixed_samples(4, 1024, vocab)
    batches = [pad_batch([s]) for s in samples]
    with tempfile.TemporaryDirectory(dir=args.scratch) as directory:
        build_model(config).save_pretrained(directory)
        free()
        from vistune_llava.loading import KEEP_FULL_PRECISION

        def quant(skip):
            return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                      bnb_4bit_compute_dtype=torch.bfloat16, llm_int8_skip_modules=list(skip))  # fmt: skip

        weights = {}

        # The baseline skips the modules by the short names users write; vistune keeps the
        # vision tower, projector and head in bf16 by their full prefixes, as its llava loader does.
        def load(skip=("vision_tower", "multi_modal_projector", "lm_head")):
            before = torch.cuda.memory_allocated()
            model = LlavaForConditionalGeneration.from_pretrained(directory, quantization_config=quant(skip), dtype=torch.bfloat16,
                                                                  attn_implementation="sdpa", device_map={"": 0})  # fmt: skip
            weights["gib"] = (torch.cuda.memory_allocated() - before) / 2**30
            model.config.get_text_config().use_cache = False
            return model.train()

        kw = dict(warmup=args.warmup, steps=args.steps)
        run_steps("plain transformers+peft+bnb (prepare_model_for_kbit_training)", "c",
                  lambda: plain_lora(prepare_model_for_kbit_training(load(), use_gradient_checkpointing=False), LM_QV),
                  batches, plain_loss, extra={"batch": "1 x 1024", "weights_gib": weights}, **kw)  # fmt: skip
        for checkpointing in (False, True):
            name = "vistune qlora" + (" + gradient checkpointing" if checkpointing else "")
            run_steps(name, "c", lambda c=checkpointing: vistune_lora(load(KEEP_FULL_PRECISION), adapter="qlora", checkpointing=c, compile_blocks=False),
                      batches, vistune_loss, extra={"batch": "1 x 1024", "weights_gib": weights}, **kw)  # fmt: skip


# -- output ------------------------------------------------------------------------------------


OUT_PATH: Path | None = None


def environment() -> dict:
    import peft
    import transformers

    return {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "python": platform.python_version(),
    }


def save() -> None:
    if OUT_PATH is not None:
        OUT_PATH.write_text(json.dumps({"environment": environment(), "results": RESULTS}, indent=2) + "\n")


def table() -> str:
    lines = ["| setting | variant | tokens/s | non-pad tokens/s | step s | peak GiB |", "|---|---|---:|---:|---:|---:|"]
    for r in RESULTS:
        if "tokens_per_s" not in r:
            detail = {k: v for k, v in r.items() if k not in ("setting", "variant")}
            lines.append(f"| {r['setting']} | {r['variant']} {json.dumps(detail)} | | | | |")
            continue
        lines.append(f"| {r['setting']} | {r['variant']} | {r['tokens_per_s']:.0f} | {r['effective_tokens_per_s']:.0f} | "
                     f"{r['step_s_median']:.3f} | {r['peak_gib']:.1f} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    global OUT_PATH
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", default="check,a,a2,b,c")
    parser.add_argument("--out", default=None)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--mix-samples", type=int, default=240)
    parser.add_argument("--packed-length", type=int, default=4096)
    parser.add_argument("--scratch", default=None, help="directory for the QLoRA checkpoint (needs ~14 GB)")
    parser.add_argument("--smoke", action="store_true", help="small widths, to check that the script runs")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("this benchmark needs a CUDA GPU", file=sys.stderr)
        return 2
    out = args.out or (
        Path(os.environ["OUT"]) / "sft_throughput.json" if os.environ.get("OUT") else "sft_throughput.json"
    )
    OUT_PATH = Path(out)
    OUT_PATH.parent.mkdir(parents=True, exist_ok=True)
    print(json.dumps(environment()), flush=True)
    settings = {"check": setting_check, "a": setting_a, "a2": lambda a: setting_a(a, all_linear=True), "b": setting_b,
                "c": setting_c}  # fmt: skip
    for name in args.settings.split(","):
        settings[name.strip()](args)
        free()
    print(table())
    save()
    return 0


if __name__ == "__main__":
    sys.exit(main())
