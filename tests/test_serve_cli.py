"""``vistune serve`` from the command line: the reference command's flags, a real process, the hook."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from typing import ClassVar

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("vistune_llava")

from vistune import hookimpl
from vistune.cli import main


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_reference_command_is_accepted_and_awq_refused_clearly_without_a_gpu(tiny_llava, capsys):
    argv = ["serve", "--model_type", "llava", "--model_id_or_path", str(tiny_llava), "--quant_method", "awq",
            "--tensor_parallel_size", "2", "--host", "0.0.0.0", "--port", "8080", "--backend", "transformers"]  # fmt: skip
    assert main([*argv, "--dry-run"]) == 2  # the plan is printed, and says it is not ready
    plan = capsys.readouterr().out
    assert "model_type    llava" in plan and "backend       transformers" in plan
    assert main(argv) == 2
    error = capsys.readouterr().err
    assert "quantization awq needs a CUDA GPU" in error and "--quant_method" in error


def test_serve_process_answers_and_shuts_down_gracefully_on_sigterm(tiny_llava):
    import base64
    import io

    from PIL import Image

    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "VISTUNE_API_KEY": "k"}
    argv = [sys.executable, "-m", "vistune", "serve", "--model_type", "llava", "--model_id_or_path", str(tiny_llava),
            "--tensor_parallel_size", "2", "--host", "127.0.0.1", "--port", str(port), "--backend", "transformers",
            "--served_model_name", "llava-tiny", "--device", "cpu"]  # fmt: skip
    process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, process.communicate()[1]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "the server did not come up"
            time.sleep(0.5)
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), (200, 10, 10)).save(buffer, format="PNG")
        url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
        client = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="k", max_retries=0, timeout=60)
        content = [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": "What colour?"}]
        answer = client.chat.completions.create(
            model="llava-tiny", messages=[{"role": "user", "content": content}], max_tokens=4
        )
        assert answer.model == "llava-tiny" and answer.usage.completion_tokens >= 1
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            _, stderr = process.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
    # uvicorn finishes its graceful shutdown, then re-raises the signal it caught (exit by SIGTERM)
    assert process.returncode in (0, -signal.SIGTERM), stderr
    assert "Application shutdown complete" in stderr
    assert "tensor_parallel_size 2 applies to backends that split a model" in stderr


class AddsARoute:
    """A plugin extending the server through ``vistune_server_started``."""

    seen: ClassVar[list] = []

    @hookimpl
    def vistune_server_started(self, app, config):
        self.seen.append(config.port)

        @app.get("/custom/status")
        def status():
            return {"model": config.served_model_name or config.model}


def test_vistune_server_started_fires_before_serving(tiny_llama, register_plugin, plugin_manager):
    from vistune.config import load_config
    from vistune.inference.backends import create_engine
    from vistune.pipelines.serve import build_app
    from vistune.plan import make_plan
    from vistune.serving.server import ServerThread

    register_plugin(AddsARoute())
    plan = make_plan(load_config(None, ["--model", str(tiny_llama), "--device", "cpu", "--port", "8123"], task="serve"),
                     plugin_manager)  # fmt: skip
    plan.raise_if_not_ready()
    engine = create_engine(plan)
    app = build_app(plan, engine)
    assert AddsARoute.seen == [8123]
    with ServerThread(app) as server:
        assert httpx.get(server.url + "/custom/status").json() == {"model": str(tiny_llama)}
        assert httpx.get(server.url + "/v1/models").json()["data"][0]["id"] == str(tiny_llama)
