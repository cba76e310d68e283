"""Images through the OpenAI-compatible server (tiny Llava): data URLs, and the media policy.

Answers with an image are checked against plain ``transformers`` greedy generation of
the same prompt and image.  Local files are readable only inside
``allowed_local_media_path``; remote URLs only with ``allow_remote_images``.
"""

from __future__ import annotations

import base64
import http.server
import io
import os
import threading

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("vistune_llava")

from PIL import Image
from vistune.config import RunConfig
from vistune.inference.transformers_engine import TransformersEngine
from vistune.serving.app import create_app
from vistune.serving.server import ServerThread

MODEL = "tiny-llava"
MAX_PIXELS = 200 * 200


def png(width=32, height=32, colour=(255, 0, 0)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def data_url(data: bytes, kind: str = "png") -> str:
    return f"data:image/{kind};base64," + base64.b64encode(data).decode()


def image_message(url: str, text: str = "Describe the image.") -> list[dict]:
    return [
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": text}]}
    ]


@pytest.fixture(scope="module")
def media_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("media")
    allowed = root / "allowed"
    allowed.mkdir()
    (allowed / "red.png").write_bytes(png())
    (root / "secret.png").write_bytes(png(colour=(0, 255, 0)))
    os.symlink(root / "secret.png", allowed / "link-out.png")
    return root


@pytest.fixture(scope="module")
def server(tiny_llava, media_dir):
    from vistune.plugins import get_plugin_manager

    config = RunConfig(task="serve", device="cpu", max_new_tokens=12, max_image_pixels=MAX_PIXELS,
                       allowed_local_media_path=str(media_dir / "allowed"))  # fmt: skip
    engine = TransformersEngine(str(tiny_llava), get_plugin_manager().registries.models.get("llava"), config)
    thread = ServerThread(create_app(engine, config, model_name=MODEL)).start()
    yield thread
    thread.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def transformers_answer(tiny_llava, image, text: str, max_new_tokens: int) -> str:
    """The processor's own chat template and ``generate``: the reference answer."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    processor = AutoProcessor.from_pretrained(tiny_llava)
    model = AutoModelForImageTextToText.from_pretrained(tiny_llava).eval()
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": text}]}]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=[image], text=prompt, return_tensors="pt")
    with torch.inference_mode():
        out = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    eos = set(eos if isinstance(eos, list) else [eos])
    new = new[: next((i for i, t in enumerate(new) if t in eos), len(new))]
    return processor.tokenizer.decode(new, skip_special_tokens=True)


def test_image_data_url_answer_equals_transformers(client, tiny_llava):
    image = Image.open(io.BytesIO(png(48, 40, (10, 200, 30)))).convert("RGB")
    expected = transformers_answer(tiny_llava, image, "Describe the image.", 10)
    answer = client.chat.completions.create(model=MODEL, messages=image_message(data_url(png(48, 40, (10, 200, 30)))),
                                            max_tokens=10, temperature=0)  # fmt: skip
    assert answer.choices[0].message.content == expected
    assert answer.usage.prompt_tokens > 16  # the image's 16 tokens are counted
    stream = client.chat.completions.create(model=MODEL, messages=image_message(data_url(png(48, 40, (10, 200, 30)))),
                                            max_tokens=10, temperature=0, stream=True)  # fmt: skip
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == expected


def test_jpeg_and_plain_string_image_url(client):
    buffer = io.BytesIO()
    Image.new("RGB", (20, 30), (1, 2, 3)).save(buffer, format="JPEG")
    content = [{"type": "image_url", "image_url": data_url(buffer.getvalue(), "jpeg")}, {"type": "text", "text": "hi"}]
    answer = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=3)
    assert answer.choices[0].finish_reason in ("length", "stop")


def test_local_file_inside_the_allowed_directory(client, media_dir, tiny_llava):
    expected = client.chat.completions.create(
        model=MODEL, messages=image_message(data_url(png())), max_tokens=6, temperature=0
    )
    for url in (f"file://{media_dir / 'allowed' / 'red.png'}", str(media_dir / "allowed" / "red.png"), "red.png"):
        answer = client.chat.completions.create(model=MODEL, messages=image_message(url), max_tokens=6, temperature=0)
        assert answer.choices[0].message.content == expected.choices[0].message.content


@pytest.mark.parametrize(
    "url",
    [
        "file:///etc/passwd",
        "/etc/hostname",
        "{root}/secret.png",
        "file://{root}/allowed/../secret.png",
        "{root}/allowed/../secret.png",
        "../secret.png",
        "link-out.png",  # a symbolic link inside the directory pointing out of it
    ],
)
def test_local_files_outside_the_allowed_directory_are_refused(client, media_dir, url):
    url = url.format(root=media_dir)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=image_message(url), max_tokens=2)
    assert info.value.body["code"] == "local_media_not_allowed"


def test_local_files_are_refused_when_no_directory_is_allowed():
    import asyncio

    from vistune.serving.errors import APIError
    from vistune.serving.media import MediaPolicy, load_image

    with pytest.raises(APIError) as info:
        asyncio.run(load_image("file:///etc/passwd", MediaPolicy()))
    assert info.value.code == "local_media_not_allowed"


@pytest.mark.parametrize(
    "url, code",
    [
        ("data:image/png;base64,@@@not-base64@@@", "invalid_base64"),
        ("data:image/png;base64," + base64.b64encode(b"certainly not an image").decode(), "invalid_image"),
        ("data:image/png;base64," + base64.b64encode(png()[:40]).decode(), "invalid_image"),  # truncated
        ("data:image/png," + "abc", "invalid_image_url"),
        ("data:image/png;base64", "invalid_image_url"),
        ("ftp://example.org/a.png", "invalid_image_url"),
        ("https://example.org/cat.png", "remote_media_not_allowed"),
        ("http://127.0.0.1:9/cat.png", "remote_media_not_allowed"),
    ],
)
def test_bad_images_are_400(client, url, code):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=image_message(url), max_tokens=2)
    assert info.value.body["code"] == code
    assert info.value.body["param"].startswith("messages.0.content.0")


def test_oversized_image_is_refused_before_decoding(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=image_message(data_url(png(300, 300))), max_tokens=2)
    assert info.value.body["code"] == "image_too_large"
    assert str(MAX_PIXELS) in info.value.body["message"]


def test_too_many_images_are_refused_before_decoding(client):
    from vistune.serving.app import MAX_IMAGES

    content = [{"type": "image_url", "image_url": {"url": data_url(png())}} for _ in range(MAX_IMAGES + 1)]
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": content}], max_tokens=2)
    assert info.value.body["code"] == "too_many_images"


def test_image_tags_typed_into_text_do_not_match_images(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "<image> what is it?"}], max_tokens=2
        )
    assert "image" in info.value.body["message"]


def test_still_serving_after_refusals(client):
    answer = client.chat.completions.create(model=MODEL, messages=image_message(data_url(png())), max_tokens=2)
    assert answer.usage.completion_tokens >= 1


def test_remote_images_are_fetched_only_when_allowed():
    """``allow_remote_images`` fetches http(s) images, size-checked.

    The image server is on 127.0.0.1, which servers never fetch from: ``allow_private_hosts``
    lets this test through (the address checks are tested in test_serve_hardening.py).
    """
    import asyncio

    from vistune.serving.errors import APIError
    from vistune.serving.media import MediaPolicy, load_image

    body = png(24, 24, (0, 0, 255))

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            if self.path == "/blue.png":
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
            else:
                self.send_error(404)

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{httpd.server_address[1]}"
    policy = MediaPolicy(allow_remote=True, allow_private_hosts=True)
    try:
        image = asyncio.run(load_image(base + "/blue.png", policy))
        assert image.size == (24, 24) and image.getpixel((3, 3)) == (0, 0, 255)
        with pytest.raises(APIError) as missing:
            asyncio.run(load_image(base + "/missing.png", policy))
        assert missing.value.code == "image_fetch_failed"
        with pytest.raises(APIError) as large:
            asyncio.run(load_image(base + "/blue.png", MediaPolicy(allow_remote=True, allow_private_hosts=True,
                                                                    max_bytes=10)))  # fmt: skip
        assert large.value.code == "image_too_large"
        with pytest.raises(APIError) as refused:
            asyncio.run(load_image(base + "/blue.png", MediaPolicy(allow_remote=False)))
        assert refused.value.code == "remote_media_not_allowed"
    finally:
        httpd.shutdown()
