"""TRL's ``DPOTrainer`` VLM recipe, as TRL's docs write it.

A ``datasets`` dataset of ``prompt`` / ``chosen`` / ``rejected`` conversations (typed
image/text parts) and an ``images`` column of the ``Image`` feature, the model and
processor from a local directory, a peft ``LoraConfig`` (the reference is then the model
with its adapter disabled), and ``DPOConfig``; TRL's vision collator does the rest.
Used by bench/dpo_step.py.
"""

from __future__ import annotations

from common import load_model, lora_config, parse_args, read_records, training_kwargs, typed_messages


def main() -> None:
    args = parse_args(__doc__)
    from datasets import Dataset, Image, Sequence
    from transformers import AutoProcessor
    from trl import DPOConfig, DPOTrainer

    records = [{"prompt": typed_messages(r["prompt"]), "chosen": typed_messages(r["chosen"]),
                "rejected": typed_messages(r["rejected"]), "images": r["images"]}
               for r in read_records(args.data)]  # fmt: skip
    dataset = Dataset.from_list(records).cast_column("images", Sequence(Image()))
    config = DPOConfig(max_length=args.max_length, beta=0.1, **training_kwargs(args))
    trainer = DPOTrainer(
        model=load_model(args),
        args=config,
        train_dataset=dataset,
        processing_class=AutoProcessor.from_pretrained(args.model),
        peft_config=lora_config(args),
    )
    trainer.train()


if __name__ == "__main__":
    main()
