"""TRL's ``SFTTrainer`` VLM recipe, as TRL's docs write it.

A ``datasets`` dataset of ``messages`` (typed image/text parts) and an ``images`` column
of the ``Image`` feature, the model and processor from a local directory, a peft
``LoraConfig``, and ``SFTConfig``; TRL's vision collator does the rest.  TRL refuses
packing for vision datasets, so this script never packs.  Used by bench/sft_product.py.
"""

from __future__ import annotations

from common import load_model, lora_config, parse_args, read_records, training_kwargs, typed_messages


def main() -> None:
    args = parse_args(__doc__)
    from datasets import Dataset, Image, Sequence
    from transformers import AutoProcessor
    from trl import SFTConfig, SFTTrainer

    records = [{"messages": typed_messages(r["messages"]), "images": r["images"]} for r in read_records(args.data)]
    dataset = Dataset.from_list(records).cast_column("images", Sequence(Image()))
    config = SFTConfig(max_length=args.max_length, **training_kwargs(args))
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
