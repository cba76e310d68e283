"""The vistune command: fast answers without the model libraries, JSON listings, exit codes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import vistune
from vistune.cli import LIST_KINDS, main

HEAVY = ("torch", "transformers", "peft", "trl", "PIL", "vllm", "accelerate", "datasets")

# Runs each command line in one fresh interpreter, as the console script does, and records which
# heavy modules are imported after each.
IMPORT_PROBE = textwrap.dedent("""
    import contextlib, io, json, sys
    from vistune.cli import main
    heavy, report = json.loads(sys.argv[1]), []
    for argv in json.loads(sys.argv[2]):
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
            try:
                code = main(argv)
            except SystemExit as exit:
                code = exit.code
        report.append([argv, code, sorted(m for m in heavy if m in sys.modules)])
    print(json.dumps(report))
""")


def clean_env(**extra) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VISTUNE_")}
    env.update(extra)
    return env


def test_help_version_plugins_list_and_dry_run_import_no_model_library(tmp_path, reference_config_text):
    config = tmp_path / "reference.yaml"
    config.write_text(reference_config_text)
    other_tasks = tmp_path / "any-task.yaml"
    other_tasks.write_text(reference_config_text.replace("task: sft\n", "rewards: [some-reward]\n"))
    answers = [["--help"], ["--version"], ["plugins"], ["plugins", "--json"], ["sft", "--help"],
               *(["list", kind, "--json"] for kind in LIST_KINDS), ["list", "models"]]  # fmt: skip
    # the reference model and dataset are not on this machine: the plans are printed, and not ready
    dry_runs = [["sft", "--config", str(config), "--dry-run"],
                *([task, "--config", str(other_tasks), "--dry-run"] for task in ("rl", "infer", "serve", "export"))]  # fmt: skip
    commands = answers + dry_runs
    result = subprocess.run([sys.executable, "-c", IMPORT_PROBE, json.dumps(HEAVY), json.dumps(commands)],
                            capture_output=True, text=True, env=clean_env(), timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert [code for _, code, _ in report] == [0] * len(answers) + [2] * len(dry_runs), report
    imported = {" ".join(argv): modules for argv, _, modules in report if modules}
    assert not imported, f"heavy modules imported: {imported}"


def test_version_and_help(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["--version"])
    assert exit.value.code == 0
    assert capsys.readouterr().out.strip() == f"vistune {vistune.__version__} (hook API {vistune.HOOK_API_VERSION})"
    assert main([]) == 0
    out = capsys.readouterr().out
    for command in ("plugins", "list", "sft", "rl", "infer", "serve", "export"):
        assert command in out


def test_task_help_lists_every_config_key_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["sft", "--help"])
    out = capsys.readouterr().out
    assert "--dry-run" in out
    assert "learning_rate: peak learning rate (default 0.0001)" in out
    assert "quantization [none|nf4|fp4|int8|q4_k_m|q8_0|awq|gptq|fp8]" in out
    assert "Factory(" not in out


def test_plugins_json_has_one_entry_per_plugin_with_what_it_registered(capsys):
    assert main(["plugins", "--json"]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert len({(e["name"], e["distribution"]) for e in entries}) == len(entries)
    for entry in entries:
        assert {"name", "distribution", "version", "hooks", "registered"} <= set(entry)
        assert all(isinstance(names, list) for names in entry["registered"].values())
    core = {e["name"]: e for e in entries if e["distribution"] == "vistune"}
    assert core["adapters"]["registered"]["adapters"] == ["dora", "full", "galore", "lora", "qlora"]
    assert core["adapters"]["version"] == vistune.__version__
    assert core["causal-lm"]["hooks"] == ["vistune_register_models", "vistune_register_templates"]
    assert core["causal-lm"]["registered"] == {"models": ["causal-lm"], "templates": ["chat-template"]}


@pytest.mark.parametrize("kind", LIST_KINDS)
def test_list_kind_json(kind, capsys, plugin_manager):
    assert main(["list", kind, "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    registries = plugin_manager.registries
    expected = registries.models.names() + registries.checkpoints.names() if kind == "models" else \
        registries.by_kind[kind].names()  # fmt: skip
    assert [row["name"] for row in rows] == expected
    for row in rows:
        assert {"kind", "name", "description", "plugin", "distribution"} <= set(row)
    core = {"models": "causal-lm", "templates": "chat-template", "adapters": "lora", "backends": "transformers",
            "datasets": "shapes-captions"}  # fmt: skip
    if kind in core:
        (row,) = [r for r in rows if r["name"] == core[kind]]
        assert row["distribution"] == "vistune"
    if kind == "datasets":
        (row,) = [r for r in rows if r["name"] == "shapes-captions"]
        assert row["generated"] is True and row["env_var"] == "VISTUNE_DATASET_SHAPES_CAPTIONS"


def test_list_rejects_unknown_kinds(capsys):
    with pytest.raises(SystemExit) as exit:
        main(["list", "widgets"])
    assert exit.value.code == 2
    assert "invalid choice: 'widgets'" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("config", "args", "expected"),
    [
        ("model: m\nlora_target_module: [q_proj]\n", [], r"run\.yaml:2: unknown key 'lora_target_module' "
                                                         r"\(did you mean lora_target_modules\?\)"),
        ("model: m\ngpu_num: four\n", [], r"run\.yaml:2: gpu_num must be an integer"),
        ("model: m\n", ["--packing", "sometimes"], r"command line --packing: packing must be true or false"),
        ("task: rl\n", [], r"task is 'rl' but the command is `vistune sft`"),
        ("model: m\n", ["stray"], r"unexpected command-line argument 'stray'"),
    ],
)  # fmt: skip
def test_user_errors_exit_2_with_an_error_line(tmp_path, capsys, config, args, expected):
    path = tmp_path / "run.yaml"
    path.write_text(config)
    assert main(["sft", "--config", str(path), *args, "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ")
    assert __import__("re").search(expected, err), err


def test_user_errors_print_no_traceback(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: m\nlearning_rat: 1\n")
    result = subprocess.run([sys.executable, "-m", "vistune", "sft", "--config", str(path), "--dry-run"],
                            capture_output=True, text=True, env=clean_env(), timeout=120)  # fmt: skip
    assert result.returncode == 2
    assert result.stderr == f"error: {path}:2: unknown key 'learning_rat' (did you mean learning_rate?)\n"
    missing = subprocess.run([sys.executable, "-m", "vistune", "infer", "--config", str(tmp_path / "nope.yaml")],
                             capture_output=True, text=True, env=clean_env(), timeout=120)  # fmt: skip
    assert missing.returncode == 2 and missing.stderr.startswith("error: config file ") and "Traceback" not in missing.stderr


def test_a_run_that_cannot_start_lists_every_problem_and_exits_2(tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("model: nowhere\nadapter: lroa\n")
    assert main(["sft", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the run cannot start:")
    assert "model: 'nowhere' is neither a local directory nor a registered alias" in err
    assert "adapter: unknown adapters 'lroa'" in err and "needs a dataset" in err
    assert "hint: `vistune sft --config ... --dry-run` shows the whole plan" in err


def test_dry_run_exit_status_says_whether_the_run_could_start(tmp_path, tiny_llama):
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")
    ready = tmp_path / "ready.yaml"
    ready.write_text(f"model: {tiny_llama}\ndataset: {data}\ndevice: cpu\noutput_dir: {tmp_path / 'out'}\n")
    missing = tmp_path / "missing.yaml"
    missing.write_text(f"model: {tmp_path / 'no-such-model'}\ndataset: {data}\ndevice: cpu\n")

    def dry_run(config):
        return subprocess.run([sys.executable, "-m", "vistune", "sft", "--config", str(config), "--dry-run"],
                              capture_output=True, text=True, env=clean_env(), timeout=120)  # fmt: skip

    result = dry_run(ready)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.rstrip().endswith("\nready")
    result = dry_run(missing)
    assert result.returncode == 2, result.stdout + result.stderr
    assert "not ready: 1 problem(s)" in result.stdout
    assert f"{missing}:1: model: '{tmp_path / 'no-such-model'}' is neither a local directory" in result.stdout
    assert "Traceback" not in result.stderr
