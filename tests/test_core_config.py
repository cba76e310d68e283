"""The run configuration: the reference config, typos, wrong values and command-line overrides."""

from __future__ import annotations

import pytest
from vistune.config import FIELDS, RunConfig, load_config, parse_overrides
from vistune.errors import ConfigError


def write(tmp_path, text, name="run.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_reference_config_is_accepted_as_written(tmp_path, reference_config_text):
    loaded = load_config(write(tmp_path, reference_config_text), task="sft")
    config = loaded.config
    assert (config.model, config.task, config.dataset) == ("llava-v1.5-7b", "sft", "llava-instruct-en")
    assert (config.quantization, config.adapter, config.parallel_method, config.gpu_num) == ("q4_k_m", "lora", "ddp", 4)
    assert config.options["lora"]["target_modules"] == ["q_proj", "v_proj"]  # the flat key of the lora adapter
    assert loaded.where("gpu_num") == f"{tmp_path / 'run.yaml'}:8"


def test_unknown_key_suggests_the_closest_and_names_file_and_line(tmp_path):
    path = write(tmp_path, "model: m\nlora_target_module: [q_proj]\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, task="sft")
    message = str(info.value)
    assert f"{path}:2" in message
    assert "'lora_target_module'" in message
    assert "did you mean lora_target_modules?" in message


def test_every_bad_key_is_reported_at_once(tmp_path):
    path = write(tmp_path, "model: m\nlora_target_module: [q_proj]\nlearning_rate: fast\nlora_rank: 8\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, task="sft")
    lines = str(info.value).splitlines()
    assert lines[0] == "2 problems in the config:"
    assert lines[1].startswith(f"  - {path}:2: unknown key 'lora_target_module'")
    assert lines[2] == f"  - {path}:3: learning_rate must be a number, got 'fast' (str)"


def test_unknown_flag_suggests_the_closest_key():
    with pytest.raises(ConfigError, match=r"command line --learning_rat: unknown key .*did you mean learning_rate\?"):
        load_config(None, ["--learning_rat", "1e-4"], task="sft")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("gpu_num: four", r"gpu_num must be an integer, got 'four'"),
        ("gpu_num: 2.5", r"gpu_num must be an integer"),
        ("packing: maybe", r"packing must be true or false"),
        ("learning_rate: fast", r"learning_rate must be a number"),
        ("lora_target_modules: {q: 1}", r"lora_target_modules must be a list of strings"),
        ("lora: {dropout: 1.5}", r"lora.dropout must be at most 1, got 1.5"),
        ("quantization: q4km", r"quantization must be one of .*did you mean 'q4_k_m'\?"),
        ("parallel_method: deepspeed", r"parallel_method must be one of none, ddp, fsdp"),
        ("gpu_num: 0", r"gpu_num must be at least 1, got 0"),
        ("lora_dropout: -0.1", r"lora_dropout must be at least 0, got -0.1"),
        ("seed: null", r"seed must be an integer \(null is not allowed here\)"),
    ],
)
def test_wrong_value_names_field_and_file_line(tmp_path, line, expected):
    path = write(tmp_path, f"model: m\n{line}\n")
    with pytest.raises(ConfigError, match=expected) as info:
        load_config(path, task="sft")
    assert str(info.value).startswith(f"{path}:2: ")


def test_overrides_parse_yaml_values_and_win_over_the_file(tmp_path):
    path = write(tmp_path, "learning_rate: 0.001\nlora_target_modules: [v_proj]\npacking: false\ngpu_num: 2\n")
    loaded = load_config(path, ["--lr", "1e-4", "--lora_target_modules", "[q_proj,k_proj]", "--packing", "--gpu_num=1"],
                         task="sft")  # fmt: skip
    config = loaded.config
    assert config.learning_rate == pytest.approx(1e-4)
    assert config.options["lora"]["target_modules"] == ["q_proj", "k_proj"]
    assert config.packing is True
    assert config.gpu_num == 1
    assert loaded.where("learning_rate") == "command line --lr"
    assert str(loaded.plugin_values.sources["lora_target_modules"]) == "command line --lora_target_modules"


def test_parse_overrides_handles_bare_flags_negative_numbers_and_dashes():
    values, _ = parse_overrides(["--packing", "--max-steps", "-1", "--lora_target_modules=q_proj,v_proj", "--model", "m"])
    assert values == {"packing": True, "max_steps": -1, "lora_target_modules": "q_proj,v_proj", "model": "m"}
    assert load_config(None, ["--lora_target_modules=q_proj,v_proj"]).config.options["lora"]["target_modules"] == [
        "q_proj", "v_proj"]  # fmt: skip


def test_stray_argument_is_an_error():
    with pytest.raises(ConfigError, match="unexpected command-line argument 'stray'"):
        parse_overrides(["stray"])


def test_aliases_of_other_tools_are_accepted(tmp_path):
    path = write(tmp_path, "model_id_or_path: llava-hf/llava-1.5-7b-hf\nquant_method: awq\nepochs: 3\n")
    config = load_config(path, task="infer").config
    assert (config.model, config.quantization, config.num_train_epochs) == ("llava-hf/llava-1.5-7b-hf", "awq", 3.0)


def test_a_field_set_under_an_alias_and_its_own_name_is_an_error(tmp_path):
    path = write(tmp_path, "learning_rate: 0.001\nmodel: m\nlr: 0.1\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, task="sft")
    assert str(info.value) == f"{path}:3: lr sets learning_rate, which {path}:1 already sets"
    # a flag replaces the file's value, whichever name each uses
    overridden = write(tmp_path, "lr: 0.1\n", "overridden.yaml")
    assert load_config(overridden, ["--learning_rate", "0.5"], task="sft").config.learning_rate == 0.5


def test_task_in_file_must_match_the_command(tmp_path):
    path = write(tmp_path, "task: rl\nmodel: m\n")
    with pytest.raises(ConfigError, match=r"run\.yaml:1: task is 'rl' but the command is `vistune sft`") as info:
        load_config(path, task="sft")
    assert info.value.hint == f"run `vistune rl --config {path}` or remove the task key"
    with pytest.raises(ConfigError, match=r"command line --task: task is 'rl'") as info:
        load_config(None, ["--task", "rl"], task="sft")
    assert info.value.hint == "run `vistune rl` or remove the task key"


def test_yaml_problems_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match=r"bad\.yaml:2: not valid YAML"):
        load_config(write(tmp_path, "model: m\n  - broken: [\n", "bad.yaml"))
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(write(tmp_path, "- a\n- b\n", "list.yaml"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(str(tmp_path / "missing.yaml"))


def test_a_key_set_twice_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match=r"run\.yaml:3: key 'gpu_num' is set twice \(first at line 1\)"):
        load_config(write(tmp_path, "gpu_num: 4\nmodel: m\ngpu_num: 2\n"))


def test_rewards_normalise_and_reject_bad_entries(tmp_path):
    config = load_config(None, ["--rewards", "[bleu, {name: length, weight: 0.5, options: {max: 10}}]"]).config
    assert config.rewards == [
        {"name": "bleu", "weight": 1.0, "options": {}},
        {"name": "length", "weight": 0.5, "options": {"max": 10}},
    ]
    with pytest.raises(ConfigError, match=r"rewards\[0\] has unknown keys \['wieght'\]"):
        load_config(write(tmp_path, "rewards: [{name: bleu, wieght: 2}]\n"))


def test_list_and_dict_defaults_are_not_shared_between_configs():
    a, b = RunConfig(), RunConfig()
    a.report_to.append("wandb")
    a.algorithm_options["x"] = 1
    assert b.report_to == ["jsonl", "tensorboard"]
    assert b.algorithm_options == {}


def test_optional_fields_accept_null(tmp_path):
    config = load_config(write(tmp_path, "save_total_limit: null\nmax_samples: null\n")).config
    assert config.save_total_limit is None and config.max_samples is None


def test_every_field_has_help_type_and_tasks():
    for name, field in FIELDS.items():
        meta = field.metadata
        assert meta["help"] and meta["type"] in ("str", "path", "int", "float", "bool", "bool_auto", "int_auto", "str_list", "dict", "rewards"), name
        assert set(meta["tasks"]) <= {"sft", "rl", "infer", "serve", "export"}, name


def alias_bomb() -> str:
    """A "billion laughs" config: anchors of 9 aliases of the anchor before, 9**9 strings in under 400 bytes."""
    lines = ["algorithm_options:", '  a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for previous, name in zip("abcdefg", "bcdefgh"):
        lines.append(f"  {name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]")
    lines.append("lora_target_modules: [" + ",".join(["*h"] * 9) + "]")  # not a list of strings: an error names it
    return "\n".join(lines) + "\n"


# Loads the bomb under a 1 GiB address-space limit, so that a regression fails with MemoryError instead of
# taking the machine's memory; reports the time taken, the peak of Python allocations and the error.
BOMB_PROBE = """
import json, resource, sys, time, tracemalloc
import yaml
resource.setrlimit(resource.RLIMIT_AS, (1 << 30, 1 << 30))
from vistune.config import load_config
from vistune.errors import ConfigError
tracemalloc.start()
started = time.perf_counter()
try:
    load_config(sys.argv[1], task="sft")
    error = None
except ConfigError as exc:
    error = str(exc)
seconds = time.perf_counter() - started
print(json.dumps({"seconds": seconds, "peak": tracemalloc.get_traced_memory()[1], "error": error}))
"""


def test_an_alias_bomb_is_refused_fast_and_names_the_file(tmp_path):
    import json
    import subprocess
    import sys

    path = write(tmp_path, alias_bomb(), "bomb.yaml")
    assert len(alias_bomb().encode()) < 400
    result = subprocess.run([sys.executable, "-c", BOMB_PROBE, path], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout)
    assert report["error"] is not None and report["error"].startswith(f"{path}:1: algorithm_options: the value expands")
    assert "aliases" in report["error"]
    assert report["seconds"] < 0.5, report
    assert report["peak"] < 20 * 1024 * 1024, report


def test_aliases_that_expand_modestly_are_fine_and_self_reference_is_refused(tmp_path):
    shared = "rewards:\n  - {name: a, options: &o {k: [1, 2]}}\n  - {name: b, options: *o}\n"
    assert [r["options"] for r in load_config(write(tmp_path, shared)).config.rewards] == [{"k": [1, 2]}] * 2
    with pytest.raises(ConfigError, match=r"loop\.yaml:1: algorithm_options: the value expands to more than"):
        load_config(write(tmp_path, "algorithm_options: &x {again: *x}\n", "loop.yaml"))


def test_a_config_file_over_the_size_limit_is_refused(tmp_path, monkeypatch):
    import vistune.config

    monkeypatch.setattr(vistune.config, "MAX_CONFIG_BYTES", 1024)
    path = write(tmp_path, "model: m\n" + "# padding\n" * 200, "large.yaml")
    with pytest.raises(ConfigError, match=r"large\.yaml: config file is larger than"):
        load_config(path)


def test_values_in_error_messages_are_shortened(tmp_path):
    long_value = "x" * 100_000
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, f"gpu_num: [{long_value}, [[[[[1]]]]]]\nquantization: {long_value}\n"))
    message = str(info.value)
    assert "gpu_num must be an integer, got ['xxx" in message and "quantization must be one of" in message
    assert len(message) < 800
