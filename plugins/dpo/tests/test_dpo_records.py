"""Preference records: the four layouts, per-file detection, and errors that name file:line before the model loads."""

from __future__ import annotations

import pytest
from vistune.config import RunConfig
from vistune.data.locate import DatasetLocation
from vistune.errors import DataError
from vistune_dpo.layouts import ANSWERS, EXAMPLES, LAYOUTS
from vistune_dpo.records import detect_layout, read_preferences

from dpo_testing import write_jsonl


def read(path, paired=True, **config):
    location = DatasetLocation(path, path.parent, None, how="local path")
    return read_preferences(location, RunConfig(task="rl", **config), paired=paired, log=None)


@pytest.fixture
def image_dir(shape_pairs):
    return shape_pairs[0]


def test_examples_are_detected_as_their_own_layout():
    for name, example in EXAMPLES.items():
        assert detect_layout(example) == name
        assert all(field in example for field in LAYOUTS[name])
    assert detect_layout({"messages": []}) is None


def test_trl_records_place_untagged_images_in_the_first_user_message(image_dir):
    path = write_jsonl(image_dir / "trl-strings.jsonl", [
        {"prompt": "What is in the picture?", "chosen": "a red circle", "rejected": "a blue circle",
         "images": ["images/0.png"], "id": 7},
        {"prompt": [{"role": "system", "content": "Answer in a few words."},
                    {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Colour?"}]}],
         "chosen": [{"role": "assistant", "content": "red"}], "rejected": [{"role": "assistant", "content": "blue"}],
         "image": "images/1.png"},
    ])  # fmt: skip
    records = read(path)
    first, second = records[0], records[1]
    assert first.messages == [{"role": "user", "content": "<image>What is in the picture?"}]
    assert first.columns == {"id": 7, ANSWERS: {"chosen": "a red circle", "rejected": "a blue circle"}}
    assert len(first.images) == 1 and first.images[0].size == (32, 32)
    assert second.messages == [{"role": "system", "content": "Answer in a few words."}, {"role": "user", "content": "<image>Colour?"}]
    assert second.columns[ANSWERS] == {"chosen": "red", "rejected": "blue"}


def test_ms_swift_records(image_dir):
    path = write_jsonl(image_dir / "swift.jsonl", [EXAMPLES["ms-swift-preference"] | {"images": ["images/0.png"]}])
    sample = read(path)[0]
    assert sample.messages == [{"role": "user", "content": "<image>What colour is the shape?"}]
    assert sample.columns[ANSWERS] == {"chosen": "Red.", "rejected": "Blue."}


def test_kto_reads_unpaired_records_and_pairs_as_two_answers(image_dir):
    unpaired = write_jsonl(image_dir / "kto.jsonl", [EXAMPLES["trl-kto"] | {"images": ["images/0.png"]},
                                                     EXAMPLES["ms-swift-kto"] | {"images": ["images/1.png"]}][:1])
    assert read(unpaired, paired=False)[0].columns[ANSWERS] == {"completion": "Red.", "label": True}
    pairs = write_jsonl(image_dir / "pairs-for-kto.jsonl", [EXAMPLES["ms-swift-preference"] | {"images": ["images/0.png"]}])
    answers = [sample.columns[ANSWERS] for sample in read(pairs, paired=False)]
    assert answers == [{"completion": "Red.", "label": True}, {"completion": "Blue.", "label": False}]


def test_unpaired_records_are_refused_by_paired_algorithms(image_dir):
    path = write_jsonl(image_dir / "kto-only.jsonl", [EXAMPLES["trl-kto"] | {"images": ["images/0.png"]}])
    with pytest.raises(DataError, match="unpaired \\(trl-kto\\) records") as error:
        read(path)
    assert "kto" in error.value.hint


def test_bad_records_are_named_by_file_and_line(image_dir):
    good = EXAMPLES["trl-preference"] | {"images": ["images/0.png"]}
    path = write_jsonl(image_dir / "bad.jsonl", [
        good,
        {"prompt": "Colour?", "chosen": "red"},                                  # line 2: no rejected
        good | {"images": ["images/missing.png"]},                               # line 3: no such image
        good | {"rejected": [{"role": "user", "content": "blue"}]},              # line 4: not an assistant answer
        good | {"chosen": ""},                                                   # line 5: empty answer
    ])  # fmt: skip
    with pytest.raises(DataError) as error:
        read(path)
    message = error.value.message
    assert "4 of 5 records" in message
    assert f"{path}:2: a trl-preference record needs prompt, chosen, rejected; this one lacks rejected" in message
    assert f"{path}:3: image 'images/missing.png' not found" in message
    assert f"{path}:4: 'rejected' must be an assistant message" in message
    assert f"{path}:5: 'chosen' is empty" in message
    assert len(read(path, on_bad_record="skip")) == 5  # left out while reading, counted


def test_a_file_in_no_preference_layout_is_refused_at_its_first_record(image_dir):
    path = write_jsonl(image_dir / "sft.jsonl", [{"messages": [{"role": "user", "content": "hi"},
                                                               {"role": "assistant", "content": "hello"}]}])  # fmt: skip
    with pytest.raises(DataError, match=f"{path}:1: not a preference record \\(keys: messages\\)") as error:
        read(path)
    assert "rejected_response" in error.value.hint


def test_shapes_preferences_builds_pairs_about_the_same_images(tmp_path, plugin_manager):
    spec = plugin_manager.registries.datasets.get("shapes-preferences-eval")
    from vistune.specs import load_ref

    data_file = load_ref(spec.builder)(tmp_path / "shapes", spec)
    samples = list(read(data_file))
    assert len(samples) == 80  # both kinds of wrong caption for each of the 40 held-out images
    for sample in samples:
        chosen, rejected = sample.columns[ANSWERS]["chosen"], sample.columns[ANSWERS]["rejected"]
        colour, shape = chosen.split()[1:]
        wrong_colour, wrong_shape = rejected.split()[1:]
        assert (colour == wrong_colour) != (shape == wrong_shape)  # exactly one of the two differs


@pytest.mark.parametrize(("name", "captions", "per_image"), [("shapes-preferences", "shapes-captions", 1),
                                                             ("shapes-preferences-eval", "shapes-captions-eval", 2)])
def test_shapes_preferences_take_the_captions_options(name, captions, per_image, plugin_manager):
    from vistune.testing import check_dataset

    spec, captions_spec = (plugin_manager.registries.datasets.get(n) for n in (name, captions))
    declared = [(option.name, option.type, option.default) for option in spec.options]
    assert declared == [(option.name, option.type, option.default) for option in captions_spec.options]
    options = {"samples": 7, "seed": 5}
    pairs = check_dataset(spec, options=options)
    images = check_dataset(captions_spec, options=options)  # the captions dataset built with the same values
    assert len(images) == 7 and len(pairs) == 7 * per_image
    # each pair is about the image the captions dataset draws with those values, in its order
    captions = [image.messages[-1]["content"] for image in images]
    assert [pair.columns[ANSWERS]["chosen"] for pair in pairs] == [c for c in captions for _ in range(per_image)]
    assert [p.images[0].tobytes() for p in pairs[::per_image]] == [i.images[0].tobytes() for i in images]


def test_registration_is_clean(plugin_manager):
    info = plugin_manager.infos["dpo"]
    assert info.errors == []
    assert sorted(info.registered["algorithms"]) == ["dpo", "kto", "orpo", "simpo"]
    assert sorted(info.registered["formats"]) == sorted(LAYOUTS)
    for name in ("dpo", "orpo", "simpo", "kto"):
        assert plugin_manager.registries.algorithms.get(name).pipeline == "vistune_dpo.pipeline:run"


@pytest.mark.parametrize("name", sorted(LAYOUTS))
def test_data_format_contract(name, plugin_manager, image_dir, tmp_path):
    from vistune.testing import check_data_format

    spec = plugin_manager.registries.formats.get(name)
    example = EXAMPLES[name] | {"images": ["images/0.png"], "id": 3}
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "0.png").write_bytes((image_dir / "images" / "0.png").read_bytes())
    bad = {key: value for key, value in example.items() if key != LAYOUTS[name][-1]}
    # no detector, so other formats are not asked to keep out: ms-swift's preference records are messages records
    # (what an sft run reads them as); a preference run declares the format of its file
    samples = check_data_format(spec, [example], directory=tmp_path, other_formats=[], bad_records=[bad, "text"])
    assert samples[0].columns["id"] == 3 and ANSWERS in samples[0].columns
    assert samples[0].images[0].size == (32, 32)


@pytest.mark.parametrize("name", ["dpo", "orpo", "simpo", "kto"])
def test_algorithm_contract(name, plugin_manager):
    from vistune.testing import check_algorithm

    spec = plugin_manager.registries.algorithms.get(name)
    objective = check_algorithm(spec, RunConfig(task="rl", algorithm=name, **spec.defaults))
    assert objective.name == name and objective.beta == spec.defaults["beta"]
    assert objective.paired == (name != "kto") and objective.needs_reference == (name in ("dpo", "kto"))


def test_dataset_format_names_the_layout(image_dir):
    path = write_jsonl(image_dir / "declared.jsonl", [EXAMPLES["trl-preference"] | {"images": ["images/0.png"]}])
    assert read(path, dataset_format="trl-preference")[0].columns[ANSWERS]["chosen"] == "Red."
    with pytest.raises(DataError, match="a ms-swift-preference record needs messages, rejected_response"):
        read(path, dataset_format="ms-swift-preference")
    with pytest.raises(DataError, match="dataset_format 'messages' is not a preference format"):
        read(path, dataset_format="messages")
