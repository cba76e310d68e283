"""Datasets vistune generates locally: coloured shapes with captions, for the demo and tests."""

from vistune import hookimpl
from vistune.specs import Dataset


@hookimpl
def vistune_register_datasets(register):
    for split in ("train", "eval"):
        suffix = "" if split == "train" else "-eval"
        register(
            Dataset(
                f"shapes-captions{suffix}",
                format="messages",
                data_file=f"{split}.jsonl",
                builder="vistune.demo.shapes:build_shapes_dataset",
                description=f"generated coloured shapes with captions ({split} split)",
            )
        )
