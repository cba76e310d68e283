"""The product-path SFT benchmark (bench/sft_product.py) in its CPU smoke mode, so that it never rots."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "sft_product.py"


@pytest.mark.slow
def test_smoke_runs_every_installed_system_on_the_same_data(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--settings", "A", "--configs", "defaults", "--work", str(tmp_path / "w"),
         "--out", str(out)],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = {row["system"]: row for row in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"vistune", "hf", "trl", "swift"}
    assert "skipped" in rows["swift"] or "tokens_per_s" in rows["swift"]  # ms-swift is not installed on every machine
    timed = [row for row in rows.values() if "tokens_per_s" in row]
    assert {"vistune", "hf", "trl"} <= {row["system"] for row in timed}
    for row in timed:
        assert row["steps"] == 3 and row["tokens_per_s"] > 0 and row["tokens_per_step"] > 0
    # the same checkpoint and records: the systems start from the same loss (random weights: ~ln(vocab))
    losses = [row["first_loss"] for row in timed]
    assert max(losses) - min(losses) <= 0.02 * max(losses), losses
    # every system saw the same batches' worth of tokens (padding excluded), within the templates' few tokens
    tokens = [row["tokens_per_step"] for row in timed]
    assert max(tokens) - min(tokens) <= 0.05 * max(tokens), tokens
