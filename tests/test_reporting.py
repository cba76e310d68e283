"""``report_to``: transformers' logger integrations pass through to the Trainer; a missing one is a plan problem."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest
from vistune import reporting
from vistune.cli import main
from vistune.config import load_config
from vistune.plan import make_plan

#: A stand-in for the trackio package: the calls transformers' TrackioCallback makes, recorded.
FAKE_TRACKIO = textwrap.dedent("""\
    __version__ = "0.0.1"
    calls = []


    class _SpaceId:
        def get(self):
            return None


    class context_vars:
        current_space_id = _SpaceId()


    class _Config(dict):
        def update(self, values, allow_val_change=False):
            super().update(values)


    config = _Config()


    def init(**kwargs):
        calls.append(("init", kwargs))


    def log(values):
        calls.append(("log", dict(values)))


    def finish():
        calls.append(("finish", None))
""")


def test_integrations_are_the_ones_transformers_creates_callbacks_for():
    pytest.importorskip("transformers")
    from transformers.integrations.integration_utils import INTEGRATION_TO_CALLBACK

    # tensorboard is written by vistune itself, the rest are handed to the Trainer
    assert set(reporting.INTEGRATIONS) | {"tensorboard"} == set(INTEGRATION_TO_CALLBACK)
    assert reporting.trainer_integrations(["jsonl", "tensorboard"]) == "none"
    assert reporting.trainer_integrations(["jsonl", "wandb", "mlflow"]) == ["wandb", "mlflow"]


def test_unknown_or_missing_loggers_are_plan_problems_before_anything_loads(tiny_llama, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr("vistune.reporting._installed", lambda module: module != "wandb")
    monkeypatch.delenv("KUBEFLOW_TRAINER_SERVER_URL", raising=False)
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_llama}\ndataset: shapes-captions\nreport_to: [jsonl, wandb, wanb, kubeflow]\n")
    plan = make_plan(load_config(str(config), task="sft"), plugin_manager())
    problems = [(p.where, p.message, p.hint) for p in plan.problems if p.field == "report_to"]
    assert problems == [
        (f"{config}:3", "wandb logs through the wandb package(s), which are not installed",
         "pip install wandb, or remove wandb from report_to"),
        (f"{config}:3", "'wanb' is not a metric sink (did you mean 'wandb'?)",
         "use jsonl, tensorboard, none, " + ", ".join(reporting.INTEGRATIONS)),
        (f"{config}:3", "kubeflow logs to the server that KUBEFLOW_TRAINER_SERVER_URL names, and it is not set",
         "export KUBEFLOW_TRAINER_SERVER_URL=URL, or remove kubeflow from report_to"),
    ]  # fmt: skip
    # the run stops there, before the model loads
    monkeypatch.setattr("vistune.loading.load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main(["sft", "--config", str(config), "--report_to", "[jsonl, wandb]"]) == 2
    assert "pip install wandb" in capsys.readouterr().err
    none_with_others = make_plan(load_config(str(config), ["--report_to", "[none, jsonl]"], task="sft"), plugin_manager())
    assert [p.message for p in none_with_others.problems if p.field == "report_to"] == [
        "none turns every sink off, so it cannot be listed with jsonl"]


def plugin_manager():
    from vistune.plugins import get_plugin_manager

    return get_plugin_manager()


def test_an_integration_gets_its_transformers_callback_and_every_log(tiny_llama, tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from transformers.integrations.integration_utils import TrackioCallback
    from vistune.training.metrics import read_metrics

    site = tmp_path / "site"
    site.mkdir()
    (site / "trackio.py").write_text(FAKE_TRACKIO)
    monkeypatch.syspath_prepend(str(site))
    data = tmp_path / "data.jsonl"
    record = {"messages": [{"role": "user", "content": "Describe a red circle."},
                           {"role": "assistant", "content": "a red circle on the left"}]}  # fmt: skip
    data.write_text((json.dumps(record) + "\n") * 4)
    created = []
    from vistune.training import trainer as trainer_module

    original_init = trainer_module.VistuneTrainer.__init__

    def recording_init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        created.extend(type(c).__name__ for c in self.callback_handler.callbacks)

    monkeypatch.setattr(trainer_module.VistuneTrainer, "__init__", recording_init)
    out = tmp_path / "out"
    config = tmp_path / "run.yaml"
    config.write_text(f"model: {tiny_llama}\ndataset: {data}\ndevice: cpu\ndtype: float32\nmax_steps: 3\n"
                      f"output_dir: {out}\nreport_to: [jsonl, trackio]\nlearning_rate: 0.01\n")  # fmt: skip
    try:
        assert main(["sft", "--config", str(config)]) == 0
        calls = sys.modules["trackio"].calls
    finally:
        sys.modules.pop("trackio", None)
    assert TrackioCallback.__name__ in created
    assert [name for name, _ in calls][0] == "init" and calls[-1][0] == "finish"
    logged = {values["train/global_step"]: values for name, values in calls if name == "log" and "train/loss" in values}
    steps = {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}
    assert sorted(logged) == sorted(steps) == [1, 2, 3]
    for step, loss in steps.items():  # the same numbers reach both sinks
        assert logged[step]["train/loss"] == pytest.approx(loss)
