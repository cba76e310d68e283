"""What the two peer scripts share: their command line, the model load and the LoRA config.

Each peer script is written the way its library's documentation writes a VLM fine-tune;
only the switches the benchmark sets for every system (LoRA targets on the language
model, batch, max length, checkpointing, 4-bit base) come from here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

#: LoRA on the language model only (a bare q_proj/v_proj would also adapt the CLIP tower).
TARGETS = {
    "qv": r".*language_model.*\.(q_proj|v_proj)",
    "all-linear": r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
}


def parse_args(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", required=True, help="local Hugging Face checkpoint directory")
    parser.add_argument("--data", required=True, help="JSONL of {messages, images} records, image paths relative to it")
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=2048)
    parser.add_argument("--targets", choices=sorted(TARGETS), default="qv")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--nf4", action="store_true", help="QLoRA: load the language model in 4-bit NF4")
    parser.add_argument("--best", action="store_true", help="the library's documented speed switches")
    parser.add_argument("--cpu", action="store_true", help="float32 on CPU (smoke test)")
    return parser.parse_args()


def read_records(path: str) -> list[dict]:
    """The JSONL records with their image paths made absolute."""
    root = Path(path).resolve().parent
    records = []
    for line in Path(path).read_text().splitlines():
        if line.strip():
            record = json.loads(line)
            record["images"] = [str(root / image) for image in record.get("images", [])]
            records.append(record)
    return records


def typed_messages(messages: list[dict]) -> list[dict]:
    """``"<image>\\ntext"`` contents as the typed parts processors' chat templates expect."""
    out = []
    for message in messages:
        text = message["content"]
        parts = [{"type": "image"} for _ in range(text.count("<image>"))]
        parts.append({"type": "text", "text": text.replace("<image>\n", "").replace("<image>", "")})
        out.append({"role": message["role"], "content": parts})
    return out


def load_model(args):
    """``AutoModelForImageTextToText`` in bf16 with SDPA (4-bit NF4 language model with ``--nf4``)."""
    import torch
    from transformers import AutoModelForImageTextToText, BitsAndBytesConfig

    kwargs = {"dtype": torch.float32 if args.cpu else torch.bfloat16, "attn_implementation": "sdpa"}
    if args.nf4:
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16,
        )  # fmt: skip
    if not args.cpu:
        kwargs["device_map"] = {"": 0}
    return AutoModelForImageTextToText.from_pretrained(args.model, **kwargs)


def lora_config(args):
    from peft import LoraConfig

    return LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS[args.targets], task_type="CAUSAL_LM")


def training_kwargs(args) -> dict:
    """The ``TrainingArguments`` (or TRL ``SFTConfig``) switches every peer script sets alike."""
    return dict(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch,
        num_train_epochs=1,
        learning_rate=1e-4,
        bf16=not args.cpu,
        use_cpu=args.cpu,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        gradient_checkpointing=args.gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False},
        **speed_switches(args),
    )


def speed_switches(args) -> dict:
    """transformers' documented speed switches: torch.compile, Liger when installed, loader workers."""
    import importlib.util

    if not args.best:
        return {}
    return {
        "torch_compile": True,
        "use_liger_kernel": importlib.util.find_spec("liger_kernel") is not None,
        "dataloader_num_workers": 4,
        "dataloader_persistent_workers": True,
    }
