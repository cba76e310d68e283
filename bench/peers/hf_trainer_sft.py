"""A typical transformers ``Trainer`` + peft VLM fine-tune: the processor is the collator.

As transformers' and peft's docs write it: ``AutoModelForImageTextToText`` in bf16, a
LoRA config, a collate function that renders each conversation with the processor's
chat template and lets the processor tokenise and preprocess the images, labels =
input ids with padding and image tokens masked.  Used by bench/sft_product.py.
"""

from __future__ import annotations

from common import load_model, lora_config, parse_args, read_records, training_kwargs, typed_messages


def main() -> None:
    args = parse_args(__doc__)
    from peft import get_peft_model
    from PIL import Image
    from transformers import AutoProcessor, Trainer, TrainingArguments

    processor = AutoProcessor.from_pretrained(args.model)
    model = load_model(args)
    model = get_peft_model(model, lora_config(args))
    image_token_id = model.config.image_token_id

    def collate(examples):
        texts = [processor.apply_chat_template(typed_messages(ex["messages"]), tokenize=False) for ex in examples]
        images = [[Image.open(path).convert("RGB") for path in ex["images"]] for ex in examples]
        batch = processor(text=texts, images=images if any(images) else None, return_tensors="pt", padding=True,
                          truncation=True, max_length=args.max_length)  # fmt: skip
        labels = batch["input_ids"].clone()
        labels[batch["attention_mask"] == 0] = -100
        labels[labels == image_token_id] = -100
        batch["labels"] = labels
        return batch

    training_args = TrainingArguments(remove_unused_columns=False, **training_kwargs(args))
    Trainer(model=model, args=training_args, train_dataset=read_records(args.data), data_collator=collate).train()


if __name__ == "__main__":
    main()
