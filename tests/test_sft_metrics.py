"""The metrics callback: metrics.jsonl records, TensorBoard events, the loss curve, resume trimming."""

from __future__ import annotations

import json
import types

import pytest

pytest.importorskip("transformers")

from transformers import TrainerControl, TrainerState
from vistune.training.metrics import LOSS_CURVE_FILE, METRICS_FILE, MetricsCallback, read_metrics


def _args(rank=0):
    return types.SimpleNamespace(process_index=rank)


def _run(callback, state, logs_by_step, rank=0):
    args, control = _args(rank), TrainerControl()
    callback.on_train_begin(args, state, control)
    for step, logs in logs_by_step:
        state.global_step = step
        state.num_input_tokens_seen += 100
        state.epoch = step / 10
        callback.on_step_end(args, state, control)
        callback.on_log(args, state, control, logs=dict(logs))
    callback.on_train_end(args, state, control)


def test_records_sinks_and_curve(tmp_path):
    state = TrainerState(max_steps=3)
    logs = [(s, {"loss": 3.0 - s, "learning_rate": 1e-4, "grad_norm": 0.5, "train_runtime": 1.0}) for s in (1, 2, 3)]
    logs.append((3, {"eval_loss": 1.5, "reward/bleu": 0.25}))
    _run(MetricsCallback(tmp_path, ["jsonl", "tensorboard"], progress=False), state, logs)
    records = read_metrics(tmp_path / METRICS_FILE)
    assert [r["step"] for r in records] == [1, 2, 3, 3]
    first = records[0]
    assert {"step", "epoch", "loss", "lr", "grad_norm", "tokens", "tokens_per_s"} <= set(first)
    assert first["lr"] == 1e-4 and first["tokens"] == 100 and first["tokens_per_s"] > 0
    assert "train_runtime" not in first  # a running average, not this step's
    assert records[-1]["eval_loss"] == 1.5 and records[-1]["reward/bleu"] == 0.25  # extra keys are kept
    assert (tmp_path / LOSS_CURVE_FILE).read_bytes().startswith(b"\x89PNG")
    events = list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert events and events[0].stat().st_size > 0


def test_resume_drops_records_of_steps_trained_again(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)))
    state = TrainerState(max_steps=6, global_step=2)  # resumed from checkpoint-2
    _run(MetricsCallback(tmp_path, ["jsonl"], progress=False), state, [(3, {"loss": 0.5}), (4, {"loss": 0.4})])
    assert [(r["step"], r["loss"]) for r in read_metrics(path)] == [(1, 1.0), (2, 1.0), (3, 0.5), (4, 0.4)]


def test_other_ranks_write_their_own_file(tmp_path):
    state = TrainerState(max_steps=1)
    state.is_world_process_zero = False
    _run(MetricsCallback(tmp_path, ["jsonl", "tensorboard"], progress=False), state, [(1, {"loss": 2.0})], rank=1)
    assert not (tmp_path / METRICS_FILE).exists() and not (tmp_path / "tensorboard").exists()
    assert read_metrics(tmp_path / "metrics.rank1.jsonl")[0]["loss"] == 2.0
