"""The HTTP serving benchmark (bench/serve_http.py) in its CPU smoke mode, so that it never rots."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"

pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("vistune_llava")


@pytest.mark.slow
def test_smoke_serves_every_installed_system_the_same_prompts(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, str(BENCH / "serve_http.py"), "--smoke", "--work", str(tmp_path / "w"),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    skipped = [row for row in rows if "skipped" in row]
    assert [row["system"] for row in skipped] in ([], ["swift"])  # ms-swift is not installed on every machine
    measured = {(row["system"], row["clients"]): row for row in rows if "skipped" not in row}
    assert set(measured) == {("vistune", 1), ("vistune", 2), ("generate", 1)} | (
        set() if skipped else {("swift", 1), ("swift", 2)}
    )
    for row in measured.values():
        assert row["new_tokens"] == 4 and row["errors"] == 0 and "error" not in row, row
        assert row["requests"] == 8  # max(8, 2 x clients)
        # every request streamed exactly the tokens asked for, one word per chunk
        assert row["out_tokens_min"] == row["out_tokens_max"] == 4
        assert row["tokens_per_chunk"] == 1.0
        assert 0 < row["ttft_p50_s"] <= row["ttft_p95_s"] <= row["wall_s"]
        assert row["ttft_p50_s"] <= row["latency_p50_s"]
        assert 0 <= row["itl_p50_s"] <= row["itl_p95_s"]
        assert row["req_per_s"] == pytest.approx(row["requests"] / row["wall_s"], rel=0.01)
        assert row["out_tok_per_s"] == pytest.approx(4 * row["req_per_s"], rel=0.01)
        # a request cannot finish faster than the cell's wall time allows
        assert row["latency_p50_s"] <= row["wall_s"]
        if row["system"] != "vistune":
            assert "server" not in row
            continue
        # the server's own accounting of the cell, from /metrics: 8 requests, one prefill each at least
        server = row["server"]
        assert 1 <= server["prefills"] <= 8
        assert server["prefill_rows_per_call"] * server["prefills"] == pytest.approx(8, abs=0.01)
        assert server["decode_steps"] >= 3 and 1 <= server["rows_per_step"] <= row["clients"]
        assert server["prefill_s_per_call"] > 0 and server["decode_s_per_step"] > 0
        for key in ("image_s_per_request", "encode_wait_s_per_request", "encode_s_per_request",
                    "queue_wait_s_per_request"):  # fmt: skip
            assert server[key] > 0, key
        # a request's first token came after its wait in the queue, and within the cell
        assert server["queue_wait_s_per_request"] < server["first_token_s_per_request"] < row["wall_s"]
    # the server and the plain transformers script saw the same prompt: tiny Llava's 16 image tokens and the text
    assert measured[("vistune", 1)]["prompt_tokens"] == measured[("generate", 1)]["prompt_tokens"] > 16


def test_only_word_tokens_stay_in_the_output_layer(tmp_path):
    """The benchmark's checkpoint can only emit words: zeroed rows are exactly the others."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file, save_file

    sys.path.insert(0, str(BENCH))
    from serve_http import restrict_output_vocabulary

    weights = {"model.embed.weight": torch.randn(10, 4), "lm_head.weight": torch.randn(10, 4).to(torch.bfloat16)}
    save_file(weights, tmp_path / "model.safetensors", metadata={"format": "pt"})
    assert restrict_output_vocabulary(tmp_path, [1, 4, 9]) == 7
    patched = load_file(tmp_path / "model.safetensors")
    assert torch.equal(patched["model.embed.weight"], weights["model.embed.weight"])
    for row in range(10):
        expected = weights["lm_head.weight"][row] if row in (1, 4, 9) else torch.zeros(4, dtype=torch.bfloat16)
        assert torch.equal(patched["lm_head.weight"][row], expected), row


def test_a_server_that_cannot_start_is_a_row_with_its_log(tmp_path):
    out = tmp_path / "results.json"
    done = subprocess.run([sys.executable, str(BENCH / "serve_http.py"), "--smoke", "--work", str(tmp_path / "w"),
                           "--systems", "vistune", "--vistune-args", "--max_batch_sise 4", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 1, done.stdout[-3000:] + done.stderr[-3000:]
    [row] = json.loads(out.read_text())["rows"]
    assert row["system"] == "vistune" and "exited with code 2 before it was ready" in row["error"]
    assert any("unknown key 'max_batch_sise'" in line for line in row["log_tail"])
