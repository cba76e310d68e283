"""A dataset's options reach its builder, and a copy built with other values lives in a directory of its own."""

from __future__ import annotations

import json
import re

import pytest
from vistune import hookimpl
from vistune.cli import main
from vistune.config import load_config
from vistune.data.locate import cache_dir, locate_dataset
from vistune.errors import ConfigError
from vistune.pipelines.sft import ensure_built
from vistune.plan import make_plan
from vistune.specs import Dataset, Option
from vistune.testing import ContractError, check_dataset

LINES = Option("lines", "int", 2, "records generated", minimum=1)


def build_toy(directory, spec, *, options):
    """A third-party builder that takes options: ``lines`` records, each naming its index."""
    directory.mkdir(parents=True, exist_ok=True)
    records = [{"messages": [{"role": "user", "content": "count"}, {"role": "assistant", "content": str(i)}]}
               for i in range(options["lines"])]  # fmt: skip
    (directory / spec.data_file).write_text("".join(json.dumps(r) + "\n" for r in records))


def build_toy_without_options(directory, spec):
    """A builder written before datasets took options: two arguments."""
    build_toy(directory, spec, options={"lines": 3})


class ToyDatasets:
    @hookimpl
    def vistune_register_datasets(self, register):
        register(Dataset("toy-generated", format="messages", data_file="train.jsonl", builder=build_toy,
                         options=(LINES,)))  # fmt: skip
        register(Dataset("toy-two-args", format="messages", data_file="train.jsonl",
                         builder=build_toy_without_options))  # fmt: skip


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("VISTUNE_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("VISTUNE_DATA_DIR", raising=False)
    monkeypatch.setattr("vistune.plan.visible_gpu_count", lambda: 0)
    return tmp_path / "cache"


@pytest.fixture
def model_dir(tmp_path):
    """A model directory the plan recognises (config.json only: nothing is loaded)."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "model_type": "llama"}')
    return tmp_path / "m"


def plan_for(tmp_path, model_dir, text, name="run.yaml"):
    from vistune.plugins import get_plugin_manager

    path = tmp_path / name
    path.write_text(f"model: {model_dir}\n{text}")
    plan = make_plan(load_config(str(path), task="sft"), get_plugin_manager())
    assert plan.ready, plan.render()
    return plan


def records(location):
    return [json.loads(line) for line in location.data_file.read_text().splitlines()]


def test_shapes_samples_and_seed_build_their_own_copy(tmp_path, cache, model_dir):
    from vistune.demo.shapes import write_split

    plan = plan_for(tmp_path, model_dir, "dataset: shapes-captions\nshapes-captions:\n  samples: 12\n  seed: 5\n")
    location = plan.dataset
    assert location.options == {"samples": 12, "seed": 5} and location.needs_build
    assert location.data_file.parent.parent == cache / "datasets"
    assert re.fullmatch(r"shapes-captions-[0-9a-f]{10}", location.data_file.parent.name)
    ensure_built(location)
    built = records(location)
    assert len(built) == 12
    # the builder wrote what the split writer gives for those values: the seed reached it too
    reference = write_split(tmp_path / "reference", "train", 12, 5)
    assert location.data_file.read_text() == reference.read_text()
    other_seed = write_split(tmp_path / "other-seed", "train", 12, 0)
    assert other_seed.read_text() != reference.read_text()

    # the same values (in another order) find that copy; other values get another directory
    same = plan_for(tmp_path, model_dir, "dataset: shapes-captions\nshapes-captions: {seed: 5, samples: 12}\n",
                    "b.yaml")  # fmt: skip
    assert same.dataset.data_file == location.data_file and not same.dataset.needs_build
    other = plan_for(tmp_path, model_dir, "dataset: shapes-captions\nshapes-captions: {samples: 12}\n", "c.yaml")
    assert other.dataset.data_file.parent not in (location.data_file.parent, cache / "datasets" / "shapes-captions")


def test_default_values_keep_the_old_directory(tmp_path, cache, model_dir):
    unset = plan_for(tmp_path, model_dir, "dataset: shapes-captions\neval_dataset: shapes-captions-eval\n")
    assert unset.dataset.data_file == cache / "datasets" / "shapes-captions" / "train.jsonl"
    assert unset.eval_dataset.data_file == cache / "datasets" / "shapes-captions-eval" / "eval.jsonl"
    assert unset.dataset.options == {"samples": 1000, "seed": 0}
    assert unset.eval_dataset.options == {"samples": 40, "seed": 1}  # each split its own defaults
    explicit = plan_for(tmp_path, model_dir, "dataset: shapes-captions\nshapes-captions: {samples: 1000}\n", "b.yaml")
    assert explicit.dataset.data_file == unset.dataset.data_file


def test_dry_run_shows_the_directory_built_for_the_values(tmp_path, cache, model_dir, capsys):
    path = tmp_path / "run.yaml"
    path.write_text(f"model: {model_dir}\ndataset: shapes-captions\nshapes-captions:\n  samples: 12\nmax_steps: 1\n")
    assert main(["sft", "--config", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    directory = re.search(r"shapes-captions -> (\S+)/train\.jsonl", out).group(1)
    assert re.fullmatch(re.escape(str(cache / "datasets" / "shapes-captions-")) + "[0-9a-f]{10}", directory)
    assert f"generated locally into {directory} for samples=12" in out
    assert "  shapes-captions  samples=12 seed=0\n" in out
    assert not (cache / "datasets").exists()  # a dry run builds nothing


@pytest.mark.parametrize(
    ("section", "expected"),
    [
        ("  samples: 0\n", r"run.yaml:3: shapes-captions.samples must be at least 1, got 0"),
        ("  samples: many\n", r"run.yaml:3: shapes-captions.samples must be an integer"),
        ("  sample: 10\n", r"run.yaml:3: dataset shapes-captions has no option 'sample' \(did you mean samples\?\)"),
    ],
)
def test_bad_values_are_refused_with_file_and_line(tmp_path, cache, section, expected):
    path = tmp_path / "run.yaml"
    path.write_text(f"dataset: shapes-captions\nshapes-captions:\n{section}")
    with pytest.raises(ConfigError, match=expected):
        load_config(str(path), task="sft")
    assert not cache.exists()


def test_a_plugins_dataset_builder_gets_its_options(tmp_path, cache, model_dir, register_plugin):
    register_plugin(ToyDatasets())
    plan = plan_for(tmp_path, model_dir, "dataset: toy-generated\ntoy-generated: {lines: 5}\n")
    ensure_built(plan.dataset)
    assert [r["messages"][1]["content"] for r in records(plan.dataset)] == ["0", "1", "2", "3", "4"]
    assert plan.dataset.data_file.parent.name.startswith("toy-generated-")
    default = plan_for(tmp_path, model_dir, "dataset: toy-generated\n", "b.yaml")
    ensure_built(default.dataset)
    assert default.dataset.data_file == cache / "datasets" / "toy-generated" / "train.jsonl"
    assert len(records(default.dataset)) == 2
    two_args = plan_for(tmp_path, model_dir, "dataset: toy-two-args\n", "c.yaml")
    ensure_built(two_args.dataset)  # called the old way, without options
    assert len(records(two_args.dataset)) == 3


def test_vistune_data_dir_copies_are_keyed_too(tmp_path, monkeypatch, plugin_manager):
    monkeypatch.setenv("VISTUNE_DATA_DIR", str(tmp_path / "data"))
    datasets = plugin_manager.registries.datasets
    default = locate_dataset("shapes-captions", datasets)
    assert default.data_file == tmp_path / "data" / "shapes-captions" / "train.jsonl"
    changed = locate_dataset("shapes-captions", datasets, options={"shapes-captions": {"samples": 12}})
    assert changed.data_file.parent.parent == tmp_path / "data" and changed.data_file.parent != default.data_file.parent
    assert changed.needs_build and changed.options == {"samples": 12, "seed": 0}


def test_a_copy_the_config_points_at_is_used_as_it_is(tmp_path, plugin_manager):
    from vistune.demo.shapes import write_split

    write_split(tmp_path / "mine", "train", 4, 0)
    location = locate_dataset("shapes-captions", plugin_manager.registries.datasets, str(tmp_path / "mine"),
                              options={"shapes-captions": {"samples": 12}})  # fmt: skip
    assert location.data_file == tmp_path / "mine" / "train.jsonl" and not location.needs_build
    assert "used as it is, the options samples=12 apply to copies vistune builds" in location.how


def test_dataset_contract_builds_with_and_without_options(register_plugin, plugin_manager):
    register_plugin(ToyDatasets())
    datasets = plugin_manager.registries.datasets
    assert len(check_dataset(datasets.get("toy-generated"))) == 2  # the defaults
    assert len(check_dataset(datasets.get("toy-generated"), options={"lines": 4})) == 4
    assert len(check_dataset(datasets.get("toy-two-args"))) == 3
    assert len(check_dataset(datasets.get("shapes-captions-eval"), options={"samples": 8})) == 8
    with pytest.raises(ContractError, match="Dataset 'toy-generated': declares no option line"):
        check_dataset(datasets.get("toy-generated"), options={"line": 4})
