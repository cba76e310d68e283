"""bench/transformers_cb.py: the findings behind bench/results/serve_engine_choice.md still hold.

Checked against transformers ``generate`` with the pixels: a transformers upgrade that
lets the continuous-batching manager take images or 3-D positions turns one of these red.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "transformers_cb.py"

pytest.importorskip("torch")
pytest.importorskip("vistune_llava")
pytest.importorskip("vistune_qwen_vl")


@pytest.mark.slow
def test_manager_serves_text_and_llava_through_the_embedding_but_not_pixels_or_mrope(tmp_path):
    out = tmp_path / "cb.json"
    done = subprocess.run([sys.executable, str(BENCH), "--requests", "4", "--new-tokens", "8", "--repeats", "1",
                           "--out", str(out)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(out.read_text())
    assert all(report["text_equal"])
    assert report["timing"]["generate_batch_equal"] == report["timing"]["vistune_equal"] == "4/4"
    assert report["streaming"]["events"] == 12
    llava = report["llava"]
    assert llava["images_change_generate"] and llava["ids_only_distinct_outputs"] == 1  # the pixels never reach it
    assert not any(llava["ids_only_equal"])
    for kind in ("llava", "llava_next"):
        assert all(report[kind]["feature_table_equal"]) and all(report[kind]["feature_table_chunked_prefill_equal"])
        assert report[kind]["feature_table_max_logprob_diff"] < 1e-4
    assert report["qwen2_vl"]["feature_table_max_logprob_diff"] > 1e-3  # 1-D positions for M-RoPE image tokens
