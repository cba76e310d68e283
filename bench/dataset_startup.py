"""How long a run on a 100k-sample dataset takes to start: vistune's lazy reading vs eager preprocessing.

Writes a LLaVA-Instruct-format JSON array (``llava_instruct_150k.json``'s layout:
``{"id", "image", "conversations": [{"from": "human"|"gpt", "value"}]}``) of
``--samples`` records over a folder of generated images, then measures, in one process
tree on one machine:

* ``vistune sft`` on the tiny Llava for one optimizer step, end to end (plugin loading,
  model load, reading the dataset, one step, saving): wall seconds, for the 100k file
  and for a 1k-record file of the same kind.  Equal times mean that nothing scales with
  the dataset's size before training starts.
* The check of every record that runs before the model loads (JSON, fields, image tags,
  image files present inside the dataset's folder; no image is decoded): seconds for
  the whole file, which the 100k run above includes.
* The eager alternative (what preprocessing every sample up front costs, as tools that
  tokenise the whole dataset before the first step do): the same template's encoding
  timed on ``--eager-sample`` records, extrapolated to the whole file.

Runs on CPU.  Usage: ``python bench/dataset_startup.py [--samples 100000] [--out FILE]``.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QUESTION = "What is shown in this image?"


def write_llava_instruct(directory: Path, count: int, images: int = 64) -> Path:
    """A LLaVA-Instruct JSON array of ``count`` records cycling over ``images`` generated pictures."""
    from vistune.demo.shapes import caption, make_records

    (directory / "images").mkdir(parents=True, exist_ok=True)
    captions = []
    for i, (colour, shape, image) in enumerate(make_records(images, seed=0)):
        image.save(directory / "images" / f"{i:05d}.png")
        captions.append(caption(colour, shape))
    path = directory / "llava_instruct.json"
    with path.open("w") as f:
        f.write("[\n")
        for i in range(count):
            record = {"id": str(i), "image": f"images/{i % images:05d}.png", "conversations": [
                {"from": "human", "value": f"<image>\n{QUESTION}"},
                {"from": "gpt", "value": captions[i % images]},
            ]}  # fmt: skip
            f.write(json.dumps(record) + (",\n" if i < count - 1 else "\n"))
        f.write("]\n")
    return path


def time_sft(model: str, data_file: Path, output_dir: Path) -> float:
    """Wall seconds of ``vistune sft`` for one step, from the command's start to its exit."""
    args = [sys.executable, "-m", "vistune", "sft", "--model", model, "--dataset", str(data_file),
            "--output_dir", str(output_dir), "--adapter", "lora", "--max_steps", "1", "--device", "cpu",
            "--dtype", "float32", "--report_to", "[jsonl]", "--overwrite_output_dir", "true"]  # fmt: skip
    start = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, text=True)
    return time.perf_counter() - start


def time_validation(data_file: Path) -> float:
    """Seconds to check every record of ``data_file`` (:meth:`RecordDataset.validate`)."""
    from vistune.data.readers import read_records_file

    start = time.perf_counter()
    bad = read_records_file(data_file).validate()
    took = time.perf_counter() - start
    if bad:
        raise RuntimeError(f"the generated file has bad records: {next(iter(bad.values()))}")
    return took


def time_eager_encoding(model: str, data_file: Path, count: int) -> float:
    """Seconds to encode ``count`` records with the llava-1.5 template (reading included)."""
    from vistune.data.locate import DatasetLocation
    from vistune.data.readers import read_dataset
    from vistune.models import LoadOptions
    from vistune.plugins import get_plugin_manager
    from vistune.specs import load_ref
    from vistune.templates import TemplateOptions

    registries = get_plugin_manager().registries
    _, processor = load_ref(registries.models.get("llava").loader)(model, LoadOptions(device="cpu"))
    encoder = load_ref(registries.templates.get("llava-1.5").factory)(processor, TemplateOptions())
    records = read_dataset(DatasetLocation(data_file=data_file, image_dir=None, format="llava-instruct"))
    start = time.perf_counter()
    for i in range(count):
        encoder.encode(records[i])
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=100_000)
    parser.add_argument("--eager-sample", type=int, default=2000, help="records encoded to extrapolate from")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    from vistune.tiny_models import tiny_model_path

    model = str(tiny_model_path("llava"))
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        start = time.perf_counter()
        big = write_llava_instruct(root / "big", args.samples)
        written_s = time.perf_counter() - start
        file_mb = round(big.stat().st_size / 1e6, 1)
        small = write_llava_instruct(root / "small", 1000)
        time_sft(model, small, root / "warm")  # warms the file cache and imports
        small_s = time_sft(model, small, root / "small-out")
        big_s = time_sft(model, big, root / "big-out")
        eager_s = time_eager_encoding(model, big, args.eager_sample)
        validate_s = time_validation(big)

    per_sample = eager_s / args.eager_sample
    result = {
        "machine": f"{os.cpu_count()} CPU cores, {sys.platform}",
        "samples": args.samples,
        "file_mb": file_mb,
        "write_s": round(written_s, 1),
        "vistune_sft_one_step_s": {"1k": round(small_s, 2), f"{args.samples // 1000}k": round(big_s, 2)},
        "validate_every_record_s": round(validate_s, 2),
        "eager_encoding_ms_per_sample": round(per_sample * 1e3, 3),
        "eager_encoding_whole_file_s_extrapolated": round(per_sample * args.samples, 1),
    }
    print(json.dumps(result, indent=2))
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
