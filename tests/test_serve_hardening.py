"""Hostile requests: each is answered 4xx at once, without holding memory or admission places.

Deeply nested JSON, lone surrogates, prompts of megabytes, images of one pixel's height,
clients that stall in the middle of a body, and remote image URLs that lead into the
server's own network.  Requests go through the real application on uvicorn servers on
127.0.0.1 (tiny Llama); image servers here listen on 127.0.0.1 and 127.0.0.2.
"""

from __future__ import annotations

import asyncio
import base64
import http.client
import http.server
import io
import json
import socket
import threading
import time

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from PIL import Image
from vistune.config import RunConfig
from vistune.serving import remote, schemas
from vistune.serving.app import MAX_CHARS_PER_TOKEN, create_app
from vistune.serving.errors import APIError
from vistune.serving.media import MAX_ASPECT_RATIO, MediaPolicy, decode_image, load_image
from vistune.serving.server import ServerThread

MODEL = "tiny"
MESSAGES = [{"role": "user", "content": "Describe a red circle."}]
#: Seconds a refusal may take; generous for a busy machine, far below what the refused work takes.
QUICK_S = 1.0


def start(engine, **config) -> ServerThread:
    config = RunConfig(task="serve", device="cpu", max_new_tokens=2, **config)
    return ServerThread(create_app(engine, config, model_name=MODEL, owns_engine=False)).start()


@pytest.fixture(scope="module")
def server(engine):
    thread = start(engine, allow_remote_images=True)
    yield thread
    thread.stop()


def chat_body(**fields) -> dict:
    return {"model": MODEL, "messages": MESSAGES, "max_tokens": 2, **fields}


def user(content) -> dict:
    return {"role": "user", "content": content}


def completion_body(prompt) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 2}


JSON = {"Content-Type": "application/json"}


def post(server, path: str, content: bytes | str) -> tuple[httpx.Response, float]:
    started = time.perf_counter()
    response = httpx.post(server.url + path, content=content, headers=JSON, timeout=60)
    return response, time.perf_counter() - started


def error_of(response: httpx.Response, status: int = 400) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


# -- JSON nesting ------------------------------------------------------------------------


def refused_on_a_kept_connection(server, body: bytes, code: str) -> tuple[dict, float]:
    """POST ``body``, expect a 400 with ``code``, then a good request on the same keep-alive connection.

    Returns the refusal's error object and the seconds it took.
    """
    connection = http.client.HTTPConnection(server.host, server.port, timeout=60)
    try:
        started = time.perf_counter()
        connection.request("POST", "/v1/chat/completions", body, JSON)
        response = connection.getresponse()
        answer = json.loads(response.read())
        elapsed = time.perf_counter() - started
        assert response.status == 400 and answer["error"]["code"] == code, answer
        sock = connection.sock
        connection.request("POST", "/v1/chat/completions", json.dumps(chat_body()), JSON)
        response = connection.getresponse()
        assert response.status == 200, response.read()
        assert json.loads(response.read())["usage"]["completion_tokens"] >= 1
        assert connection.sock is sock  # the same keep-alive connection carried both requests
    finally:
        connection.close()
    return answer["error"], elapsed


def test_deeply_nested_json_is_400_and_the_connection_stays_usable(server):
    nested = b'{"model": "tiny", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    error, elapsed = refused_on_a_kept_connection(server, nested, "json_too_deep")
    assert elapsed < QUICK_S and str(schemas.MAX_JSON_DEPTH) in error["message"]


@pytest.mark.parametrize(
    "text, deeper",
    [
        (b"[" * 64 + b"]" * 64, False),
        (b"[" * 65 + b"]" * 65, True),
        (b'{"a": [' * 40 + b"1" + b"]}" * 40, True),  # objects and arrays count alike
        (b'{"a": "' + b"[" * 1000 + b'"}', False),  # brackets in strings are text
        (b'{"a": "\\"' + b"[" * 1000 + b'"}', False),  # an escaped quote does not end the string
        (b'{"a": "\\\\", "b": ' + b"[" * 100 + b"]" * 100 + b"}", True),  # an escaped backslash does not escape
        (b'["' + b'[", "' * 3_000_000 + b'"]', False),  # millions of strings, scanned in chunks
    ],
)
def test_nesting_scan(text, deeper):
    assert schemas.nested_deeper_than(text, 64) is deeper


def test_deep_nesting_in_a_utf16_body_is_refused(server):
    nested = ('{"model": "tiny", "messages": ' + "[" * 10_000 + "]" * 10_000 + "}").encode("utf-16")
    response, elapsed = post(server, "/v1/chat/completions", nested)
    assert error_of(response)["code"] == "json_too_deep" and elapsed < QUICK_S


@pytest.mark.parametrize(
    "text, code",
    [
        (b"[" + b"[]," * (schemas.MAX_JSON_CONTAINERS - 2) + b"[]]", None),  # at the bound: parsed
        (b"[" + b"[]," * schemas.MAX_JSON_CONTAINERS + b"[]]", "json_too_large"),
        (b'{"a": [' + b"{}," * 20_000 + b"{}]}", "json_too_large"),  # objects count alike
        (b"[" + b"1," * (schemas.MAX_JSON_VALUES + 1) + b"1]", "json_too_large"),
        (b'{"prompt": ' + json.dumps([[7] * 131_072] * 2).encode() + b"}", None),  # two prompts of a 128k context
        (b'["' + b"[]," * 1_000_000 + b'"]', None),  # brackets and commas in strings are text
        (b"[" * 200_000, "json_too_deep"),  # too many and too deep: the depth is named
    ],
)
def test_json_structure_bounds(text, code, monkeypatch):
    """Refused before ``json.loads`` ever sees the body; a body within the bounds parses."""
    if code is None:
        schemas.check_json_structure(text)
        assert schemas.load_json(text) == json.loads(text)
        return
    monkeypatch.setattr(schemas.json, "loads", lambda *a, **k: pytest.fail("parsed a body it should refuse"))
    with pytest.raises(APIError) as raised:
        schemas.load_json(text)
    assert raised.value.code == code


def test_millions_of_tiny_arrays_are_400_quickly_and_the_connection_stays_usable(server):
    """57 MiB of ``[],`` (under the body cap) is 20 million lists once parsed: about 5 s and 1.7 GB in json.loads."""
    body = b'{"model": "tiny", "messages": [' + b"[]," * 20_000_000 + b"[]]}"
    assert len(body) < schemas.MAX_BODY_BYTES
    error, elapsed = refused_on_a_kept_connection(server, body, "json_too_large")
    assert f"at most {schemas.MAX_JSON_CONTAINERS}" in error["message"]
    assert elapsed < 3 * QUICK_S, elapsed  # sending and scanning 57 MiB; parsing it alone takes longer


# -- lone surrogates ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/chat/completions", chat_body(messages=[user("hi \ud800")]), "messages.0.content"),
        ("/v1/chat/completions", chat_body(messages=[user([{"type": "text", "text": "\udfff"}])]),
         "messages.0.content.0.text"),  # fmt: skip
        ("/v1/chat/completions", chat_body(stop=["ok", "\ud83d"]), "stop.1"),
        ("/v1/completions", completion_body("hi \ud800"), "prompt"),
        ("/v1/completions", completion_body(["fine", "hi \ud800"]), "prompt.1"),
    ],
)
def test_a_lone_surrogate_is_400_naming_the_field(server, path, body, param):
    response, elapsed = post(server, path, json.dumps(body))  # ensure_ascii writes "\ud800" escapes
    error = error_of(response)
    assert error["code"] == "invalid_string" and error["param"] == param and elapsed < QUICK_S


def test_a_surrogate_in_raw_utf8_bytes_is_refused_too(server):
    body = b'{"model": "tiny", "prompt": "hi \xed\xa0\x80"}'  # json.loads decodes these bytes with surrogatepass
    error = error_of(post(server, "/v1/completions", body)[0])
    assert error["code"] == "invalid_string" and error["param"] == "prompt"


def test_a_surrogate_pair_is_text(server):
    response, _ = post(server, "/v1/completions", json.dumps(completion_body("a \U0001f600")))
    assert response.status_code == 200, response.text


# -- prompt length -----------------------------------------------------------------------


@pytest.fixture
def prepared(engine, monkeypatch):
    """The prompts the engine tokenised during the test."""
    seen = []
    prepare = engine._prepare

    def counting(request):
        seen.append(request)
        return prepare(request)

    monkeypatch.setattr(engine, "_prepare", counting)
    return seen


@pytest.mark.parametrize(
    "path, make_body, param",
    [
        ("/v1/completions", lambda: completion_body("red circle " * 800_000), "prompt"),  # 8.8 MB
        ("/v1/completions", lambda: completion_body(["a red circle", "x" * 8_000_000]), "prompt"),
        ("/v1/chat/completions", lambda: chat_body(messages=[user("red circle " * 800_000)]), "messages"),
        ("/v1/chat/completions", lambda: chat_body(messages=[user([{"type": "text", "text": "x" * 50_000}]),
                                                            user("y" * 50_000)]), "messages"),  # fmt: skip
    ],
)
def test_a_huge_prompt_is_refused_before_it_is_tokenised(server, engine, prepared, path, make_body, param):
    response, elapsed = post(server, path, json.dumps(make_body()))
    error = error_of(response)
    assert error["code"] == "context_length_exceeded" and error["param"] == param
    assert str(engine.max_model_len * MAX_CHARS_PER_TOKEN) in error["message"]
    assert not prepared  # the tokenizer never saw it
    assert elapsed < QUICK_S


def test_a_prompt_under_the_character_bound_is_still_tokenised(server, engine, prepared):
    body = completion_body("red circle " * 2000)  # over the context, not over the bound
    error = error_of(post(server, "/v1/completions", json.dumps(body))[0])
    assert error["code"] == "context_length_exceeded" and "tokens long" in error["message"]
    assert len(prepared) == 1


# -- images --------------------------------------------------------------------------------


def png(width: int, height: int, mode: str = "L") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def image_body(url: str) -> dict:
    return chat_body(messages=[user([{"type": "image_url", "image_url": {"url": url}}])])


@pytest.fixture
def decoded(monkeypatch):
    """How many images had their pixels decoded during the test."""
    from PIL import ImageFile

    calls = []
    load = ImageFile.ImageFile.load

    def counting(self):
        calls.append(self.size)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", counting)
    return calls


@pytest.mark.parametrize("size", [(300_000, 1), (1, 300_000), (16_777_216, 1), (4096, 4096 // MAX_ASPECT_RATIO - 1)])
def test_a_thin_image_is_refused_before_decoding(server, decoded, size):
    data = png(*size)
    assert len(data) < 100_000  # a few bytes of PNG stand for megapixels
    url = "data:image/png;base64," + base64.b64encode(data).decode()
    response, elapsed = post(server, "/v1/chat/completions", json.dumps(image_body(url)))
    error = error_of(response)
    assert error["code"] == "image_aspect_ratio_too_large" and f"{size[0]}x{size[1]}" in error["message"]
    assert error["param"] == "messages.0.content.0.image_url"
    assert not decoded and elapsed < QUICK_S


def test_images_within_the_aspect_ratio_are_decoded():
    policy = MediaPolicy()
    assert decode_image(png(MAX_ASPECT_RATIO * 4, 4), policy, "messages").size == (MAX_ASPECT_RATIO * 4, 4)
    with pytest.raises(APIError) as thin:
        decode_image(png(MAX_ASPECT_RATIO * 4 + 1, 4), policy, "messages")
    assert thin.value.code == "image_aspect_ratio_too_large"
    with pytest.raises(APIError) as large:  # the pixel cap still holds
        decode_image(png(300, 300), MediaPolicy(max_pixels=200 * 200), "messages")
    assert large.value.code == "image_too_large"


# -- bodies that never arrive ----------------------------------------------------------------


def stall(server, count: int) -> list[socket.socket]:
    """``count`` connections that send headers and a few bytes of a 1000-byte body, then nothing."""
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {server.host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: 1000\r\n\r\n{{\"model\": ").encode()  # fmt: skip
    sockets = []
    for _ in range(count):
        sock = socket.create_connection((server.host, server.port), timeout=30)
        sock.sendall(head)
        sockets.append(sock)
    return sockets


def answer_of(sock: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data


def test_stalled_bodies_hold_no_admission_place(engine):
    server = start(engine, max_batch_size=1, max_queue=1)  # two requests in flight at most
    admission = server.server.config.app.state.admission
    stalled = stall(server, 8)
    try:
        time.sleep(0.3)  # every stalled request is in the application, waiting for its body
        assert admission.in_flight == 0
        started = time.perf_counter()
        response = httpx.post(server.url + "/v1/chat/completions", json=chat_body(), timeout=60)
        assert response.status_code == 200, response.text
        assert time.perf_counter() - started < 10
        assert httpx.get(server.url + "/health").json() == {"status": "ok", "in_flight": 0}
    finally:
        for sock in stalled:
            sock.close()
        server.stop()


def test_a_stalled_body_is_answered_408_and_its_connection_closed(engine, monkeypatch):
    monkeypatch.setattr(schemas, "BODY_READ_TIMEOUT_S", 1.0)
    server = start(engine, max_batch_size=1, max_queue=1)
    admission = server.server.config.app.state.admission
    started = time.perf_counter()
    stalled = stall(server, 8)
    try:
        answers = [answer_of(sock) for sock in stalled]  # ends when the server closes the connection
        elapsed = time.perf_counter() - started
        assert 0.9 < elapsed < 10
        for answer in answers:
            head, _, body = answer.partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 408"), answer
            assert b"connection: close" in head.lower()
            assert json.loads(body)["error"]["code"] == "request_timeout"
        assert admission.in_flight == 0
        response = httpx.post(server.url + "/v1/chat/completions", json=chat_body(), timeout=60)
        assert response.status_code == 200, response.text
    finally:
        for sock in stalled:
            sock.close()
        server.stop()


def test_refusals_keep_the_connection_usable(server):
    """Every refusal of a body read in full leaves the keep-alive connection open for the next request."""
    thin = "data:image/png;base64," + base64.b64encode(png(300_000, 1)).decode()
    refused = [
        ("/v1/chat/completions", b'{"messages": ' + b"[" * 1000 + b"]" * 1000 + b"}"),
        ("/v1/completions", json.dumps(completion_body("hi \ud800")).encode()),
        ("/v1/completions", json.dumps(completion_body("x" * 100_000)).encode()),
        ("/v1/chat/completions", json.dumps(image_body(thin)).encode()),
        ("/v1/chat/completions", json.dumps(image_body("http://169.254.169.254/latest/meta-data/")).encode()),
    ]
    connection = http.client.HTTPConnection(server.host, server.port, timeout=60)
    try:
        connection.connect()
        sock = connection.sock
        for path, body in refused:
            connection.request("POST", path, body, JSON)
            response = connection.getresponse()
            assert response.status == 400 and json.loads(response.read())["error"]["code"]
        connection.request("POST", "/v1/chat/completions", json.dumps(chat_body()), JSON)
        response = connection.getresponse()
        assert response.status == 200, response.read()
        response.read()
        assert connection.sock is sock
    finally:
        connection.close()


# -- remote images into the server's network -------------------------------------------------


@pytest.mark.parametrize(
    "url, address",
    [
        ("http://127.0.0.1:8080/cat.png", "127.0.0.1"),
        ("http://localhost/cat.png", None),
        ("http://[::1]/cat.png", "::1"),
        ("http://169.254.169.254/latest/meta-data/", "169.254.169.254"),
        ("http://[fd00:ec2::254]/latest/meta-data/", "fd00:ec2::254"),
        ("http://10.1.2.3/cat.png", "10.1.2.3"),
        ("http://192.168.0.1/cat.png", "192.168.0.1"),
        ("http://224.0.0.1/cat.png", "224.0.0.1"),
        ("http://0.0.0.0/cat.png", "0.0.0.0"),
        ("http://[::ffff:127.0.0.1]/cat.png", "::ffff:127.0.0.1"),
        ("https://100.64.0.1/cat.png", "100.64.0.1"),
    ],
)
def test_image_urls_into_the_server_network_are_refused(server, url, address):
    response, elapsed = post(server, "/v1/chat/completions", json.dumps(image_body(url)))
    error = error_of(response)
    assert error["code"] == "image_host_not_allowed" and error["param"] == "messages.0.content.0.image_url"
    if address:
        assert address in error["message"]
    assert elapsed < QUICK_S


class Resolver:
    """``socket.getaddrinfo`` with made-up names: ``names[name]`` lists the answers to successive
    lookups (the last one repeats); other names resolve as usual.  ``lookups`` records the made-up ones."""

    def __init__(self, real):
        self.real = real
        self.names: dict[str, list[str]] = {}
        self.lookups: list[str] = []

    def __call__(self, host, port, *args, **kwargs):
        if host not in self.names:
            return self.real(host, port, *args, **kwargs)
        self.lookups.append(host)
        answers = self.names[host]
        return self.real(answers.pop(0) if len(answers) > 1 else answers[0], port, *args, **kwargs)


@pytest.fixture
def resolver(monkeypatch):
    resolver = Resolver(socket.getaddrinfo)
    monkeypatch.setattr(socket, "getaddrinfo", resolver)
    return resolver


def test_a_host_name_resolving_to_loopback_is_refused(server, resolver):
    resolver.names["images.example.com"] = ["127.0.0.1"]
    response, _ = post(server, "/v1/chat/completions", json.dumps(image_body("http://images.example.com/cat.png")))
    error = error_of(response)
    assert error["code"] == "image_host_not_allowed"
    assert "images.example.com" in error["message"] and "127.0.0.1" in error["message"]


class ImageServer:
    """An HTTP server on ``host`` answering ``routes[path] = (status, headers, body)``; records requests."""

    def __init__(self, host: str, routes: dict):
        seen = self.seen = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                seen.append((self.path, self.headers.get("Host")))
                status, headers, body = routes.get(self.path, (404, {}, b""))
                self.send_response(status)
                for name, value in {**headers, "Content-Length": str(len(body))}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer((host, 0), Handler)
        self.url = f"http://{host}:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers(monkeypatch):
    """A 'public' image server on 127.0.0.2 (the address checks let it through) and a private one on 127.0.0.1."""
    private = ImageServer("127.0.0.1", {"/secret.png": (200, {}, png(8, 8))})
    public = ImageServer("127.0.0.2", {
        "/blue.png": (200, {}, png(24, 24, "RGB")),
        "/to-self": (302, {"Location": "/blue.png"}, b""),
        "/to-private": (302, {"Location": private.url + "/secret.png"}, b""),
        "/to-localhost": (307, {"Location": private.url.replace("127.0.0.1", "localhost") + "/secret.png"}, b""),
        "/to-metadata": (301, {"Location": "http://169.254.169.254/latest/meta-data/"}, b""),
        "/to-file": (302, {"Location": "file:///etc/passwd"}, b""),
        "/loop": (302, {"Location": "/loop"}, b""),
    })  # fmt: skip
    checked = remote.refusal
    monkeypatch.setattr(remote, "refusal", lambda address, allow_private=False: None if address == "127.0.0.2"
                        else checked(address, allow_private))  # fmt: skip
    yield public, private
    public.close()
    private.close()


@pytest.mark.parametrize(
    "path, code",
    [
        ("/to-private", "image_host_not_allowed"),
        ("/to-localhost", "image_host_not_allowed"),
        ("/to-metadata", "image_host_not_allowed"),
        ("/to-file", "image_fetch_failed"),
        ("/loop", "image_fetch_failed"),
    ],
)
def test_every_redirect_hop_is_checked(server, servers, path, code):
    public, private = servers
    response, _ = post(server, "/v1/chat/completions", json.dumps(image_body(public.url + path)))
    assert error_of(response)["code"] == code
    assert private.seen == []  # the private server was never asked
    assert len(public.seen) <= remote.MAX_REDIRECTS + 1


def test_allowed_redirects_are_followed(servers):
    public, _ = servers
    image = asyncio.run(load_image(public.url + "/to-self", MediaPolicy(allow_remote=True)))
    assert image.size == (24, 24)
    assert [path for path, _ in public.seen] == ["/to-self", "/blue.png"]


def test_the_connection_goes_to_the_address_that_was_checked(servers, resolver):
    """A name that resolves to a checked address, then to a private one (DNS rebinding), is fetched from the first."""
    public, _ = servers
    port = public.url.rsplit(":", 1)[1]
    resolver.names["rebind.example.com"] = ["127.0.0.2", "127.0.0.1"]
    image = asyncio.run(load_image(f"http://rebind.example.com:{port}/blue.png", MediaPolicy(allow_remote=True)))
    assert image.size == (24, 24)
    assert resolver.lookups == ["rebind.example.com"]  # resolved once, by the check
    assert public.seen == [("/blue.png", f"rebind.example.com:{port}")]  # the Host header keeps the name


@pytest.mark.parametrize(
    "address, kind",
    [
        ("8.8.8.8", None),
        ("2606:4700:4700::1111", None),
        ("127.0.0.1", "loopback"),
        ("::1", "loopback"),
        ("10.0.0.1", "private"),
        ("172.16.0.1", "private"),
        ("fe80::1", "link-local"),
        ("169.254.169.254", "cloud metadata"),
        ("fd00:ec2::254", "cloud metadata"),
        ("ff02::1", "multicast"),
        ("240.0.0.1", "reserved"),
        ("100.64.0.1", "non-public"),
        ("::ffff:10.0.0.1", "private"),  # IPv4-mapped
        ("2002:7f00:1::", "loopback"),  # 6to4 around 127.0.0.1
        ("64:ff9b::a9fe:a9fe", "cloud metadata"),  # NAT64 around 169.254.169.254
    ],
)
def test_address_classification(address, kind):
    reason = remote.refusal(address)
    assert reason is None if kind is None else kind in reason


def test_allow_private_hosts_still_refuses_metadata_addresses():
    assert remote.refusal("127.0.0.1", allow_private=True) is None
    assert remote.refusal("10.0.0.1", allow_private=True) is None
    assert "metadata" in remote.refusal("169.254.169.254", allow_private=True)
    with pytest.raises(APIError) as info:
        policy = MediaPolicy(allow_remote=True, allow_private_hosts=True)
        asyncio.run(load_image("http://169.254.169.254/latest/meta-data/", policy))
    assert info.value.code == "image_host_not_allowed"
