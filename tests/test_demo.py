"""``vistune demo``, shortened: the tiny Llava's caption loss on held-out images falls, and most held-out
images get exactly the right caption."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("torch")


@pytest.mark.slow
def test_short_demo_learns(tmp_path, plugin_manager, capsys):
    if "llava" not in plugin_manager.registries.models:
        pytest.skip("the llava plugin is not installed (pip install -e plugins/llava)")
    from vistune.demo import run_demo

    # 300 of the demo's 2000 steps (about 20 s on two cores): 33 of 40 held-out captions were exact
    summary = run_demo(tmp_path, max_steps=300)
    assert summary["eval_loss_start"] > 5  # random weights over a ~1000-token vocabulary
    assert summary["eval_loss_end"] < 1
    assert summary["train_loss_end"] < summary["train_loss_start"]
    assert summary["held_out_total"] == 40
    assert summary["held_out_correct"] > summary["held_out_total"] // 2  # greedy captions, exact match
    assert json.loads((tmp_path / "demo_summary.json").read_text())["steps"] == 300
    assert (tmp_path / "model" / "loss_curve.png").is_file()
    assert (tmp_path / "model" / "vistune_run.json").is_file()
    assert "held-out exact match" in capsys.readouterr().out


def test_shapes_dataset_is_balanced_and_matches_its_spec(tmp_path, plugin_manager):
    from vistune.demo.shapes import COLOURS, SHAPES, SPLITS
    from vistune.testing import check_dataset

    spec = plugin_manager.registries.datasets.get("shapes-captions-eval")
    records = check_dataset(spec)
    assert len(records) == SPLITS["eval"][0]
    captions = [r.messages[-1]["content"] for r in records]
    assert len(set(captions)) == len(COLOURS) * len(SHAPES)  # every class held out
    assert all(captions.count(c) == 2 for c in set(captions))
