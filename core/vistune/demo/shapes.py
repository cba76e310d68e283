"""A generated captioning dataset: one coloured shape per small image.

5 colours x 4 shapes on a 32x32 canvas, at random positions and sizes, each image
paired with its caption ("a red circle") as a ``messages`` record.  Small enough to
generate in a second and for a tiny Llava to learn on CPU in minutes, and hard enough
that learning it shows the image reaches the language model: the question is the
same for every sample, so only the image tells the answer.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from vistune.specs import Option

COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 210, 20),
    "purple": (140, 40, 170),
}
SHAPES = ("circle", "square", "triangle", "cross")
CANVAS = 32
QUESTION = "What is in the picture?"
#: Samples and seed per split; the held-out split uses another seed.
SPLITS = {"train": (1000, 0), "eval": (40, 1)}


def split_options(split: str) -> tuple[Option, ...]:
    """The options of the dataset of one split: its size and seed, defaulting to :data:`SPLITS`."""
    count, seed = SPLITS[split]
    return (
        Option("samples", "int", count, "number of images (one record each) generated", minimum=1),
        Option("seed", "int", seed, "seed of the shapes' order, places and sizes (the splits' defaults differ, so "
               "the held-out images are not training images)"),
    )  # fmt: skip


def caption(colour: str, shape: str) -> str:
    return f"a {colour} {shape}"


def draw_shape(colour: str, shape: str, rng: random.Random, size: int = CANVAS):
    """A ``size`` x ``size`` RGB image with one shape at a random place and scale."""
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (size, size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    # from 5/8 of the canvas to nearly all of it: at 32x32 with 8-pixel patches, smaller circles and
    # squares differ in too few pixels for a tiny model to tell apart in a few CPU minutes
    extent = rng.randint(size * 5 // 8, size - 2)
    x0 = rng.randint(0, size - extent)
    y0 = rng.randint(0, size - extent)
    x1, y1 = x0 + extent - 1, y0 + extent - 1
    fill = COLOURS[colour]
    if shape == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1, y1), fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    elif shape == "cross":
        bar = max(extent // 3, 2)
        mid_x, mid_y = (x0 + x1) // 2, (y0 + y1) // 2
        draw.rectangle((mid_x - bar // 2, y0, mid_x - bar // 2 + bar - 1, y1), fill=fill)
        draw.rectangle((x0, mid_y - bar // 2, x1, mid_y - bar // 2 + bar - 1), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; known: {', '.join(SHAPES)}")
    return image


def make_records(count: int, seed: int) -> list[tuple[str, str, Any]]:
    """``count`` (colour, shape, image) triples: every class equally often, shuffled."""
    rng = random.Random(seed)
    classes = [(c, s) for c in COLOURS for s in SHAPES]
    picks = [classes[i % len(classes)] for i in range(count)]
    rng.shuffle(picks)
    return [(colour, shape, draw_shape(colour, shape, rng)) for colour, shape in picks]


def write_split(directory: str | Path, split: str, count: int | None = None, seed: int | None = None) -> Path:
    """Write ``<split>.jsonl`` and ``images/<split>-NNNNN.png`` into ``directory``."""
    default_count, default_seed = SPLITS[split]
    count = default_count if count is None else count
    seed = default_seed if seed is None else seed
    directory = Path(directory)
    (directory / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for i, (colour, shape, image) in enumerate(make_records(count, seed)):
        name = f"images/{split}-{i:05d}.png"
        image.save(directory / name)
        lines.append(json.dumps({
            "messages": [
                {"role": "user", "content": f"<image>\n{QUESTION}"},
                {"role": "assistant", "content": caption(colour, shape)},
            ],
            "images": [name],
        }))  # fmt: skip
    data_file = directory / f"{split}.jsonl"
    data_file.write_text("\n".join(lines) + "\n")
    return data_file


def build_shapes_dataset(directory: str | Path, spec: Any, options: Mapping[str, Any] | None = None) -> Path:
    """Builder of the registered ``shapes-captions`` datasets: writes the split ``spec`` names.

    ``options`` are the dataset's option values (:func:`split_options`: ``samples``,
    ``seed``); one that is missing takes the split's default.  The split is written into
    a temporary sibling directory and renamed into place, so processes building it at
    the same time never see a half-written dataset.
    """
    directory = Path(directory)
    split = Path(spec.data_file).stem
    if split not in SPLITS:
        raise ValueError(f"dataset {spec.name!r}: unknown split {split!r}; known: {', '.join(SPLITS)}")
    if (directory / spec.data_file).exists():
        return directory / spec.data_file
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        write_split(staging, split, (options or {}).get("samples"), (options or {}).get("seed"))
        try:
            os.replace(staging, directory)
        except OSError:
            if not (directory / spec.data_file).exists():  # not a concurrent builder that won: a real error
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return directory / spec.data_file
