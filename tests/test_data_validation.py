"""Every record checked before the model loads: problems named file:line, images kept inside the dataset."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
from PIL import Image

from vistune.data import readers
from vistune.data.encoded import EncodedDataset
from vistune.data.readers import read_records_file
from vistune.data.validation import PROBLEMS_SHOWN, read_validated
from vistune.data.locate import DatasetLocation
from vistune.errors import DataError


def png(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), "red").save(path)
    return path


def record(text="<image>\nWhat is it?", images=("red.png",)):
    return {"messages": [{"role": "user", "content": text}, {"role": "assistant", "content": "red"}],
            "images": list(images)}  # fmt: skip


@pytest.fixture
def broken(tmp_path):
    """A JSONL of one good record and one of each problem, with a picture outside the dataset's folder."""
    data = tmp_path / "data"
    png(data / "red.png")
    outside = png(tmp_path / "outside" / "red.png")
    lines = [
        json.dumps(record()),  # 1: good
        '{"messages": [',  # 2: not JSON
        json.dumps(record(images=["missing.png"])),  # 3: no such file
        json.dumps(record(images=["../outside/red.png"])),  # 4: leaves the folder
        json.dumps(record(images=[str(outside)])),  # 5: absolute, elsewhere
        json.dumps(record(images=["../../../../../../etc/passwd"])),  # 6: traversal
        json.dumps(record(text="<image> or <image>?")),  # 7: two <image> tags, one image
        json.dumps({"note": "neither format"}),  # 8: unknown format
    ]
    path = data / "train.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return path, outside


def config(**values):
    base = dict(on_bad_record="error", allow_remote_images=False, max_samples=None, allowed_image_dirs=[],
                dataset_format=None)
    return SimpleNamespace(**{**base, **values})


def location(path: Path) -> DatasetLocation:
    return DatasetLocation(path, path.parent, None, how="local path")


def test_every_problem_is_named_before_reading(broken, monkeypatch):
    path, _ = broken
    monkeypatch.setattr(readers, "_decode_image", lambda *a: pytest.fail("validation decoded an image"))
    with pytest.raises(DataError) as caught:
        read_validated(location(path), config())
    message = caught.value.message
    assert message.startswith(f"7 of 8 records of {path} are bad:")
    for line, problem in [(2, "not valid JSON"), (3, "'missing.png' not found"),
                          (4, "'../outside/red.png' is outside the dataset's folders"),
                          (5, "is outside the dataset's folders"), (6, "'../../../../../../etc/passwd' is outside"),
                          (7, "2 <image> tag(s) but 1 image(s)"), (8, "the record is in no known data format (its keys: note)")]:  # fmt: skip
        assert f"{path}:{line}: " in message and problem in message, (line, problem)
    assert f"{path}:1:" not in message
    assert "on_bad_record: skip" in caught.value.hint


def test_skip_counts_the_bad_records_up_front(broken):
    path, _ = broken
    logged = []
    records = read_validated(location(path), config(on_bad_record="skip"), log=logged.append)
    assert len(logged) == 1 and "7 of 8 records" in logged[0] and "left out" in logged[0]
    encoded = EncodedDataset(records, SimpleNamespace(encode=lambda sample: {"input_ids": [1]}))
    assert encoded.skipped == 7  # before any sample is read
    assert [encoded.get(i) is not None for i in range(8)] == [True] + [False] * 7


def test_a_dataset_of_only_bad_records_is_an_error_even_when_skipping(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(record(images=["missing.png"])) + "\n")
    with pytest.raises(DataError, match="1 of 1 records .* are bad"):
        read_validated(location(path), config(on_bad_record="skip"))


def test_images_outside_are_refused_when_read_without_being_opened(broken, monkeypatch):
    path, outside = broken
    monkeypatch.setattr(readers, "_decode_image", lambda *a: pytest.fail("an image outside the dataset was opened"))
    records = read_records_file(path)
    for index in (3, 4, 5):
        with pytest.raises(DataError, match="outside the dataset's folders"):
            records.read(index)


def test_allowed_image_dirs_admit_a_folder_outside(broken):
    path, outside = broken
    records = read_records_file(path, allowed_image_dirs=[outside.parent])
    assert records.read(4).images[0].size == (4, 4) and records.read(3).images[0].size == (4, 4)
    bad = records.validate()
    assert 3 not in bad and 4 not in bad and 5 in bad  # /etc is still outside


def test_only_the_first_problems_are_listed(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(["not json"] * (PROBLEMS_SHOWN + 5)) + "\n")
    with pytest.raises(DataError) as caught:
        read_validated(location(path), config())
    assert caught.value.message.count("not valid JSON") == PROBLEMS_SHOWN
    assert "... and 5 more" in caught.value.message


def test_sft_reports_a_broken_record_before_the_model_loads(tiny_llava, broken, tmp_path, monkeypatch, capsys,
                                                             plugin_manager):  # fmt: skip
    import yaml

    import vistune.loading
    from vistune.cli import main

    if "llava" not in plugin_manager.registries.models:
        pytest.skip("the llava plugin is not installed")
    monkeypatch.setattr(vistune.loading, "load_model", lambda *a, **k: pytest.fail("the model loaded first"))
    path, _ = broken
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"model": str(tiny_llava), "dataset": str(path), "device": "cpu",
                                   "output_dir": str(tmp_path / "out"), "max_steps": 2}))  # fmt: skip
    assert main(["sft", "--config", str(run)]) == 2
    err = capsys.readouterr().err
    assert f"7 of 8 records of {path} are bad" in err and f"{path}:6: image" in err
    assert "Traceback" not in err
