"""The DPO step benchmark (bench/dpo_step.py) in its CPU smoke mode, so that it never rots."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "dpo_step.py"


@pytest.mark.slow
def test_smoke_runs_vistune_and_trl_on_the_same_pairs(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--settings", "A,P", "--work", str(tmp_path / "w"), "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {(row["setting"], row["system"]): row for row in json.loads(out.read_text())["rows"]}
    assert "skipped" in rows["P", "trl"]  # TRL refuses precomputed reference log-probs for vision data
    timed = [rows["A", "vistune"], rows["A", "trl"], rows["P", "vistune"]]
    for row in timed:
        assert row["steps"] == 3 and row["step_s"] > 0 and row["tokens_per_step"] > 0
        # same checkpoint, same pairs, LoRA starting at zero: the policy is its reference, the loss is ln 2
        assert row["first_loss"] == pytest.approx(0.6931, abs=1e-3)
    # both systems put the same pairs through the policy (chosen and rejected, padding excluded), give or take BOS
    tokens = [row["tokens_per_step"] for row in timed]
    assert max(tokens) - min(tokens) <= 0.05 * max(tokens), tokens
