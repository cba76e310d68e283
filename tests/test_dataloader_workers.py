"""Batches prepared in DataLoader worker processes: how many, their counts, their errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from torch.utils.data import DataLoader

from vistune.config import build_config, load_config
from vistune.data.encoded import EncodedDataset, error_from_worker
from vistune.data.packing import PackedDataset
from vistune.data.readers import read_records_file
from vistune.errors import ConfigError, DataError
from vistune.templates import Sample
from vistune.training import arguments
from vistune.training.arguments import dataloader_workers, training_arguments


class LengthEncoder:
    """One token per character of the question; drops samples over ``max_length``, rejects "reject"."""

    def __init__(self, max_length=10):
        self.max_length = max_length

    def encode(self, sample):
        text = sample.messages[0]["content"]
        if "reject" in text:
            raise DataError(f"{sample.source}: rejected", hint="leave it out")
        ids = [ord(c) for c in text]
        return None if len(ids) > self.max_length else {"input_ids": ids, "labels": ids}


def samples(*questions):
    return [Sample([{"role": "user", "content": q}, {"role": "assistant", "content": "ok"}], source=f"s:{i}")
            for i, q in enumerate(questions)]  # fmt: skip


def cpus(monkeypatch, count):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(count)), raising=False)


# -- how many workers ---------------------------------------------------------------------


def test_auto_leaves_one_cpu_per_gpu_process_and_starts_at_most_eight(monkeypatch):
    cpus(monkeypatch, 16)
    assert dataloader_workers("auto", "cuda", 1) == 8
    assert dataloader_workers("auto", "cuda", 4) == 3
    cpus(monkeypatch, 4)
    assert dataloader_workers("auto", "cuda", 1) == 3
    assert dataloader_workers("auto", "cuda", 8) == 1  # fewer CPUs than processes: still one each
    cpus(monkeypatch, 64)
    assert dataloader_workers("auto", "cuda", 2) == 8


def test_auto_counts_the_cpus_the_process_may_use(monkeypatch):
    cpus(monkeypatch, 3)  # taskset or a container's cpuset: fewer than the machine has
    monkeypatch.setattr(os, "cpu_count", lambda: 96)
    assert dataloader_workers("auto", "cuda", 1) == 2
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)  # macOS, Windows
    assert arguments.usable_cpus() == 96
    assert dataloader_workers("auto", "cuda", 1) == 8


def test_auto_is_no_workers_on_cpu_and_a_number_is_taken_as_given(monkeypatch):
    cpus(monkeypatch, 16)
    assert dataloader_workers("auto", "cpu", 1) == 0
    assert dataloader_workers("0", "cuda", 1) == 0
    assert dataloader_workers("2", "cpu", 1) == 2
    assert dataloader_workers("12", "cuda", 4) == 12


def test_config_takes_auto_or_a_number(tmp_path):
    assert build_config({"task": "sft"}).config.dataloader_num_workers == "auto"
    path = tmp_path / "run.yaml"
    path.write_text("dataloader_num_workers: 4\n")
    assert load_config(str(path), task="sft").config.dataloader_num_workers == "4"
    assert load_config(None, ["--dataloader_num_workers", "0"], task="sft").config.dataloader_num_workers == "0"
    for bad in (-1, "many", 1.5, "AUTO"):
        with pytest.raises(ConfigError, match="dataloader_num_workers must be auto or a number"):
            build_config({"task": "sft", "dataloader_num_workers": bad})


def test_training_arguments_start_persistent_workers_only_when_there_are_some(tmp_path, monkeypatch):
    def args(device="cpu", **values):
        config = build_config({"task": "sft", "output_dir": str(tmp_path), **values}).config
        return training_arguments(config, device, has_eval=False)

    plain = args()  # the test suite and the CPU demo: batches prepared in the training process, as before
    assert plain.dataloader_num_workers == 0 and not plain.dataloader_persistent_workers
    workers = args(dataloader_num_workers=2)
    assert workers.dataloader_num_workers == 2 and workers.dataloader_persistent_workers
    assert workers.dataloader_prefetch_factor == arguments.PREFETCH_FACTOR
    cpus(monkeypatch, 8)
    assert arguments.dataloader_arguments(build_config({"task": "sft"}).config, "cuda") == {
        "dataloader_num_workers": 7, "dataloader_pin_memory": True,
        "dataloader_persistent_workers": True, "dataloader_prefetch_factor": arguments.PREFETCH_FACTOR,
    }  # fmt: skip
    # packed rows learn their epoch's shuffle in this process: workers start afresh each epoch to see it
    packed = args(dataloader_num_workers=2, packing=True)
    assert packed.dataloader_num_workers == 2 and not packed.dataloader_persistent_workers
    # the key is sft's: RL reads its prompts in the training process
    rl = build_config({"task": "rl", "output_dir": str(tmp_path), "dataloader_num_workers": "2"}).config
    assert training_arguments(rl, "cuda", has_eval=False).dataloader_num_workers == 0


# -- counts across worker processes ---------------------------------------------------------


@pytest.mark.parametrize("context", ["fork", "spawn"])
def test_counts_made_in_workers_are_seen_by_the_training_process(context):
    questions = ["short", "x" * 50, "reject me", "fine", "y" * 60, "ok", "z" * 70, "also ok"]
    dataset = EncodedDataset(samples(*questions), LengthEncoder(), on_bad_record="skip")
    loader = DataLoader(dataset, batch_size=2, num_workers=2, collate_fn=list, multiprocessing_context=context)
    assert sum(len(batch) for batch in loader) == len(questions)
    assert (dataset.dropped, dataset.skipped) == (3, 1)
    assert "3 dropped (longer than max_length), 1 bad records skipped" in dataset.summary()
    # what the workers found is known here: a dropped sample is not encoded again
    dataset.encoder = None
    assert dataset.get(1) is None and dataset.get(2) is None


def test_packed_rows_from_workers_count_dropped_samples():
    dataset = EncodedDataset(samples("short", "x" * 50, "fine", "y" * 60, "ok", "z" * 70), LengthEncoder())
    loader = DataLoader(PackedDataset(dataset, 16), batch_size=None, num_workers=2)
    assert list(loader)
    assert dataset.dropped == 3


def test_a_plain_pickled_copy_keeps_the_counts_but_not_the_memory(tmp_path):
    import pickle

    dataset = EncodedDataset(samples("x" * 50, "reject", "y" * 60), LengthEncoder(), on_bad_record="skip")
    dataset.get(0), dataset.get(1)
    assert (dataset.dropped, dataset.skipped, dataset.skipped_reasons) == (1, 1, ["s:1: rejected"])
    copy = pickle.loads(pickle.dumps(dataset))
    assert (copy.dropped, copy.skipped, copy.skipped_reasons) == (1, 1, [])  # reasons are each process's own
    copy.get(2)
    assert (copy.dropped, dataset.dropped) == (2, 1)


# -- errors raised in workers -----------------------------------------------------------------


def test_a_bad_record_found_by_a_worker_reads_as_without_workers(tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    Image = pytest.importorskip("PIL.Image")
    Image.new("RGB", (8, 6), "red").save(images / "red.png")
    records = [{"messages": [{"role": "user", "content": "<image>\nWhat is it?"},
                             {"role": "assistant", "content": "A red box."}], "images": [name]}
               for name in ("images/red.png", "images/gone.png")]  # fmt: skip
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    dataset = EncodedDataset(read_records_file(path), LengthEncoder(max_length=100))

    with pytest.raises(DataError) as direct:
        list(DataLoader(dataset, batch_size=1, collate_fn=list))
    with pytest.raises(DataError) as wrapped:
        list(DataLoader(dataset, batch_size=1, num_workers=1, collate_fn=list))
    assert wrapped.value.message.startswith("Caught DataError in DataLoader worker process 0")
    assert direct.value.message.startswith(f"{path}:2: ") and direct.value.hint
    unwrapped = error_from_worker(wrapped.value)
    assert type(unwrapped) is DataError
    assert (unwrapped.message, unwrapped.hint) == (direct.value.message, direct.value.hint)
    assert error_from_worker(direct.value) is direct.value  # raised here: left as it is


def test_an_error_without_a_hint_and_other_errors_are_read_back_as_they_were():
    dataset = EncodedDataset(samples("fine", "x" * 50), LengthEncoder(max_length=1))  # the dataset's own error
    with pytest.raises(DataError) as wrapped:
        list(DataLoader(dataset, num_workers=1, collate_fn=list))
    error = error_from_worker(wrapped.value)
    assert error.message.startswith("no sample of the dataset could be encoded") and error.hint.startswith("raise")

    class Plain(DataError):
        pass

    traceback = "Traceback (most recent call last):\n  File \"x.py\", line 1, in f\n"
    message = f"Caught Plain in DataLoader worker process 3.\nOriginal {traceback}{__name__}." \
              "test_an_error_without_a_hint_and_other_errors_are_read_back_as_they_were.<locals>.Plain: s:1: bad\n"
    error = error_from_worker(Plain(message))
    assert type(error) is Plain and (error.message, error.hint) == ("s:1: bad", None)


# -- the sft pipeline ----------------------------------------------------------------------------


@pytest.fixture
def llava_plugin(plugin_manager):
    if "llava" not in plugin_manager.registries.models:
        pytest.skip("the llava plugin is not installed (pip install -e plugins/llava)")


def _shapes_with_long_answers(root: Path, long: set[int], count: int = 12) -> Path:
    from vistune.demo.shapes import write_split

    path = write_split(root, "train", count=count)
    records = [json.loads(line) for line in path.read_text().splitlines()]
    for i in long:
        records[i]["messages"][1]["content"] = "a very long caption " * 40
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _run(tmp_path, model, data, **values):
    import yaml

    from vistune.cli import main

    config = {"model": str(model), "dataset": str(data), "output_dir": str(tmp_path / "out"), "dtype": "float32",
              "device": "cpu", "per_device_batch_size": 4, "seed": 0, "report_to": ["jsonl"], "save_steps": 100,
              "dataloader_num_workers": 2, **values}  # fmt: skip
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(config))
    return main(["sft", "--config", str(path)])


def test_sft_with_workers_reports_the_samples_they_dropped(tiny_llava, tmp_path, llava_plugin, capsys):
    data = _shapes_with_long_answers(tmp_path / "data", long={1, 5, 6})
    # one epoch of 12 samples in batches of 4: every sample is read, by one of the two workers
    assert _run(tmp_path, tiny_llava, data, truncation="drop", max_length=128, num_train_epochs=1) == 0
    out = capsys.readouterr().out
    assert "training data: 12 samples; 3 dropped (longer than max_length), 0 bad records skipped" in out


def test_sft_with_workers_reports_a_bad_record_as_without_them(tiny_llava, tmp_path, llava_plugin, capsys):
    data = _shapes_with_long_answers(tmp_path / "data", long=set(), count=8)
    # present, so the check before training passes; found broken only when a worker decodes it
    (data.parent / "images" / "train-00002.png").write_bytes(b"not a picture")
    assert _run(tmp_path, tiny_llava, data, max_steps=2) == 2
    err = capsys.readouterr().err
    assert f"error: {data}:3: " in err and "train-00002.png is not a readable image" in err
    assert "Caught" not in err and "Traceback" not in err
