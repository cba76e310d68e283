"""Output directories that cannot be written: found by the plan, or by a probe before the model loads, in one line."""

from __future__ import annotations

import errno
import json
import os
import types

import pytest
from vistune import outputs
from vistune.cli import main
from vistune.errors import VistuneError


@pytest.fixture
def text_run(tmp_path, tiny_llama):
    """``config(task, **values)`` -> path of a config for a ready run on the tiny Llama and a one-record dataset."""
    import yaml

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")

    def config(task, **values):
        path = tmp_path / f"{task}.yaml"
        values = {"model": str(tiny_llama), "dataset": str(data), "device": "cpu", "max_steps": 1, "report_to": [],
                  **values}  # fmt: skip
        if task == "rl":
            values.setdefault("rewards", ["bleu"])
        if task == "infer":
            values = {k: v for k, v in values.items() if k not in ("max_steps", "report_to")}
        path.write_text(yaml.safe_dump(values))
        return str(path)

    return config


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fails the test if a model is loaded: the refusal must come first."""
    from vistune import loading

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(loading, "load_model", refuse)


def where(config: str, key: str) -> str:
    """``file:line`` of a top-level key, as errors name it."""
    with open(config) as file:
        line = next(i for i, text in enumerate(file, 1) if text.startswith(f"{key}:"))
    return f"{config}:{line}"


def error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


@pytest.mark.parametrize("task", ["sft", "rl", "infer"])
def test_output_dir_under_a_regular_file_is_refused_by_the_plan(task, tmp_path, text_run, capsys, no_model_loading):
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a directory")
    config = text_run(task, output_dir=str(blocker / "run"))
    assert main([task, "--config", config, "--dry-run"]) == 2
    problem = f"{where(config, 'output_dir')}: output_dir: {blocker} is a file, so {blocker / 'run'} cannot be created under it"
    assert problem in capsys.readouterr().out
    assert main([task, "--config", config]) == 2
    assert problem in error_line(capsys)


def test_output_file_and_export_dir_are_checked_too(tmp_path, text_run, capsys):
    blocker = tmp_path / "results.txt"
    blocker.write_text("not a directory")
    assert main(["infer", "--config", text_run("infer", output_file=str(blocker / "preds.jsonl")), "--dry-run"]) == 2
    assert f"output_file: {blocker} is a file, not a directory" in capsys.readouterr().out
    assert main(["export", "--config", text_run("export", export_dir=str(blocker / "merged")), "--dry-run"]) == 2
    assert f"export_dir: {blocker} is a file, not a directory" in capsys.readouterr().out


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into any directory, whatever its permissions")
def test_an_output_dir_without_write_permission_is_refused(tmp_path, text_run, capsys, no_model_loading):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        config = text_run("sft", output_dir=str(locked / "run"))
        assert main(["sft", "--config", config]) == 2
        assert f"output_dir: {locked} is not writable (permission denied), so {locked / 'run'} cannot be created" in (
            error_line(capsys)
        )
        with pytest.raises(VistuneError, match=rf"^here: cannot write to {locked}: Permission denied$"):
            outputs.prepare_output_dir(locked, "here")
    finally:
        locked.chmod(0o700)


def test_a_read_only_file_system_is_named_by_the_plan(tmp_path, text_run, capsys, monkeypatch):
    monkeypatch.setattr(outputs.os, "access", lambda path, mode: False)
    monkeypatch.setattr(outputs.os, "statvfs", lambda path: types.SimpleNamespace(f_flag=os.ST_RDONLY))
    assert main(["sft", "--config", text_run("sft", output_dir=str(tmp_path / "run")), "--dry-run"]) == 2
    assert f"output_dir: {tmp_path} is on a read-only file system, so {tmp_path / 'run'} cannot be created" in (
        capsys.readouterr().out
    )


@pytest.mark.parametrize("task", ["sft", "rl", "infer"])
@pytest.mark.parametrize(
    "failure, reason",
    [(errno.EROFS, "Read-only file system"), (errno.EACCES, "Permission denied"), (errno.ENOSPC, "No space left on device")],
)  # fmt: skip
def test_the_pipelines_probe_output_dir_before_loading(task, failure, reason, tmp_path, text_run, capsys, monkeypatch,
                                                       no_model_loading):  # fmt: skip
    # what the plan cannot see without writing (a read-only mount, an ACL, a full disk) the probe file finds
    def refuse(dir=None, prefix=None, **kwargs):
        raise OSError(failure, os.strerror(failure), os.path.join(dir, prefix + "x"))

    monkeypatch.setattr(outputs.tempfile, "mkstemp", refuse)
    run_dir = tmp_path / "run"
    config = text_run(task, output_dir=str(run_dir))
    assert main([task, "--config", config]) == 2
    assert error_line(capsys) == f"error: {where(config, 'output_dir')}: output_dir: cannot write to {run_dir}: {reason}\n"


def test_a_writable_output_dir_is_created_and_left_clean(tmp_path):
    run_dir = tmp_path / "a" / "b"
    assert outputs.unwritable_reason(run_dir) is None
    assert outputs.prepare_output_dir(run_dir) == run_dir
    assert run_dir.is_dir() and not list(run_dir.iterdir())


@pytest.mark.parametrize(
    "error",
    [OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EDQUOT, "Disk quota exceeded"),
     RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 11264 vs 11152"),
     RuntimeError("Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })")],
)  # fmt: skip
def test_disk_full_errors_are_recognised(error):
    assert outputs.is_disk_full(error)
    wrapped = RuntimeError("saving failed")
    wrapped.__cause__ = error
    assert outputs.is_disk_full(wrapped)
    message = str(outputs.disk_full_error(error, "/out/checkpoint-4", "the checkpoint of step 4"))
    assert message == "No space left on device while saving the checkpoint of step 4 to /out/checkpoint-4"
    assert outputs.disk_full_error(ValueError("bad value"), "/out", "x") is None
