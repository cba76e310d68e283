"""Atomic checkpoints and the resume policy (``resume``, ``overwrite_output_dir``)."""

from __future__ import annotations

import errno
from pathlib import Path
from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from vistune.config import build_config
from vistune.errors import ConfigError
from vistune.training import checkpoints


class Regression(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(4, 1)

    def forward(self, x, labels):
        return {"loss": torch.nn.functional.mse_loss(self.linear(x).squeeze(-1), labels)}


def _trainer(tmp_path, **values):
    from transformers import default_data_collator
    from vistune.training.arguments import training_arguments
    from vistune.training.trainer import VistuneTrainer

    config = build_config({"task": "sft", "output_dir": str(tmp_path), "report_to": [], **values}).config
    gen = torch.Generator().manual_seed(0)
    data = [{"x": torch.randn(4, generator=gen), "labels": torch.randn((), generator=gen)} for _ in range(16)]
    args = training_arguments(config, "cpu", has_eval=False)
    trainer = VistuneTrainer(model=Regression(), args=args, train_dataset=data, data_collator=default_data_collator,
                             vistune_config=config)  # fmt: skip
    return trainer


def _fake_checkpoint(root, step, complete=True):
    path = root / f"checkpoint-{step}"
    path.mkdir(parents=True)
    (path / "trainer_state.json").write_text("{}")
    if complete:
        (path / checkpoints.COMPLETE_MARKER).write_text("")
    return path


def test_checkpoints_are_complete_rotated_and_announced(tmp_path, register_plugin):
    from vistune import hookimpl

    saved = []

    class Listener:
        @hookimpl
        def vistune_checkpoint_saved(self, path, step, config):
            saved.append((path, step, sorted(p.name for p in tmp_path.iterdir())))

    register_plugin(Listener())
    trainer = _trainer(tmp_path, max_steps=6, save_steps=2, save_total_limit=2, per_device_batch_size=4)
    trainer.train()
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path)] == ["checkpoint-4", "checkpoint-6"]
    for path in checkpoints.list_checkpoints(tmp_path):
        names = {p.name for p in path.iterdir()}
        assert {
            "optimizer.pt",
            "scheduler.pt",
            "rng_state.pth",
            "trainer_state.json",
            checkpoints.COMPLETE_MARKER,
        } <= names
    assert [step for _, step, _ in saved] == [2, 4, 6]
    # when a plugin hears of a checkpoint it is already in place, under its final name, with no staging left
    for path, step, listing in saved:
        assert path == str(tmp_path / f"checkpoint-{step}") and f"checkpoint-{step}" in listing
        assert not any(name.startswith(checkpoints.STAGING_PREFIX) for name in listing)


def test_a_crash_while_saving_leaves_no_checkpoint(tmp_path, monkeypatch):
    trainer = _trainer(tmp_path, max_steps=2, save_steps=2)

    def crash(output_dir):
        raise RuntimeError("the RNG state cannot be pickled")

    monkeypatch.setattr(trainer, "_save_rng_state", crash)  # after the weights and optimizer are written
    with pytest.raises(RuntimeError, match="cannot be pickled"):
        trainer.train()
    assert not (tmp_path / "checkpoint-2").exists()
    assert checkpoints.latest_checkpoint(tmp_path) is None
    assert not list(tmp_path.glob(f"{checkpoints.STAGING_PREFIX}*"))  # the failed save cleaned up after itself


def test_stale_staging_directories_are_removed(tmp_path):
    (tmp_path / f"{checkpoints.STAGING_PREFIX}checkpoint-3" / "checkpoint-3").mkdir(parents=True)
    checkpoints.remove_stale_staging(tmp_path)
    assert not list(tmp_path.iterdir())


#: What a full disk raises from torch.save: the OS's ENOSPC, or the zip writer's check of what it wrote.
DISK_FULL = [
    OSError(errno.ENOSPC, "No space left on device"),
    RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 11264 vs 11152"),
]


def fill_disk_at(monkeypatch, step: int, error: BaseException) -> None:
    """Make torch.save write half a file and raise ``error`` from the checkpoint of ``step`` on."""
    real_save = torch.save

    def save(obj, f, *args, **kwargs):
        path = Path(str(f))
        step_of = checkpoints.checkpoint_step(path.parent)
        if step_of is not None and step_of >= step:
            path.write_bytes(b"PK\x03\x04 half a zip")
            raise error
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save)


@pytest.mark.parametrize("error", DISK_FULL, ids=["ENOSPC", "unexpected-pos"])
def test_a_full_disk_while_saving_is_one_line_and_keeps_the_last_checkpoint(tmp_path, monkeypatch, error):
    from vistune.errors import VistuneError

    trainer = _trainer(tmp_path, max_steps=4, save_steps=2, per_device_batch_size=4)
    fill_disk_at(monkeypatch, 4, error)
    with pytest.raises(VistuneError) as info:
        trainer.train()
    message = str(info.value)
    assert message == (f"No space left on device while saving the checkpoint of step 4 to {tmp_path / 'checkpoint-4'}; "
                       "the partial checkpoint was removed")  # fmt: skip
    assert info.value.__cause__ is error
    assert not (tmp_path / "checkpoint-4").exists()
    assert not list(tmp_path.glob(f"{checkpoints.STAGING_PREFIX}*"))  # the half-written files are gone
    assert checkpoints.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert checkpoints.resolve_resume(_config(tmp_path, resume="auto")) == tmp_path / "checkpoint-2"


@pytest.mark.parametrize("error", DISK_FULL, ids=["ENOSPC", "unexpected-pos"])
def test_sft_on_a_full_disk_exits_2_with_one_line(tmp_path, tiny_llama, monkeypatch, capsys, error):
    import json

    import yaml
    from vistune.cli import main

    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}) + "\n")
    output_dir = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"model": str(tiny_llama), "dataset": str(data), "device": "cpu", "max_steps": 2,
                                      "save_steps": 1, "report_to": [], "output_dir": str(output_dir)}))  # fmt: skip
    fill_disk_at(monkeypatch, 2, error)
    assert main(["sft", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.endswith(f"\nerror: No space left on device while saving the checkpoint of step 2 to "
                        f"{output_dir / 'checkpoint-2'}; the partial checkpoint was removed\n")  # fmt: skip
    assert checkpoints.resolve_resume(_config(output_dir, resume="auto")) == output_dir / "checkpoint-1"
    assert not (output_dir / "checkpoint-2").exists() and not (output_dir / "vistune_run.json").exists()


def test_a_full_disk_while_saving_the_final_model_is_one_line(tmp_path, monkeypatch):
    from vistune.errors import VistuneError
    from vistune.models import RUN_FILE
    from vistune.pipelines.sft import save_final

    trainer = _trainer(tmp_path, max_steps=1, save_steps=1000)
    trainer.train()
    (tmp_path / RUN_FILE).write_text("{}")  # an earlier run's: it must not vouch for half-written weights

    def full(output_dir=None, state_dict=None):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "model.safetensors"))

    monkeypatch.setattr(trainer, "_save", full)
    plan = SimpleNamespace(config=trainer.vistune_config, model_type=None, template=None, adapter=None, model_dir=None)
    with pytest.raises(VistuneError, match=rf"^No space left on device while saving the trained model to {tmp_path}; "):
        save_final(trainer, None, plan)
    assert not (tmp_path / RUN_FILE).exists()


def test_commit_replaces_a_leftover_directory(tmp_path):
    old = _fake_checkpoint(tmp_path, 3, complete=False)
    staged = tmp_path / ".staging-checkpoint-3" / "checkpoint-3"
    staged.mkdir(parents=True)
    (staged / "weights").write_text("new")
    checkpoints.commit(staged, old)
    assert (old / "weights").read_text() == "new" and checkpoints.is_complete(old)
    assert not staged.exists()


def test_latest_ignores_incomplete_checkpoints(tmp_path):
    _fake_checkpoint(tmp_path, 5)
    _fake_checkpoint(tmp_path, 10, complete=False)
    (tmp_path / "checkpoint-notanumber").mkdir()
    assert checkpoints.latest_checkpoint(tmp_path) == tmp_path / "checkpoint-5"
    assert [p.name for p in checkpoints.list_checkpoints(tmp_path, complete_only=False)] == [
        "checkpoint-5",
        "checkpoint-10",
    ]


def _config(tmp_path, **values):
    return build_config({"task": "sft", "output_dir": str(tmp_path), **values}).config


def test_resume_none_refuses_an_output_dir_with_checkpoints(tmp_path):
    _fake_checkpoint(tmp_path, 5)
    with pytest.raises(ConfigError, match="already holds checkpoints") as info:
        checkpoints.resolve_resume(_config(tmp_path))
    assert "resume: auto" in info.value.hint and "overwrite_output_dir" in info.value.hint
    assert (tmp_path / "checkpoint-5").is_dir()  # nothing lost


def test_overwrite_output_dir_starts_over(tmp_path):
    _fake_checkpoint(tmp_path, 5)
    _fake_checkpoint(tmp_path, 6, complete=False)
    assert checkpoints.resolve_resume(_config(tmp_path, overwrite_output_dir=True)) is None
    assert not list(tmp_path.glob("checkpoint-*"))


def test_resume_auto_and_explicit(tmp_path):
    assert checkpoints.resolve_resume(_config(tmp_path / "fresh", resume="auto")) is None
    _fake_checkpoint(tmp_path, 5)
    _fake_checkpoint(tmp_path, 7)
    _fake_checkpoint(tmp_path, 9, complete=False)
    assert checkpoints.resolve_resume(_config(tmp_path, resume="auto")) == tmp_path / "checkpoint-7"
    assert (
        checkpoints.resolve_resume(_config(tmp_path, resume=str(tmp_path / "checkpoint-5")))
        == tmp_path / "checkpoint-5"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="not a complete checkpoint"):
        checkpoints.resolve_resume(_config(tmp_path, resume=str(empty)))
    with pytest.raises(ConfigError, match="neither auto, none nor a directory"):
        checkpoints.resolve_resume(_config(tmp_path, resume="latest"))


def test_rotate_keeps_the_newest_complete(tmp_path):
    for step in (1, 2, 3):
        _fake_checkpoint(tmp_path, step)
    _fake_checkpoint(tmp_path, 4, complete=False)
    checkpoints.rotate(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2", "checkpoint-3", "checkpoint-4"]
