"""The GRPO step benchmark (bench/grpo_step.py) in its CPU smoke mode, so that it never rots."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "grpo_step.py"


@pytest.mark.slow
def test_smoke_times_generation_and_training_of_both_settings(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--work", str(tmp_path / "w"), "--out", str(out)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads(out.read_text())
    assert (results["prompts"], results["generations"]) == (2, 2)
    rows = {row["setting"]: row for row in results["rows"]}
    assert set(rows) == {"A", "B"}
    for row in rows.values():
        assert "error" not in row, row
        assert row["system"] == "vistune" and row["steps"] == 3 and row["step_s"] > 0
        # the step timer saw the RL trainer's rollouts: every step generated, and generation is part of the step
        assert len(row["generation_spans_s"]) == 3 and min(row["generation_spans_s"]) > 0
        assert 0 < row["generation_s"] < row["step_s"] and row["train_s"] > 0
        assert row["first_loss"] is not None  # the run logged its loss
        assert row["peak_allocated_gib"] == row["peak_reserved_gib"] == 0.0  # no GPU
        # and the run trained on the policy's own completions: 2 prompts x 2 completions through the forward
        assert row["tokens_per_step"] > 0
