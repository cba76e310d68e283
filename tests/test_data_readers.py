"""Reading dataset records (messages, LLaVA-Instruct, datasets directories) and encoding them lazily."""

from __future__ import annotations

import base64
import json
import pickle
import random
import time
from pathlib import Path

import pytest

Image = pytest.importorskip("PIL.Image")

from vistune.data.encoded import EncodedDataset
from vistune.data.locate import DatasetLocation, locate_dataset
from vistune.data.readers import open_image, read_dataset, read_records_file
from vistune.errors import DataError
from vistune.registry import Registry
from vistune.specs import Dataset
from vistune.templates import Sample


def png(path: Path, colour="red", size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def write_jsonl(path: Path, records, blank_lines=()) -> Path:
    lines = [json.dumps(r) if not isinstance(r, str) else r for r in records]
    for at in sorted(blank_lines, reverse=True):
        lines.insert(at, "")
    path.write_text("\n".join(lines) + "\n")
    return path


def chat(question="<image>\nWhat is it?", answer="A red box.", **extra):
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}], **extra}


# -- formats ------------------------------------------------------------------------------


def test_messages_jsonl_with_relative_images_and_columns(tmp_path):
    png(tmp_path / "img" / "a.png", "red")
    png(tmp_path / "img" / "b.png", "blue", (5, 5))
    path = write_jsonl(tmp_path / "train.jsonl", [
        chat(images=["img/a.png"], id=7, answer_key="red"),
        chat("<image> vs <image>", "Different.", images=["img/a.png", "img/b.png"]),
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello."}]},
    ], blank_lines=[1])  # fmt: skip
    data = read_records_file(path)
    assert len(data) == 3
    first = data[0]
    assert isinstance(first, Sample)
    assert first.messages == chat()["messages"]
    assert first.images[0].size == (8, 6) and first.images[0].getpixel((0, 0)) == (255, 0, 0)
    assert first.columns == {"id": 7, "answer_key": "red"}
    assert first.source == f"{path}:1"
    assert data.source(1) == f"{path}:3"  # the blank line 2 is not a record, but counts for line numbers
    assert [im.size for im in data[1].images] == [(8, 6), (5, 5)]
    assert data[2].images == [] and data[2].messages[0] == {"role": "system", "content": "Be brief."}
    assert data[-1].source == f"{path}:4"


def test_openai_style_content_parts_become_image_tags(tmp_path):
    png(tmp_path / "a.png")
    encoded = base64.b64encode((tmp_path / "a.png").read_bytes()).decode()
    path = write_jsonl(tmp_path / "parts.jsonl", [
        {"messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "A box."}]}],
         "images": ["a.png"]},
        {"messages": [{"role": "user", "content": [
            {"type": "text", "text": "Compare "}, {"type": "image", "image": "a.png"},
            {"type": "text", "text": " and "},
            {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{encoded}"}}]},
            {"role": "assistant", "content": "Same."}]},
        {"messages": [{"role": "user", "content": [{"type": "image", "image": "a.png"}]},
                      {"role": "assistant", "content": "x"}], "images": ["a.png"]},
        {"messages": [{"role": "human", "content": "hi"}, {"role": "gpt", "content": "yo"}]},
    ])  # fmt: skip
    data = read_records_file(path)
    assert data[0].messages[0]["content"] == "<image>What is it?"
    assert data[0].messages[1]["content"] == "A box."
    assert data[1].messages[0]["content"] == "Compare <image> and <image>"
    assert [im.size for im in data[1].images] == [(8, 6), (8, 6)]
    with pytest.raises(DataError, match=rf"{path}:3: images are named both inside the messages and in 'images'"):
        data[2]
    assert [m["role"] for m in data[3].messages] == ["user", "assistant"]


def test_llava_instruct_json_array_with_line_numbers(tmp_path):
    png(tmp_path / "coco" / "000001.jpg")
    records = [
        {"id": "1", "image": "000001.jpg",
         "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "A box."}]},
        {"id": "2", "conversations": [{"from": "human", "value": "Text only?"}, {"from": "gpt", "value": "Yes."}]},
        {"id": "3", "image": "missing.jpg",
         "conversations": [{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "?"}]},
    ]  # fmt: skip
    path = tmp_path / "llava_instruct.json"
    path.write_text(json.dumps(records, indent=2))
    location = DatasetLocation(path, tmp_path / "coco", "llava-instruct")
    data = read_dataset(location)
    assert len(data) == 3
    assert data[0].messages == [
        {"role": "user", "content": "<image>\nWhat?"},
        {"role": "assistant", "content": "A box."},
    ]
    assert data[0].columns == {"id": "1"} and data[0].images[0].size == (8, 6)
    assert data[1].images == []
    lines = path.read_text().splitlines()
    for i in range(3):
        line = int(data.source(i).rsplit(":", 1)[1])
        assert lines[line - 1].strip() == "{" and f'"id": "{i + 1}"' in lines[line]
    with pytest.raises(DataError, match=rf"{data.source(2)}: image 'missing.jpg' not found") as info:
        data[2]
    assert str(tmp_path / "coco" / "missing.jpg") in str(info.value)


def test_format_is_told_apart_per_record(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl", [
        chat("Hi", "Yo"),
        {"id": "x", "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},
        {"note": "no conversation here"},
    ])  # fmt: skip
    location = locate_dataset(str(path), Registry("dataset", Dataset))
    assert location.format == "records"
    data = read_dataset(location)
    assert data[0].messages == data[1].messages
    with pytest.raises(DataError, match=rf"{path}:3: the record is in no known data format \(its keys: note\)"):
        data[2]


def test_datasets_save_to_disk_directory(tmp_path):
    datasets = pytest.importorskip("datasets")
    png(tmp_path / "imgs" / "a.png")
    rows = {
        "messages": [chat()["messages"], chat("<image><image>Two?", "Yes.")["messages"]],
        "images": [[Image.new("RGB", (4, 4), "green")], [Image.new("RGB", (3, 3)), Image.new("RGB", (2, 2))]],
        "answer": ["red", "two"],
    }
    features = datasets.Features({
        "messages": [{"role": datasets.Value("string"), "content": datasets.Value("string")}],
        "images": datasets.Sequence(datasets.Image()),
        "answer": datasets.Value("string"),
    })  # fmt: skip
    directory = tmp_path / "hf"
    datasets.DatasetDict({"train": datasets.Dataset.from_dict(rows, features=features)}).save_to_disk(str(directory))
    location = locate_dataset(str(directory), Registry("dataset", Dataset))
    assert location.format == "hf-disk"
    data = read_dataset(location)
    assert len(data) == 2
    assert data[0].messages == chat()["messages"] and data[0].columns == {"answer": "red"}
    assert data[0].images[0].size == (4, 4)
    assert [im.size for im in data[1].images] == [(3, 3), (2, 2)]
    assert data.source(1) == f"{directory} row 1"
    # LLaVA-style rows with image paths relative to the directory
    llava = datasets.Dataset.from_dict({
        "id": ["a"], "image": ["../imgs/a.png"],
        "conversations": [[{"from": "human", "value": "<image>\nWhat?"}, {"from": "gpt", "value": "Red."}]],
    })  # fmt: skip
    llava.save_to_disk(str(tmp_path / "hf-llava"))
    with pytest.raises(DataError, match="outside the dataset's folders"):  # ../ leaves the dataset's directory
        read_records_file(tmp_path / "hf-llava")[0]
    sample = read_records_file(tmp_path / "hf-llava", allowed_image_dirs=[tmp_path / "imgs"])[0]
    assert sample.messages[1] == {"role": "assistant", "content": "Red."} and sample.images[0].size == (8, 6)


# -- errors -------------------------------------------------------------------------------


def test_broken_lines_name_file_and_line(tmp_path):
    path = write_jsonl(tmp_path / "broken.jsonl", [
        chat("Hi", "Yo"),
        '{"messages": [}',
        {"messages": [{"role": "narrator", "content": "x"}]},
        chat("<image> and <image>", "Two.", images=["a.png"]),
        {"messages": "not a list"},
        '[1, 2]',
    ])  # fmt: skip
    data = read_records_file(path)  # nothing is parsed yet
    assert len(data) == 6
    assert data[0].messages[0]["content"] == "Hi"
    expected = [
        rf"{path}:2: not valid JSON: .* \(column 15\)",
        rf"{path}:3: message 0 has role 'narrator'",
        rf"{path}:4: 2 <image> tag\(s\) but 1 image\(s\)",
        rf"{path}:5: 'messages' must be a non-empty list",
        rf"{path}:6: a record must be a JSON object, got list",
    ]
    for index, pattern in enumerate(expected, 1):
        with pytest.raises(DataError, match=pattern):
            data[index]


def test_broken_json_array_names_the_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('[\n  {"messages": []},\n  {"messages": [}\n]\n')
    with pytest.raises(DataError, match=rf"{path}:3: not valid JSON"):
        read_records_file(path)
    path.write_text('[\n  {"a": 1}\n  {"b": 2}\n]\n')
    with pytest.raises(DataError, match=rf"{path}:3: not valid JSON: expected ',' or '\]' after record 1"):
        read_records_file(path)
    path.write_text("[]")
    assert len(read_records_file(path)) == 0


def test_skip_mode_counts_bad_records_and_reads_the_next_good_one(tmp_path):
    png(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "some-bad.jsonl", [
        chat(images=["a.png"]),
        "{not json",
        chat(images=["gone.png"]),
        chat("Last", "One"),
        "[]",
    ])  # fmt: skip
    data = read_records_file(path, on_bad_record="skip")
    assert data.skipped == 0
    assert data[1].source == f"{path}:4"  # 2 and 3 are bad: the next good record stands in
    assert data.skipped == 2
    assert data.get(2) is None and data.get(0).source == f"{path}:1"
    assert data[4].source == f"{path}:1"  # wraps round
    assert data.skipped == 3
    assert any(f"{path}:3: image 'gone.png' not found" in reason for reason in data.skipped_reasons)
    assert [s.source for s in data] == [f"{path}:1", f"{path}:4"]
    assert data.skipped == 3  # counted once each
    everything_bad = read_records_file(write_jsonl(tmp_path / "bad.jsonl", ["{", "}"]), on_bad_record="skip")
    with pytest.raises(DataError, match="every record is bad"):
        everything_bad[0]
    with pytest.raises(ValueError, match="on_bad_record"):
        read_records_file(path, on_bad_record="ignore")


def test_relative_paths_look_in_the_image_dir_then_beside_the_file(tmp_path):
    png(tmp_path / "data" / "beside.png", size=(3, 3))
    png(tmp_path / "images" / "both.png", size=(4, 4))
    png(tmp_path / "data" / "both.png", size=(5, 5))
    absolute = png(tmp_path / "elsewhere" / "abs.png", size=(6, 6))
    path = write_jsonl(tmp_path / "data" / "train.jsonl", [
        chat("<image><image><image>", "x", images=["beside.png", "both.png", str(absolute)]),
    ])  # fmt: skip
    with pytest.raises(DataError, match=r"train.jsonl:1: image '.*abs.png' is outside the dataset's folders"):
        read_dataset(DatasetLocation(path, tmp_path / "images", "messages"))[0]
    allowed = {"allowed_image_dirs": [tmp_path / "elsewhere"]}
    data = read_dataset(DatasetLocation(path, tmp_path / "images", "messages"), **allowed)
    assert [im.size for im in data[0].images] == [(3, 3), (4, 4), (6, 6)]
    assert [im.size for im in read_records_file(path, **allowed)[0].images] == [(3, 3), (5, 5), (6, 6)]


def test_remote_images_only_when_allowed(tmp_path, image_server):
    path = write_jsonl(tmp_path / "remote.jsonl", [chat(images=[f"{image_server}/remote.png"])])
    with pytest.raises(DataError, match=rf"{path}:1: image http://127.0.0.1:\d+/remote.png is a remote URL") as info:
        read_records_file(path)[0]
    assert "allow_remote_images: true" in str(info.value)
    sample = read_records_file(path, allow_remote_images=True)[0]
    assert sample.images[0].size == (7, 7) and sample.images[0].getpixel((0, 0)) == (0, 0, 255)
    with pytest.raises(DataError, match="cannot fetch image"):
        open_image(f"{image_server}/absent.png", allow_remote=True)


def test_max_samples_and_missing_dataset(tmp_path):
    path = write_jsonl(tmp_path / "n.jsonl", [chat(f"q{i}", "a") for i in range(10)])
    assert len(read_records_file(path, max_samples=3)) == 3
    with pytest.raises(IndexError):
        read_records_file(path, max_samples=3)[3]
    with pytest.raises(DataError, match="dataset not found: nowhere.jsonl does not exist"):
        read_dataset(DatasetLocation(None, None, None, how="nowhere.jsonl does not exist"))


def test_pickles_for_dataloader_workers(tmp_path):
    png(tmp_path / "a.png")
    data = read_records_file(write_jsonl(tmp_path / "p.jsonl", [chat(images=["a.png"]), "{"]), on_bad_record="skip")
    data[1]
    copy = pickle.loads(pickle.dumps(data))
    assert copy[0].messages == data[0].messages and copy.skipped == 0


def test_opening_is_lazy_on_a_large_file(tmp_path):
    path = tmp_path / "large.jsonl"
    png(tmp_path / "a.png")
    n = 100_000
    with open(path, "w") as f:
        for i in range(n):
            record = chat(f"<image>\nQuestion {i}?", f"Answer {i}.", images=["a.png"], id=i) if i % 2 else chat(
                f"Question {i}?", f"Answer {i}.", id=i)  # fmt: skip
            f.write(json.dumps(record) + "\n")
        f.write("{ this line is broken\n")
    start = time.perf_counter()
    data = read_records_file(path)
    opened = time.perf_counter() - start
    assert len(data) == n + 1  # the broken last line is not parsed until it is read
    rng = random.Random(0)
    for i in rng.sample(range(n), 200):
        sample = data[i]
        assert sample.columns["id"] == i and sample.source == f"{path}:{i + 1}"
        assert len(sample.images) == i % 2
    total = time.perf_counter() - start
    print(f"\n100k-line JSONL: opened in {opened:.3f} s; 200 random reads done at {total:.3f} s")
    with pytest.raises(DataError, match=rf"{path}:{n + 1}: not valid JSON"):
        data[n]


# -- encoding on access -------------------------------------------------------------------


class LengthEncoder:
    """Encodes a sample as one token per character of its messages; drops samples longer than max_length."""

    def __init__(self, max_length=1000):
        self.max_length = max_length
        self.calls = 0

    def encode(self, sample):
        self.calls += 1
        if "reject" in sample.messages[0]["content"]:
            raise DataError(f"{sample.source}: rejected")
        ids = [ord(c) for m in sample.messages for c in m["content"]]
        return None if len(ids) > self.max_length else {"input_ids": ids, "labels": ids}


def samples(*questions):
    return [Sample([{"role": "user", "content": q}, {"role": "assistant", "content": "ok"}], source=f"s:{i}")
            for i, q in enumerate(questions)]  # fmt: skip


def test_encoded_dataset_encodes_on_access():
    encoder = LengthEncoder()
    dataset = EncodedDataset(samples("a", "bb", "ccc"), encoder)
    assert len(dataset) == 3 and encoder.calls == 0
    assert dataset[1]["input_ids"] == [ord(c) for c in "bbok"]
    assert encoder.calls == 1
    assert dataset.source(2) == "s:2"


def test_encoded_dataset_replaces_dropped_samples_and_counts_them():
    dataset = EncodedDataset(samples("short", "x" * 50, "y" * 60, "fine"), LengthEncoder(max_length=20))
    assert dataset[1]["input_ids"][:4] == [ord(c) for c in "fine"]  # 1 and 2 are too long: 3 stands in
    assert dataset.dropped == 2
    assert dataset.get(1) is None and dataset.get(0) is not None
    assert dataset[2]["input_ids"][:4] == [ord(c) for c in "fine"]
    assert dataset.dropped == 2
    assert "2 dropped" in dataset.summary()
    with pytest.raises(DataError, match="no sample of the dataset could be encoded"):
        EncodedDataset(samples("x" * 50), LengthEncoder(max_length=20))[0]


def test_encoded_dataset_skips_rejected_samples_only_when_asked():
    records = samples("fine", "reject me", "also fine")
    with pytest.raises(DataError, match="s:1: rejected"):
        EncodedDataset(records, LengthEncoder())[1]
    lenient = EncodedDataset(records, LengthEncoder(), on_bad_record="skip")
    assert lenient[1]["input_ids"][:4] == [ord(c) for c in "also"]
    assert lenient.skipped == 1 and lenient.skipped_reasons == ["s:1: rejected"]


def test_encoded_dataset_follows_the_reader_in_skip_mode(tmp_path):
    path = write_jsonl(tmp_path / "r.jsonl", [chat("one", "a"), "{", chat("reject", "b"), chat("four", "c")])
    dataset = EncodedDataset(read_records_file(path, on_bad_record="skip"), LengthEncoder())
    assert dataset.on_bad_record == "skip"
    texts = ["".join(map(chr, dataset[i]["input_ids"])) for i in range(4)]
    assert texts == ["onea", "fourc", "fourc", "fourc"]
    assert dataset.skipped == 2
    assert dataset.get(1) is None and dataset.get(2) is None
    torch = pytest.importorskip("torch")
    loader = torch.utils.data.DataLoader(dataset, batch_size=2, collate_fn=lambda batch: batch)
    assert sum(len(batch) for batch in loader) == 4
