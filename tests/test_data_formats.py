"""Data formats as plugins: each format users bring, written as its tool's docs write it, detected and read.

The records below copy the documentation of the tool each format comes from (ms-swift's custom
dataset page, LLaMA-Factory's data/README, TRL's dataset formats, LLaVA's llava_instruct_150k.json).
"""

from __future__ import annotations

import base64
import io
import json
import re
from pathlib import Path
from types import SimpleNamespace

import pytest

Image = pytest.importorskip("PIL.Image")

from vistune import hookimpl
from vistune.data import readers
from vistune.data.formats import RecordReader
from vistune.data.locate import DatasetLocation, locate_dataset
from vistune.data.readers import read_dataset, read_records_file
from vistune.data.validation import read_validated
from vistune.errors import DataError
from vistune.registry import Registry
from vistune.rl.rewards import call_reward
from vistune.rl.rollout import prompt_of
from vistune.specs import DataFormat, Dataset
from vistune.templates import Sample
from vistune.testing import ContractError, check_data_format

ROOT = Path(__file__).parents[1]


def png(path: Path, colour="red", size=(8, 6)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def png_bytes(colour="green", size=(3, 5)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", size, colour).save(out, format="PNG")
    return out.getvalue()


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def config(**values):
    base = dict(on_bad_record="error", allow_remote_images=False, max_samples=None, allowed_image_dirs=[],
                dataset_format=None)  # fmt: skip
    return SimpleNamespace(**{**base, **values})


def where_format(data, index: int) -> str:
    return data.reader.format_of(data._source.raw(index), data.source(index)).name


# -- one test per format, records as each tool documents them ---------------------------------


def test_sharegpt_from_value_with_images_list_and_role_content_with_image(tmp_path):
    png(tmp_path / "mllm_demo_data" / "1.jpg")
    png(tmp_path / "cat.png", "blue", (4, 4))
    path = write_jsonl(tmp_path / "sharegpt.jsonl", [
        # LLaMA-Factory data/README.md, sharegpt format with images
        {"conversations": [{"from": "human", "value": "<image>Who are they?"},
                           {"from": "gpt", "value": "They're Kane and Gretzka from Bayern Munich."}],
         "system": "You are a helpful assistant.", "images": ["mllm_demo_data/1.jpg"]},
        # role/content turns, one picture in `image`
        {"conversations": [{"role": "user", "content": "<image>\nWhat animal?"},
                           {"role": "assistant", "content": "A cat."}], "image": "cat.png", "id": 7},
    ])  # fmt: skip
    data = read_records_file(path)
    assert [where_format(data, i) for i in range(2)] == ["sharegpt", "sharegpt"]
    first = data[0]
    assert first.messages == [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "<image>Who are they?"},
        {"role": "assistant", "content": "They're Kane and Gretzka from Bayern Munich."},
    ]
    assert first.images[0].size == (8, 6) and first.columns == {}
    second = data[1]
    assert second.messages[1] == {"role": "assistant", "content": "A cat."}
    assert second.images[0].getpixel((0, 0)) == (0, 0, 255) and second.columns == {"id": 7}


def test_ms_swift_query_response_history_system_images(tmp_path):
    png(tmp_path / "image_path.png")
    path = write_jsonl(tmp_path / "swift.jsonl", [
        # ms-swift docs, "Custom Dataset": query-response with history and system
        {"system": "<system>", "query": "<query2>", "response": "<response2>",
         "history": [["<query1>", "<response1>"]]},
        # multimodal, images listed beside the query
        {"query": "<image>55555", "response": "66666", "images": ["image_path.png"]},
        # a GRPO prompt: no response, a solution for the accuracy reward
        {"query": "<image>How many sides?", "images": ["image_path.png"], "solution": "4"},
    ])  # fmt: skip
    data = read_records_file(path)
    assert {where_format(data, i) for i in range(3)} == {"ms-swift"}
    assert data[0].messages == [
        {"role": "system", "content": "<system>"},
        {"role": "user", "content": "<query1>"}, {"role": "assistant", "content": "<response1>"},
        {"role": "user", "content": "<query2>"}, {"role": "assistant", "content": "<response2>"},
    ]  # fmt: skip
    assert data[1].messages == [{"role": "user", "content": "<image>55555"}, {"role": "assistant", "content": "66666"}]
    assert data[1].images[0].size == (8, 6)
    assert data[2].messages == [{"role": "user", "content": "<image>How many sides?"}]
    assert data[2].columns == {"solution": "4"}


def test_ms_swift_messages_with_images_and_solution_are_the_messages_format(tmp_path):
    png(tmp_path / "xxx" / "x.jpg")
    path = write_jsonl(tmp_path / "swift-messages.jsonl", [
        # ms-swift docs: messages + images; its GRPO datasets add a solution column
        {"messages": [{"role": "system", "content": "You are a useful and harmless assistant"},
                      {"role": "user", "content": "<image>What is in the image?"},
                      {"role": "assistant", "content": "There is a puppy in the image."}],
         "images": ["xxx/x.jpg"], "solution": "puppy"},
    ])  # fmt: skip
    sample = read_records_file(path)[0]
    assert where_format(read_records_file(path), 0) == "messages"
    assert [m["role"] for m in sample.messages] == ["system", "user", "assistant"]
    assert sample.images[0].size == (8, 6) and sample.columns == {"solution": "puppy"}


def test_alpaca_instruction_input_output_with_system_and_history(tmp_path):
    png(tmp_path / "circle.png")
    path = write_jsonl(tmp_path / "alpaca.jsonl", [
        # LLaMA-Factory data/README.md, alpaca format
        {"instruction": "human instruction (required)", "input": "human input (optional)",
         "output": "model response (required)", "system": "system prompt (optional)",
         "history": [["human instruction in the first round (optional)", "model response in the first round (optional)"]]},
        {"instruction": "<image>Describe the picture.", "input": "", "output": "A red circle.", "images": ["circle.png"]},
    ])  # fmt: skip
    data = read_records_file(path)
    assert {where_format(data, i) for i in range(2)} == {"alpaca"}
    assert data[0].messages == [
        {"role": "system", "content": "system prompt (optional)"},
        {"role": "user", "content": "human instruction in the first round (optional)"},
        {"role": "assistant", "content": "model response in the first round (optional)"},
        # instruction and input joined by a new line, as LLaMA-Factory and ms-swift join them
        {"role": "user", "content": "human instruction (required)\nhuman input (optional)"},
        {"role": "assistant", "content": "model response (required)"},
    ]
    assert data[1].messages[0] == {"role": "user", "content": "<image>Describe the picture."}
    assert data[1].images[0].size == (8, 6)


def test_llava_instruct_is_detected_from_its_own_fields(tmp_path):
    png(tmp_path / "000000033471.jpg")
    path = tmp_path / "llava_instruct_150k.json"
    path.write_text(json.dumps([
        {"id": "000000033471", "image": "000000033471.jpg",
         "conversations": [{"from": "human", "value": "<image>\nWhat are the colors of the bus in the image?"},
                           {"from": "gpt", "value": "The bus in the image is white and red."}]},
    ], indent=1))  # fmt: skip
    data = read_records_file(path)
    assert where_format(data, 0) == "llava-instruct"
    assert data[0].columns == {"id": "000000033471"} and data[0].images[0].size == (8, 6)


def test_trl_typed_content_parts_with_images_read_as_messages(tmp_path):
    png(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "trl.jsonl", [
        # TRL's vision dataset format: the picture as a bare image part, the file in images
        {"images": ["a.png"],
         "messages": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the sky?"}]},
                      {"role": "assistant", "content": [{"type": "text", "text": "It is blue."}]}]},
    ])  # fmt: skip
    sample = read_records_file(path)[0]
    assert sample.messages[0]["content"] == "<image>What color is the sky?" and len(sample.images) == 1


def test_trl_prompt_only_and_prompt_completion_records(tmp_path):
    png(tmp_path / "sky.png", "blue")
    path = write_jsonl(tmp_path / "trl.jsonl", [
        # TRL docs, "Dataset formats": standard prompt-completion, conversational prompt-only
        {"prompt": "The sky is", "completion": " blue."},
        {"prompt": [{"role": "user", "content": "What color is the sky?"}]},
        # a vision prompt-completion record; a GRPO record with one picture and its solution
        {"images": ["sky.png"],
         "prompt": [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What color is the sky?"}]}],
         "completion": [{"role": "assistant", "content": [{"type": "text", "text": "It is blue."}]}]},
        {"image": "sky.png", "prompt": [{"role": "user", "content": "What color is the sky?"}], "solution": "blue"},
        # TRL's preference records are not completions to learn: no format claims them for sft
        {"prompt": "The sky is", "chosen": " blue.", "rejected": " green."},
    ])  # fmt: skip
    data = read_records_file(path)
    assert {where_format(data, i) for i in range(4)} == {"prompt-completion"}
    assert data[0].messages == [{"role": "user", "content": "The sky is"}, {"role": "assistant", "content": " blue."}]
    assert data[1].messages == [{"role": "user", "content": "What color is the sky?"}]
    assert data[2].messages[0]["content"] == "<image>What color is the sky?" and data[2].images[0].size == (8, 6)
    # a picture the prompt does not place goes first in the first user message, where TRL puts it
    assert data[3].messages == [{"role": "user", "content": "<image>What color is the sky?"}]
    assert data[3].columns == {"solution": "blue"} and data[3].images[0].getpixel((0, 0)) == (0, 0, 255)
    with pytest.raises(DataError, match=rf"{path}:5: the record is in no known data format \(its keys: prompt, chosen"):
        data[4]


def test_images_no_tag_places_go_first_in_the_first_user_message_as_ms_swift_puts_them(tmp_path):
    png(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "untagged.jsonl", [
        {"system": "Be brief.", "query": "What is it?", "response": "A box.", "images": ["a.png"]},
        {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Compare <image> with it."},
                      {"role": "assistant", "content": "Same."}], "images": ["a.png", "a.png"]},
        {"conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "A box."}], "images": ["a.png"]},
        {"instruction": "Describe it.", "output": "A box.", "images": ["a.png"]},
        {"id": "1", "image": "a.png", "conversations": [{"from": "human", "value": "What?"}, {"from": "gpt", "value": "?"}]},
    ])  # fmt: skip
    data = read_records_file(path)
    assert data[0].messages[1] == {"role": "user", "content": "<image>What is it?"}
    assert data[1].messages[1] == {"role": "user", "content": "<image>Compare <image> with it."}  # one was missing
    assert data[2].messages[0]["content"] == "<image>What?" and data[3].messages[0]["content"] == "<image>Describe it."
    with pytest.raises(DataError, match=rf"{path}:5: 0 <image> tag\(s\) but 1 image\(s\)"):
        data[4]  # LLaVA-Instruct records always place their picture


# -- images: datasets Image cells and URLs ----------------------------------------------------


def test_images_as_datasets_image_cells_in_json(tmp_path):
    png(tmp_path / "pics" / "a.png", size=(6, 6))
    embedded = base64.b64encode(png_bytes()).decode()
    path = write_jsonl(tmp_path / "cells.jsonl", [
        {"messages": [{"role": "user", "content": "<image><image>Compare."}, {"role": "assistant", "content": "Same."}],
         "images": [{"bytes": None, "path": "pics/a.png"}, {"bytes": embedded, "path": "ignored.png"}]},
        {"messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "!"}],
         "images": [{"bytes": None, "path": "../outside.png"}]},
        {"messages": [{"role": "user", "content": "<image>?"}, {"role": "assistant", "content": "!"}],
         "images": [{"bytes": "not base64!", "path": None}]},
    ])  # fmt: skip
    data = read_records_file(path)
    assert [im.size for im in data[0].images] == [(6, 6), (3, 5)]
    with pytest.raises(DataError, match=rf"{path}:2: image '../outside.png' is outside the dataset's folders"):
        data[1]
    with pytest.raises(DataError, match=rf"{path}:3: the image's 'bytes' is text but not base64"):
        data[2]


def test_remote_images_are_bounded_in_size(tmp_path, monkeypatch, image_server):
    url = f"{image_server}/big.png"
    png(tmp_path / "served" / "big.png", size=(64, 64))
    path = write_jsonl(tmp_path / "remote.jsonl", [{"query": "<image>?", "response": "!", "images": [url]}])
    assert read_records_file(path, allow_remote_images=True)[0].images[0].size == (64, 64)
    monkeypatch.setattr(readers, "MAX_REMOTE_IMAGE_BYTES", 100)
    with pytest.raises(DataError, match=rf"{path}:1: cannot fetch image {url}: .*larger than 100 bytes"):
        read_records_file(path, allow_remote_images=True)[0]
    with pytest.raises(DataError, match="remote images are not allowed"):
        read_records_file(path)[0]


def test_remote_images_are_never_fetched_from_metadata_addresses(tmp_path):
    path = write_jsonl(tmp_path / "remote.jsonl",
                       [{"query": "<image>?", "response": "!", "images": ["http://169.254.169.254/latest/meta-data"]}])  # fmt: skip
    with pytest.raises(DataError, match=r"169\.254\.169\.254, a cloud metadata address"):
        read_records_file(path, allow_remote_images=True)[0]


# -- detection -----------------------------------------------------------------------------------


def test_a_record_two_formats_claim_is_an_error_naming_them_until_dataset_format_says(tmp_path):
    path = write_jsonl(tmp_path / "ambiguous.jsonl", [
        {"query": "What is 2+2?", "instruction": "Answer briefly.", "response": "4"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}],
         "conversations": [{"from": "human", "value": "Hi"}, {"from": "gpt", "value": "Yo"}]},
    ])  # fmt: skip
    data = read_records_file(path)
    with pytest.raises(DataError, match=rf"{path}:1: the record could be in the data formats 'alpaca' and 'ms-swift'") as info:
        data[0]
    assert "dataset_format" in info.value.hint
    with pytest.raises(DataError, match=rf"{path}:2: the record could be in the data formats 'llava-instruct' and 'messages'"):
        data[1]
    declared = read_records_file(path, record_format="ms-swift")
    assert declared[0].messages[-1] == {"role": "assistant", "content": "4"}
    assert declared[0].columns == {"instruction": "Answer briefly."}
    with pytest.raises(DataError, match=rf"{path}:2: 'query' must be a string, got nothing"):
        declared[1]
    with pytest.raises(DataError, match=r"dataset_format: unknown formats 'ms_swift' \(did you mean 'ms-swift'"):
        read_records_file(path, record_format="ms_swift")
    with pytest.raises(DataError, match="'hf-disk' opens datasets but reads no records"):
        read_records_file(path, record_format="hf-disk")


def test_every_format_is_validated_before_the_model_loads_naming_file_line_and_field(tmp_path):
    png(tmp_path / "a.png")
    cases = {
        "sharegpt": ({"conversations": [{"from": "human", "value": "<image>hi"}, {"from": "gpt", "value": "yo"}],
                      "images": ["a.png"]},
                     {"conversations": [{"from": "human", "value": 3}], "images": []},
                     "conversation turn 0 must be"),
        "ms-swift": ({"query": "<image>hi", "response": "yo", "images": ["a.png"]},
                     {"query": "hi", "response": "yo", "history": [["only one"]]},
                     "'history' entry 0 must be a \\[query, response\\] pair"),
        "alpaca": ({"instruction": "hi", "input": "", "output": "yo"},
                   {"instruction": "hi", "output": 5},
                   "'output' must be a string, got int"),
        "llava-instruct": ({"image": "a.png", "conversations": [{"from": "human", "value": "<image>hi"},
                                                              {"from": "gpt", "value": "yo"}]},
                           {"image": "gone.png", "conversations": [{"from": "human", "value": "<image>hi"}]},
                           "image 'gone.png' not found"),
        "prompt-completion": ({"prompt": "hi", "completion": "yo", "image": "a.png"},
                              {"prompt": [], "completion": "yo"},
                              "'prompt' must be a string or a non-empty list"),
        "messages": ({"messages": [{"role": "user", "content": "<image>hi"}], "images": ["a.png"]},
                     {"messages": [{"role": "user", "content": "<image><image>hi"}], "images": ["a.png"]},
                     "2 <image> tag\\(s\\) but 1 image\\(s\\)"),
    }  # fmt: skip
    for name, (good, bad, problem) in cases.items():
        path = write_jsonl(tmp_path / f"{name}.jsonl", [good, bad])
        records = read_validated(DatasetLocation(path, path.parent, None), config(on_bad_record="skip"), log=None)
        assert records.reader.format_of(good, "x").name == name
        assert list(records.known_bad) == [1], name
        assert re.search(rf"{re.escape(str(path))}:2: {problem}", records.known_bad[1]), records.known_bad[1]
        with pytest.raises(DataError, match=rf"1 of 2 records of {re.escape(str(path))} are bad"):
            read_validated(DatasetLocation(path, path.parent, None), config())


def test_extra_columns_reach_rewards_by_name(tmp_path):
    path = write_jsonl(tmp_path / "rl.jsonl", [
        {"query": "What is 2+2?", "solution": "4", "difficulty": "easy"},
        {"instruction": "What is 3+3?", "output": "6", "solution": "6"},
    ])  # fmt: skip
    prompts = [prompt_of(sample) for sample in read_records_file(path)]
    columns = {key: [p.columns.get(key) for p in prompts] for key in ("solution", "difficulty", "answer")}
    seen = {}

    def accuracy(completions, solution, **kwargs):  # written as TRL's and ms-swift's docs write rewards
        seen.update(kwargs)
        return [float(c.strip() == s) for c, s in zip(completions, solution)]

    assert call_reward(accuracy, [p.messages for p in prompts], ["4", "7"], **columns) == [1.0, 0.0]
    assert seen["difficulty"] == ["easy", None] and seen["answer"] == [None, "6"]  # the alpaca output, as RL's answer


# -- hub ids and datasets directories ---------------------------------------------------------------


def test_hub_dataset_ids_load_through_datasets(tmp_path, monkeypatch):
    datasets = pytest.importorskip("datasets")
    rows = datasets.Dataset.from_dict(
        {"conversations": [[{"from": "human", "value": "<image>What?"}, {"from": "gpt", "value": "Green."}]],
         "images": [[{"bytes": png_bytes(), "path": None}]], "solution": ["green"]},
        features=datasets.Features({
            "conversations": [{"from": datasets.Value("string"), "value": datasets.Value("string")}],
            "images": datasets.Sequence(datasets.Image()), "solution": datasets.Value("string")}),
    )  # fmt: skip
    calls = []

    def load_dataset(path, split=None, **kwargs):
        calls.append((path, split))
        return rows if split else datasets.DatasetDict({"train": rows, "test": rows})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    location = locate_dataset("someorg/captions:test", Registry("dataset", Dataset))
    assert (location.format, location.data_file) == ("hf-hub", "someorg/captions:test")
    records = read_validated(location, config(), log=None)
    assert calls == [("someorg/captions", "test")]
    sample = records[0]
    assert sample.source == "someorg/captions:test row 0" and sample.columns == {"solution": "green"}
    assert sample.images[0].size == (3, 5) and sample.messages[1]["content"] == "Green."
    read_dataset(locate_dataset("someorg/captions", Registry("dataset", Dataset)))
    assert calls[-1] == ("someorg/captions", None)  # no split named: the train split of the DatasetDict
    read_dataset(locate_dataset("someorg/captions:train[:1]", Registry("dataset", Dataset)))
    assert calls[-1] == ("someorg/captions", "train[:1]")  # datasets' own slice syntax passes through
    assert locate_dataset("data/train.jsonl", Registry("dataset", Dataset)).format is None  # a missing file, no id
    (tmp_path / "mydata").mkdir()
    monkeypatch.chdir(tmp_path)
    mistyped = locate_dataset("mydata/train", Registry("dataset", Dataset))  # mydata/ is a local folder: no hub id
    assert not mistyped.found and mistyped.how == "mydata/train does not exist"


def test_an_offline_hub_dataset_that_is_not_cached_names_the_id(tmp_path, monkeypatch):
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    location = locate_dataset("someorg/not-here", Registry("dataset", Dataset))
    with pytest.raises(DataError, match="cannot load the Hugging Face dataset someorg/not-here: ConnectionError") as info:
        read_validated(location, config(), log=None)
    assert "HF_HUB_OFFLINE is set" in info.value.hint


def test_sft_with_a_hub_dataset_that_cannot_load_stops_before_the_model(tiny_llava, tmp_path, monkeypatch, capsys,
                                                                       plugin_manager):  # fmt: skip
    import yaml

    import vistune.loading
    from vistune.cli import main

    if "llava" not in plugin_manager.registries.models:
        pytest.skip("the llava plugin is not installed")
    pytest.importorskip("datasets")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(vistune.loading, "load_model", lambda *a, **k: pytest.fail("the model loaded first"))
    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"model": str(tiny_llava), "dataset": "someorg/not-here:train", "device": "cpu",
                                   "output_dir": str(tmp_path / "out"), "max_steps": 1}))  # fmt: skip
    assert main(["sft", "--config", str(run)]) == 2
    err = capsys.readouterr().err
    assert "cannot load the Hugging Face dataset someorg/not-here:train" in err and "Traceback" not in err


# -- a third party's format ------------------------------------------------------------------------


def is_vqa(record):
    return "question" in record and "answer" in record


def read_vqa(record, where):
    if not isinstance(record["question"], str):
        raise DataError(f"{where}: 'question' must be a string")
    messages = [{"role": "user", "content": f"<image>{record['question']}"},
                {"role": "assistant", "content": str(record["answer"])}]  # fmt: skip
    others = {k: v for k, v in record.items() if k not in ("question", "answer", "image")}
    return Sample(messages, [record["image"]], others, where)


VQA = DataFormat("toy-vqa", read=read_vqa, detect=is_vqa, fields=("question", "answer", "image"),
                 example={"question": "What colour?", "answer": "red", "image": "a.png", "qid": 1})  # fmt: skip


class VqaPlugin:
    @hookimpl
    def vistune_register_data_formats(self, register):
        register(VQA)


def test_a_third_party_format_registered_by_a_plugin_is_detected_validated_and_listed(tmp_path, register_plugin,
                                                                                       plugin_manager):  # fmt: skip
    info = register_plugin(VqaPlugin())
    assert info.registered == {"formats": ["toy-vqa"]}
    png(tmp_path / "a.png")
    path = write_jsonl(tmp_path / "vqa.jsonl", [
        {"question": "What colour?", "answer": "red", "image": "a.png", "qid": 1},
        {"question": 5, "answer": "red", "image": "a.png"},
        {"question": "Shape?", "answer": "round", "image": "../b.png"},
        {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Yo"}]},
    ])  # fmt: skip
    records = read_validated(DatasetLocation(path, path.parent, None), config(on_bad_record="skip"), log=None)
    assert records.known_bad == {1: f"{path}:2: 'question' must be a string",
                                 2: f"{path}:3: image '../b.png' is outside the dataset's folders ({tmp_path})"}  # fmt: skip
    first = records[0]
    assert first.messages[0]["content"] == "<image>What colour?" and first.columns == {"qid": 1}
    assert records[3].messages[0]["content"] == "Hi"  # the core's formats still detected alongside
    samples = check_data_format(VQA, directory=tmp_path)
    assert samples[0].messages[1]["content"] == "red"


def test_a_detector_that_raises_is_named_with_the_record(tmp_path, register_plugin):
    class Fragile:
        @hookimpl
        def vistune_register_data_formats(self, register):
            register(DataFormat("fragile", read=read_vqa, detect=lambda record: record["question"] is not None))

    register_plugin(Fragile())
    path = write_jsonl(tmp_path / "x.jsonl", [{"messages": [{"role": "user", "content": "Hi"}]}])
    with pytest.raises(DataError, match=rf"{path}:1: the detector of data format 'fragile' raised KeyError: 'question'"):
        read_records_file(path)[0]


# -- contract check ----------------------------------------------------------------------------------


def test_check_data_format_passes_the_default_formats_and_catches_a_broken_one(plugin_manager, tmp_path):
    formats = plugin_manager.registries.formats
    for name in ("messages", "llava-instruct", "sharegpt", "ms-swift", "alpaca", "prompt-completion"):
        samples = check_data_format(formats.get(name))
        assert samples and samples[0].messages[-1]["role"] == "assistant", name
    assert check_data_format(formats.get("hf-disk")) == []

    def loose(record):
        return True

    def drops_columns(record, where):
        return Sample([{"role": "user", "content": record["q"]}], [], {}, where)

    with pytest.raises(ContractError, match="claims records of 'messages' too"):
        check_data_format(DataFormat("loose", read=drops_columns, detect=loose, fields=("q", "id"),
                                     example={"q": "hi", "id": 1}),
                          other_formats=[formats.get("messages")])  # fmt: skip
    with pytest.raises(ContractError, match="drops the field 'id'"):
        check_data_format(DataFormat("drops", read=drops_columns, fields=("q",), example={"q": "hi", "id": 1}))
    with pytest.raises(ContractError, match="does not detect its own example"):
        check_data_format(DataFormat("blind", read=drops_columns, detect=lambda r: False, example={"q": "hi"}))

    def bad_where(record, where):
        if not isinstance(record["q"], str):
            raise DataError("'q' must be a string")  # no location
        return drops_columns(record, where)

    nowhere = DataFormat("nowhere", read=bad_where, fields=("q",), example={"q": "hi"})
    with pytest.raises(ContractError, match="an error must start with where"):
        check_data_format(nowhere, bad_records=[{"q": None}])
    with pytest.raises(ContractError, match="raised KeyError on bad record 0"):
        check_data_format(nowhere, bad_records=[{}])


# -- README ------------------------------------------------------------------------------------------


def test_readme_shows_one_record_of_each_format_that_reads_as_that_format(plugin_manager):
    readme = (ROOT / "README.md").read_text()
    section = re.search(r"^## Dataset formats\n(.*?)^## ", readme, re.MULTILINE | re.DOTALL).group(1)
    formats = plugin_manager.registries.formats
    reader = RecordReader(list(formats))
    shown = re.findall(r"^\*\*`([\w.-]+)`\*\*.*?\n```json\n(.*?)\n```", section, re.MULTILINE | re.DOTALL)
    assert sorted(name for name, _ in shown) == sorted(f.name for f in formats if f.detect is not None)
    for name, text in shown:
        record = json.loads(text)
        assert reader.format_of(record, "README").name == name
        sample = reader.read(record, "README")
        tags = sum(m["content"].count("<image>") for m in sample.messages)
        assert tags == len(sample.images), name


# -- PLUGINS.md's example, executed --------------------------------------------------------------------


def test_plugins_md_data_format_example_registers_detects_and_passes_its_own_test(tmp_path, monkeypatch,
                                                                                   register_plugin, plugin_manager):  # fmt: skip
    import sys
    import types

    guide = (ROOT / "PLUGINS.md").read_text()
    section = re.search(r"^### vistune_register_data_formats\n(.*?)^#{1,3} ", guide, re.MULTILINE | re.DOTALL).group(1)
    blocks = re.findall(r"^```python\n(.*?)^```", section, re.MULTILINE | re.DOTALL)
    plugin_code, test_code = blocks[1], blocks[2]
    package = types.ModuleType("vistune_vqa")
    package.__path__ = []
    module = types.ModuleType("vistune_vqa.formats")
    monkeypatch.setitem(sys.modules, "vistune_vqa", package)
    monkeypatch.setitem(sys.modules, "vistune_vqa.formats", module)
    exec(compile(plugin_code, "PLUGINS.md vistune_vqa/formats.py", "exec"), module.__dict__)
    assert register_plugin(module).registered == {"formats": ["vqa"]}
    namespace: dict = {}
    exec(compile(test_code, "PLUGINS.md tests/test_vqa.py", "exec"), namespace)
    namespace["test_vqa_format"](plugin_manager, tmp_path)
    png(tmp_path / "bus.jpg")
    path = write_jsonl(tmp_path / "vqa.jsonl", [{"question": "What colour?", "answer": "Red.", "image": "bus.jpg",
                                                  "question_id": 7}, {"question": "No picture?", "answer": "No."}])  # fmt: skip
    records = read_validated(DatasetLocation(path, path.parent, None), config(on_bad_record="skip"), log=None)
    assert records.known_bad == {1: f"{path}:2: 'image' must name the picture the question is about"}
    assert records[0].columns == {"question_id": 7} and records[0].images[0].size == (8, 6)


# -- the plan ----------------------------------------------------------------------------------------


def test_dry_run_names_the_format_and_refuses_an_unknown_dataset_format(tiny_llama, tmp_path, capsys):
    import yaml

    from vistune.cli import main

    run = tmp_path / "run.yaml"
    run.write_text(yaml.safe_dump({"model": str(tiny_llama), "dataset": "someorg/captions:test", "device": "cpu",
                                   "dataset_format": "sharegpt", "output_dir": str(tmp_path / "out")}))  # fmt: skip
    assert main(["sft", "--config", str(run), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "someorg/captions:test -> someorg/captions:test  (opened as hf-hub when the run starts; format: sharegpt)" in out
    run.write_text(run.read_text().replace("dataset_format: sharegpt\n", ""))
    assert main(["sft", "--config", str(run), "--dry-run"]) == 0
    assert "(opened as hf-hub when the run starts; format: records detected one by one)" in capsys.readouterr().out
    run.write_text(run.read_text() + "dataset_format: sharegpt\n")
    run.write_text(run.read_text().replace("sharegpt", "share-gpt"))
    assert main(["sft", "--config", str(run), "--dry-run"]) == 2
    out = capsys.readouterr().out
    line = run.read_text().splitlines().index("dataset_format: share-gpt") + 1
    assert f"{run}:{line}: dataset_format: unknown formats 'share-gpt' (did you mean 'sharegpt'?)" in out
    run.write_text(run.read_text().replace("share-gpt", "hf-disk"))
    assert main(["sft", "--config", str(run), "--dry-run"]) == 2
    assert "dataset_format: 'hf-disk' opens datasets but reads no records" in capsys.readouterr().out


def test_a_dataset_of_a_format_no_plugin_registers_is_a_plugin_problem(register_plugin):
    class Plugin:
        @hookimpl
        def vistune_register_datasets(self, register):
            register(Dataset("parquet-data", format="parquet", data_file="train.parquet"))

    info = register_plugin(Plugin(), allow_errors=True)
    assert info.errors == []  # registration alone cannot know what later plugins register
    from vistune.plugins import get_plugin_manager

    manager = get_plugin_manager()
    manager.check_references()
    assert any("registers dataset 'parquet-data' in the data format 'parquet', which no loaded plugin registers" in e
               for e in manager.infos[info.name].errors)  # fmt: skip


# -- the pipelines, end to end on tiny models ------------------------------------------------------------

REWARD_FILE = '''
import json


def accuracy(completions, solution, **kwargs):
    """Written as TRL's and ms-swift's docs write rewards; records what it was given."""
    with open(SEEN, "a") as f:
        f.write(json.dumps({"solution": solution, "difficulty": kwargs.get("difficulty")}) + "\\n")
    return [float(s in c) for c, s in zip(completions, solution)]
'''


def test_rl_on_ms_swift_query_records_gives_rewards_their_solution_column(tmp_path, tiny_llama):
    import yaml

    from vistune.cli import main

    seen = tmp_path / "seen.jsonl"
    rewards = tmp_path / "swift_rewards.py"
    rewards.write_text(f"SEEN = {str(seen)!r}\n" + REWARD_FILE)
    data = write_jsonl(tmp_path / "swift_grpo.jsonl", [
        {"system": "Answer with one letter.", "query": f"Which letter is number {i}?", "solution": "abcd"[i],
         "difficulty": i % 2} for i in range(4)])  # fmt: skip
    run = tmp_path / "rl.yaml"
    run.write_text(yaml.safe_dump({
        "task": "rl", "model": str(tiny_llama), "dataset": str(data), "device": "cpu", "dtype": "float32",
        "report_to": ["jsonl"], "seed": 0, "per_device_batch_size": 2, "num_generations": 2,
        "max_completion_length": 4, "max_steps": 1, "save_steps": 1000, "rewards": [f"{rewards}:accuracy"],
        "output_dir": str(tmp_path / "out")}))  # fmt: skip
    assert main(["rl", "--config", str(run)]) == 0
    calls = [json.loads(line) for line in seen.read_text().splitlines()]
    given = [(s, d) for call in calls for s, d in zip(call["solution"], call["difficulty"])]
    assert given and all(s in "abcd" and d == "abcd".index(s) % 2 for s, d in given)  # each prompt's own columns


def test_sft_trains_on_sharegpt_records_with_images(tmp_path, tiny_llava, plugin_manager):
    import yaml

    from vistune.cli import main
    from vistune.training.metrics import read_metrics

    if "llava" not in plugin_manager.registries.models:
        pytest.skip("the llava plugin is not installed")
    png(tmp_path / "data" / "images" / "red.png", "red", (32, 32))
    png(tmp_path / "data" / "images" / "blue.png", "blue", (32, 32))
    data = write_jsonl(tmp_path / "data" / "sharegpt.jsonl", [
        {"conversations": [{"from": "human", "value": "<image>What colour is it?"}, {"from": "gpt", "value": colour}],
         "images": [f"images/{colour}.png"]} for colour in ("red", "blue")])  # fmt: skip
    run = tmp_path / "sft.yaml"
    run.write_text(yaml.safe_dump({
        "model": str(tiny_llava), "dataset": str(data), "device": "cpu", "dtype": "float32", "report_to": ["jsonl"],
        "max_steps": 2, "save_steps": 1000, "output_dir": str(tmp_path / "out")}))  # fmt: skip
    assert main(["sft", "--config", str(run)]) == 0
    losses = [r["loss"] for r in read_metrics(tmp_path / "out" / "metrics.jsonl") if "loss" in r]
    assert len(losses) == 2 and all(loss > 0 for loss in losses)
