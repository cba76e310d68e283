"""Loading the images of a request: data URLs, and, only where allowed, remote and local files.

The policy is deny by default.  ``data:`` URLs always work.  ``http(s)`` URLs are
fetched only with ``allow_remote_images: true``, and only from public addresses (see
:mod:`vistune.serving.remote`; :attr:`MediaPolicy.allow_private_hosts` lifts that for
tests).  ``file://`` URLs and plain paths are read only from inside
``allowed_local_media_path`` (after resolving ``..`` and symbolic links), so a request
can never read an arbitrary file of the server.  Every image is checked against
``max_image_pixels`` and :data:`MAX_ASPECT_RATIO` from its header, before its pixels are
decoded.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import attrs

from vistune.serving.errors import bad_request
from vistune.serving.remote import fetch_remote

#: Largest image file accepted, whatever its source (bytes).
MAX_IMAGE_BYTES = 32 * 1024 * 1024
#: Longest side over shortest side accepted.  Processors scale an image's shortest side
#: up to their input size, so a thin strip (300000x1 pixels, under a kilobyte as PNG)
#: becomes gigabytes; panoramas and long receipts stay well inside 50:1.
MAX_ASPECT_RATIO = 50


@attrs.frozen
class MediaPolicy:
    """Where images may come from, and how large they may be."""

    allow_remote: bool = False
    #: Directory local images may be read from; ``None`` forbids local files.
    allowed_root: Path | None = None
    max_pixels: int = 4096 * 4096
    max_bytes: int = MAX_IMAGE_BYTES
    #: Fetch remote images from loopback and private addresses too (never from cloud
    #: metadata ones).  For tests and programs with a private image store; no config key
    #: sets it.
    allow_private_hosts: bool = False

    @classmethod
    def from_config(cls, config: Any) -> MediaPolicy:
        root = Path(config.allowed_local_media_path).expanduser().resolve() if config.allowed_local_media_path else None
        return cls(bool(config.allow_remote_images), root, int(config.max_image_pixels))


def check_image_size(width: int, height: int, policy: MediaPolicy, param: str) -> None:
    """Refuse an image too large or too thin to decode, from the size its header gives.

    :raises APIError: 400 ``image_too_large`` or ``image_aspect_ratio_too_large``, naming the size.
    """
    if width * height > policy.max_pixels:
        raise bad_request(f"the image is {width}x{height} = {width * height} pixels, more than max_image_pixels "
                          f"({policy.max_pixels})", param, "image_too_large")  # fmt: skip
    if max(width, height) > MAX_ASPECT_RATIO * max(min(width, height), 1):
        raise bad_request(f"the image is {width}x{height} pixels: its long side is more than {MAX_ASPECT_RATIO} "
                          "times its short side", param, "image_aspect_ratio_too_large")  # fmt: skip


def decode_image(data: bytes, policy: MediaPolicy, param: str) -> Any:
    """A PIL RGB image from encoded bytes; refuses undecodable, oversized and too thin images."""
    from PIL import Image

    if len(data) > policy.max_bytes:
        raise bad_request(
            f"the image is {len(data)} bytes, more than the {policy.max_bytes} accepted", param, "image_too_large"
        )
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise bad_request(f"the image has more than {policy.max_pixels} pixels", param, "image_too_large") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises several types for bad data
        raise bad_request(f"cannot decode the image: {exc}", param, "invalid_image") from None
    check_image_size(*image.size, policy, param)
    try:
        image.load()
        return image.convert("RGB")
    except Exception as exc:  # noqa: BLE001 - truncated or corrupt pixel data
        raise bad_request(f"cannot decode the image: {exc}", param, "invalid_image") from None


def _data_url_bytes(url: str, param: str) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma:
        raise bad_request("an image data URL must look like data:image/png;base64,<data>", param, "invalid_image_url")
    if not header.endswith(";base64"):
        raise bad_request(
            "only base64 image data URLs are supported (data:<type>;base64,<data>)", param, "invalid_image_url"
        )
    try:
        return base64.b64decode(payload.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise bad_request("the image data URL is not valid base64", param, "invalid_base64") from None


def _local_path(url: str, policy: MediaPolicy, param: str) -> Path:
    if policy.allowed_root is None:
        raise bad_request("local image files are not allowed on this server (allowed_local_media_path is not set)",
                          param, "local_media_not_allowed")  # fmt: skip
    raw = unquote(urlparse(url).path) if url.startswith("file:") else url
    path = Path(raw).expanduser()
    if not path.is_absolute():
        path = policy.allowed_root / path
    resolved = path.resolve()
    if not resolved.is_relative_to(policy.allowed_root):
        raise bad_request(f"{url!r} is outside the directory images may be read from", param, "local_media_not_allowed")
    if not resolved.is_file():
        raise bad_request(f"{url!r} is not a file inside the allowed media directory", param, "invalid_image_url")
    return resolved


async def load_image(url: str, policy: MediaPolicy, param: str = "messages") -> Any:
    """The PIL image an ``image_url`` points at, if the policy allows reading it.

    :raises vistune.serving.errors.APIError: 400 with a code saying why it was refused.
    """
    if not isinstance(url, str) or not url:
        raise bad_request("image_url.url must be a non-empty string", param, "invalid_image_url")
    scheme = urlparse(url).scheme.lower() if "://" in url or url.startswith("data:") else ""
    if scheme == "data":
        data = _data_url_bytes(url, param)
    elif scheme in ("http", "https"):
        if not policy.allow_remote:
            raise bad_request("remote image URLs are disabled on this server (allow_remote_images is false); "
                              "send the image as a data URL", param, "remote_media_not_allowed")  # fmt: skip
        data = await fetch_remote(url, max_bytes=policy.max_bytes, param=param,
                                  allow_private=policy.allow_private_hosts)  # fmt: skip
    elif scheme in ("file", ""):
        path = _local_path(url, policy, param)
        data = await asyncio.to_thread(_read_limited, path, policy, param)
    else:
        raise bad_request(f"unsupported image URL scheme {scheme!r}; use data:, http(s): or file:", param,
                          "invalid_image_url")  # fmt: skip
    return await asyncio.to_thread(decode_image, data, policy, param)


def _read_limited(path: Path, policy: MediaPolicy, param: str) -> bytes:
    if path.stat().st_size > policy.max_bytes:
        raise bad_request(f"the image file is larger than {policy.max_bytes} bytes", param, "image_too_large")
    return path.read_bytes()
