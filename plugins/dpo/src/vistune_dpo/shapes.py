"""``shapes-preferences``: the shapes captioning dataset as preference pairs, generated locally.

Each image of vistune's ``shapes-captions`` dataset (:mod:`vistune.demo.shapes`, same
images) gets its right caption as the chosen answer and a wrong one as the rejected
answer: the right shape in another colour, or the right colour on another shape, so
only the image tells them apart.  Training split: one pair per image (1000); held-out
split: both kinds of wrong caption for each of its 40 images (80 pairs).  The records
(``<split>-pairs.jsonl``, next to the captions' ``<split>.jsonl``) are ms-swift's
preference layout (``messages`` ending with the chosen answer, plus ``rejected_response``).
The datasets take the captions' options, ``samples`` (images) and ``seed`` (of the
images), with the same per-split defaults.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from vistune.demo.shapes import COLOURS, SHAPES, build_shapes_dataset
from vistune.demo.shapes import split_options as caption_options
from vistune.specs import Option

#: Split -> (seed of the wrong captions, wrong captions per image).
SPLITS = {"train": (10, 1), "eval": (11, 2)}


def split_options(split: str) -> tuple[Option, ...]:
    """The options of one split's dataset: the captions dataset's ``samples`` and ``seed``, with its defaults."""
    samples, seed = caption_options(split)
    pairs = "one preference pair" if SPLITS[split][1] == 1 else f"{SPLITS[split][1]} preference pairs"
    return attrs.evolve(samples, help=f"number of images generated, with {pairs} each"), seed


def wrong_captions(caption: str, rng: random.Random, count: int) -> list[str]:
    """``count`` wrong captions for ``caption`` ("a red circle"): first another colour, then another shape."""
    _, colour, shape = caption.split(" ", 2)
    other_colour = f"a {rng.choice([c for c in COLOURS if c != colour])} {shape}"
    other_shape = f"a {colour} {rng.choice([s for s in SHAPES if s != shape])}"
    if count == 1:
        return [rng.choice([other_colour, other_shape])]
    return [other_colour, other_shape][:count]


def build_preference_dataset(directory: str | Path, spec: Any, options: Mapping[str, Any] | None = None) -> Path:
    """Builder of the registered ``shapes-preferences`` datasets: the captions split, then its pairs beside it.

    ``options`` (``samples``, ``seed``; :func:`split_options`) go to the captions' builder, which
    gives a missing one the split's default.
    """
    directory = Path(directory)
    target = directory / spec.data_file
    if target.exists():
        return target
    split = Path(spec.data_file).stem.removesuffix("-pairs")
    if split not in SPLITS:
        raise ValueError(f"dataset {spec.name!r}: unknown split {split!r}; known: {', '.join(SPLITS)}")
    # the shapes builder writes <split>.jsonl and the images (atomically); the pairs go beside them
    captions = build_shapes_dataset(directory, attrs.evolve(spec, data_file=f"{split}.jsonl", format="messages"),
                                    options)  # fmt: skip
    seed, per_image = SPLITS[split]
    rng = random.Random(seed)
    lines = []
    for line in captions.read_text().splitlines():
        record = json.loads(line)
        chosen = record["messages"][-1]["content"]
        for wrong in wrong_captions(chosen, rng, per_image):
            lines.append(json.dumps({**record, "rejected_response": wrong}))
    staging = directory / f".{spec.data_file}.{os.getpid()}.tmp"
    staging.write_text("\n".join(lines) + "\n")
    os.replace(staging, target)
    return target
