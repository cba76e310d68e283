"""Shared by the core's tests."""

import http.server
import threading

import pytest

#: The configuration users bring from other fine-tuning tools; vistune accepts it as written.
REFERENCE_CONFIG = """\
model: llava-v1.5-7b
task: sft
dataset: llava-instruct-en
quantization: q4_k_m
adapter: lora
lora_target_modules: [q_proj, v_proj]
parallel_method: ddp
gpu_num: 4
"""


@pytest.fixture
def reference_config_text() -> str:
    return REFERENCE_CONFIG


@pytest.fixture(scope="module")
def engine(tiny_llama):
    """The transformers engine on the tiny Llama (CPU), shared by a serve test module's servers."""
    pytest.importorskip("torch")
    from vistune.config import RunConfig
    from vistune.inference.transformers_engine import TransformersEngine
    from vistune.plugins import get_plugin_manager

    engine = TransformersEngine(str(tiny_llama), get_plugin_manager().registries.models.get("causal-lm"),
                                RunConfig(task="serve", device="cpu", max_batch_size=8))  # fmt: skip
    yield engine
    engine.close()


@pytest.fixture
def image_server(tmp_path):
    """A local HTTP server of ``tmp_path/served``, which holds ``remote.png`` (7x7, blue); yields its base URL."""
    from PIL import Image

    (tmp_path / "served").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (7, 7), "blue").save(tmp_path / "served" / "remote.png")

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, directory=str(tmp_path / "served"), **kwargs)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()
