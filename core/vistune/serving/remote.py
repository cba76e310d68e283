"""Fetching a request's remote image without letting the request reach the server's own network.

The URL of a remote image is the client's choice, so a plain fetch would let any client
make the server call what only the server can reach (server-side request forgery): the
cloud metadata service at ``169.254.169.254``, services on loopback, hosts of the
private network.  :func:`fetch_remote` therefore:

* resolves the URL's host and refuses it if any address it resolves to is loopback,
  private, link-local, multicast, reserved, unspecified or otherwise not public
  (IPv4 addresses embedded in IPv6 ones are checked as IPv4), or a cloud metadata
  address (:data:`METADATA_ADDRESSES`);
* connects to the very address it checked: the URL's host is replaced by that address,
  while the ``Host`` header and the TLS server name keep the host name, so virtual
  hosts and certificate checks work as before and a DNS answer that changes between
  the check and the connection (DNS rebinding) is never used;
* follows redirects itself, at most :data:`MAX_REDIRECTS`, checking every hop alike;
* ignores proxy settings from the environment, since a proxy would connect to an
  address that was not checked; servers that reach the internet only through a proxy
  cannot fetch remote images;
* gives up after :data:`FETCH_DEADLINE_S` in all, however slowly the remote server sends.

``allow_private=True`` lifts the network check, though never for metadata addresses:
it serves tests that fetch images from a server on ``127.0.0.1``, and programs that
build their own :class:`vistune.serving.media.MediaPolicy` for an image store on their
private network.  No config key sets it, so ``vistune serve`` always checks.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any

from vistune.serving.errors import bad_request

#: Seconds allowed for each step of a fetch (connecting, each read).
REMOTE_TIMEOUT_S = 10.0
#: Seconds allowed for a whole fetch, redirects included.
FETCH_DEADLINE_S = 30.0
#: Redirects followed for one image.
MAX_REDIRECTS = 3
#: Addresses of cloud instance metadata services (AWS, GCP, Azure, OpenStack: the
#: first; AWS's IPv6 one; AWS ECS task metadata; Alibaba Cloud).  Never fetched from.
METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "fd00:ec2::254", "169.254.170.2", "100.100.100.200")
)
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
_DEFAULT_PORTS = {"http": 80, "https": 443}


def _embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (IPv4-mapped, 6to4, NAT64), if any."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def refusal(address: str, allow_private: bool = False) -> str | None:
    """Why no image may be fetched from ``address`` (``"a loopback address"``...), or ``None``."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # without an IPv6 zone (fe80::1%eth0)
    if isinstance(ip, ipaddress.IPv6Address) and (embedded := _embedded_ipv4(ip)) is not None:
        ip = embedded
    if ip in METADATA_ADDRESSES:
        return "a cloud metadata address"
    if allow_private:
        return None
    for kind, test in (("loopback", ip.is_loopback), ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
                       ("unspecified", ip.is_unspecified), ("reserved", ip.is_reserved), ("private", ip.is_private),
                       ("non-public", not ip.is_global)):  # fmt: skip
        if test:
            return f"a {kind} address"
    return None


async def checked_address(url: Any, allow_private: bool, param: str) -> str:
    """The address to connect to for ``url`` (an ``httpx.URL``), once all its host's addresses are checked.

    :raises APIError: 400 ``image_host_not_allowed`` naming the host and the address.
    """
    host = url.raw_host.decode("ascii")
    if not host:
        raise bad_request(f"the image URL {str(url)!r} has no host", param, "invalid_image_url")
    port = url.port or _DEFAULT_PORTS[url.scheme]
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as exc:  # socket.gaierror among them
        raise bad_request(f"cannot resolve the image host {host!r}: {exc}", param, "image_fetch_failed") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise bad_request(f"the image host {host!r} has no address", param, "image_fetch_failed")
    for address in addresses:
        reason = refusal(address, allow_private)
        if reason is not None:
            raise bad_request(f"the image host {host!r} resolves to {address}, {reason}; images are fetched from "
                              "public addresses only", param, "image_host_not_allowed")  # fmt: skip
    return addresses[0]


def _next_url(current: Any, location: str, param: str) -> Any:
    """Where a redirect from ``current`` leads; only to http(s) URLs."""
    import httpx

    try:
        target = current.join(location)
    except httpx.InvalidURL as exc:
        raise bad_request(f"the image URL redirects to an invalid URL: {exc}", param, "image_fetch_failed") from None
    if target.scheme not in _DEFAULT_PORTS:
        raise bad_request(f"the image URL redirects to {str(target)!r}, which is not http(s)", param,
                          "image_fetch_failed")  # fmt: skip
    return target


async def _read(response: Any, url: str, max_bytes: int, param: str) -> bytes:
    if response.status_code != 200:
        raise bad_request(f"fetching the image {url!r} answered HTTP {response.status_code}", param,
                          "image_fetch_failed")  # fmt: skip
    chunks, size = [], 0
    async for chunk in response.aiter_bytes():
        size += len(chunk)
        if size > max_bytes:
            raise bad_request(f"the image at {url!r} is larger than {max_bytes} bytes", param, "image_too_large")
        chunks.append(chunk)
    return b"".join(chunks)


async def _fetch_checked(url: str, max_bytes: int, param: str, allow_private: bool) -> bytes:
    import httpx

    current = httpx.URL(url)
    async with httpx.AsyncClient(timeout=REMOTE_TIMEOUT_S, follow_redirects=False, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            address = await checked_address(current, allow_private, param)
            request = client.build_request("GET", current.copy_with(host=address),
                                           headers={"Host": current.netloc.decode("ascii")},
                                           extensions={"sni_hostname": current.raw_host.decode("ascii")})  # fmt: skip
            response = await client.send(request, stream=True)
            try:
                if not response.is_redirect:
                    return await _read(response, url, max_bytes, param)
                current = _next_url(current, response.headers["location"], param)
            finally:
                await response.aclose()
    raise bad_request(f"the image URL {url!r} redirects more than {MAX_REDIRECTS} times", param, "image_fetch_failed")


async def fetch_remote(url: str, *, max_bytes: int, param: str, allow_private: bool = False) -> bytes:
    """The bytes at the http(s) ``url``, fetched only from public addresses (see the module's docstring).

    :param max_bytes: the largest body accepted.
    :param param: the request field named in errors.
    :raises vistune.serving.errors.APIError: 400 with code ``image_host_not_allowed``,
        ``image_fetch_failed``, ``image_too_large`` or ``invalid_image_url``.
    """
    import httpx

    try:
        return await asyncio.wait_for(_fetch_checked(url, max_bytes, param, allow_private), FETCH_DEADLINE_S)
    except asyncio.TimeoutError:
        raise bad_request(f"fetching the image {url!r} took more than {FETCH_DEADLINE_S:g} s", param,
                          "image_fetch_failed") from None  # fmt: skip
    except httpx.InvalidURL as exc:
        raise bad_request(f"the image URL {url!r} is invalid: {exc}", param, "invalid_image_url") from None
    except httpx.HTTPError as exc:
        raise bad_request(f"cannot fetch the image {url!r}: {exc}", param, "image_fetch_failed") from None
