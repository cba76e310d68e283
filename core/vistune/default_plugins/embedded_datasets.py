"""Datasets vistune generates locally: coloured shapes with captions, for the demo and tests."""

from vistune import hookimpl
from vistune.demo.shapes import split_options
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
                options=split_options(split),
                description=f"generated coloured shapes with captions ({split} split)",
            )
        )
