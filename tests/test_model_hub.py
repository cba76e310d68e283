"""Checkpoints named by Hub id are downloaded through huggingface_hub when the run starts, never while planning.

A local HTTP server stands in for the Hub (``HF_ENDPOINT``), serving the routes that
``snapshot_download`` calls: repo info, the file tree, and each file's ``resolve`` URL.
vistune runs as users run it, in its own process, so huggingface_hub reads the Hub's
environment variables (endpoint, cache, offline mode) as it does for them.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = "vistune-test/tiny-llama"
GATED = "vistune-test/gated"
SHA = "0123456789abcdef0123456789abcdef01234567"


class FakeHub(BaseHTTPRequestHandler):
    """The Hub API routes of a snapshot download, for the repos in ``self.server.repos``."""

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command == "GET":
            self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        self.server.requests.append(f"{self.command} {self.path}")
        parts = self.path.split("?")[0].strip("/").split("/")
        api = parts[0] == "api"
        repo = "/".join(parts[2:4] if api else parts[0:2])
        if repo == GATED:
            return self._send(403, b'{"error": "gated"}', {"X-Error-Code": "GatedRepo"})
        files = self.server.repos.get(repo)
        if files is None:
            return self._send(404, b'{"error": "Repository not found"}', {"X-Error-Code": "RepoNotFound"})
        if api and parts[4] == "revision":
            info = {"id": repo, "sha": SHA, "siblings": [{"rfilename": name} for name in files]}
            return self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})
        if api and parts[4] == "tree":
            tree = [{"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
                    for name, data in files.items()]  # fmt: skip
            return self._send(200, json.dumps(tree).encode(), {"Content-Type": "application/json"})
        data = files.get("/".join(parts[4:]))  # owner/name/resolve/<revision>/<path>
        if parts[2] != "resolve" or data is None:
            return self._send(404, b"", {"X-Error-Code": "EntryNotFound"})
        self._send(200, data, {"X-Repo-Commit": SHA, "ETag": f'"{hashlib.sha1(data).hexdigest()}"'})

    do_HEAD = do_GET

    def log_message(self, *args) -> None:
        pass


@pytest.fixture(scope="module")
def hub(tiny_llama):
    server = ThreadingHTTPServer(("127.0.0.1", 0), FakeHub)
    server.requests = []
    server.repos = {REPO: {str(p.relative_to(tiny_llama)): p.read_bytes() for p in sorted(tiny_llama.rglob("*")) if p.is_file()}}
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server
    server.shutdown()


def vistune(tmp_path, hub, *args, offline: bool = False):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_", "VISTUNE_MODEL"))}
    env.update(HF_ENDPOINT=f"http://127.0.0.1:{hub.server_address[1]}", HF_HOME=str(tmp_path / "hf-home"),
               HF_HUB_DISABLE_TELEMETRY="1", HF_HUB_OFFLINE="1" if offline else "0")  # fmt: skip
    return subprocess.run([sys.executable, "-m", "vistune", *args], env=env, capture_output=True, text=True, timeout=300)


def snapshots(tmp_path: Path, repo: str = REPO) -> list[Path]:
    return sorted((tmp_path / "hf-home" / "hub" / f"models--{repo.replace('/', '--')}" / "snapshots").glob("*/config.json"))


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps({"messages": [{"role": "user", "content": "Describe a red circle."}]}) + "\n")
    return str(path)


def test_dry_run_says_it_will_download_and_downloads_nothing(hub, tmp_path, data):
    hub.requests.clear()
    result = vistune(tmp_path, hub, "infer", "--model", REPO, "--dataset", data, "--dry-run")
    assert result.returncode == 0, result.stdout + result.stderr
    endpoint = f"http://127.0.0.1:{hub.server_address[1]}"
    assert f"not in the cache: will download {REPO} from the hub ({endpoint}) into {tmp_path / 'hf-home' / 'hub'}" in result.stdout
    assert "model_type  read from its config.json after the download" in result.stdout
    assert hub.requests == [] and snapshots(tmp_path) == []


def test_run_downloads_with_a_progress_bar_then_uses_the_cache_offline(hub, tmp_path, data):
    out = tmp_path / "predictions.jsonl"
    args = ("infer", "--model", REPO, "--dataset", data, "--device", "cpu", "--max_new_tokens", "2", "--output_file", str(out))
    result = vistune(tmp_path, hub, *args)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"downloading {REPO} from the Hugging Face Hub" in result.stdout
    assert "Fetching" in result.stderr  # huggingface_hub's own progress bar
    (config,) = snapshots(tmp_path)
    assert config.parent.name == SHA and config.read_bytes() == hub.repos[REPO]["config.json"]
    assert len(out.read_text().splitlines()) == 1
    # offline, the snapshot in the cache is the model: no request, and the plan says where it is
    hub.requests.clear()
    again = vistune(tmp_path, hub, "infer", "--model", REPO, "--dataset", data, "--dry-run", offline=True)
    assert again.returncode == 0, again.stdout + again.stderr
    assert f"{REPO} -> {config.parent}  (Hugging Face cache" in again.stdout and "causal-lm" in again.stdout
    assert hub.requests == []


def test_offline_without_a_copy_names_hf_download(hub, tmp_path, data):
    result = vistune(tmp_path, hub, "infer", "--model", "vistune-test/elsewhere", "--dataset", data, "--dry-run", offline=True)
    assert result.returncode == 2
    assert "'vistune-test/elsewhere' is a Hugging Face repo id, which is not on this machine" in result.stdout
    assert "HF_HUB_OFFLINE is set" in result.stdout
    assert "hf download vistune-test/elsewhere --local-dir DIR" in result.stdout and "huggingface-cli" not in result.stdout


@pytest.mark.parametrize(("repo", "message"), [
    ("vistune-test/missing", "vistune-test/missing is not a repository on the Hugging Face Hub"),
    (GATED, f"{GATED} is a gated repository: accept its terms on its Hub page, then log in"),
])  # fmt: skip
def test_missing_or_gated_repo_is_a_clear_error(hub, tmp_path, data, repo, message):
    result = vistune(tmp_path, hub, "infer", "--model", repo, "--dataset", data, "--device", "cpu")
    assert result.returncode == 2, result.stdout + result.stderr
    assert f"error: {message}" in result.stderr
    assert f"hf download {repo} --local-dir DIR" in result.stderr
    assert "Traceback" not in result.stderr and snapshots(tmp_path, repo) == []
