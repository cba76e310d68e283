"""TRL's ``SFTTrainer`` VLM recipe, as TRL's docs write it.

A ``datasets`` dataset of ``messages`` (typed image/text parts) and an ``images`` column
of the ``Image`` feature, the model and processor from a local directory, a peft
``LoraConfig``, and ``SFTConfig``; TRL's vision collator does the rest.  TRL refuses
packing for vision datasets, so this script never packs.  Used by bench/sft_product.py.
"""

from __future__ import annotations

from common import lora_config, load_model, parse_args, read_records, speed_switches, typed_messages


def main() -> None:
    args = parse_args(__doc__)
    from datasets import Dataset, Image, Sequence
    from transformers import AutoProcessor
    from trl import SFTConfig, SFTTrainer

    records = [{"messages": typed_messages(r["messages"]), "images": r["images"]} for r in read_records(args.data)]
    dataset = Dataset.from_list(records).cast_column("images", Sequence(Image()))
    config = SFTConfig(
        output_dir=args.output_dir,
        per_device_train_batch_size=args.batch,
        num_train_epochs=1,
        max_length=args.max_length,
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
    trainer = SFTTrainer(
        model=load_model(args),
        args=config,
        train_dataset=dataset,
        processing_class=AutoProcessor.from_pretrained(args.model),
        peft_config=lora_config(args),
    )
    trainer.train()


if __name__ == "__main__":
    main()
