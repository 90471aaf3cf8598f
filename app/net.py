"""Fetching user-given URLs without opening the network behind the service (SSRF guard).

URL sources are off unless the operator turns them on. When on: http(s) only, no credentials in the URL, the host
name is resolved and *every* address it resolves to must be public (not private, loopback, link-local — which
includes cloud metadata endpoints —, multicast, reserved or unspecified); redirects are not followed; the body is
streamed to disk under a size limit. The connection goes to an address that was checked (the URL's host in the
Host header and, for https, in the TLS server name, which the certificate is verified against): a DNS answer that
changes between the check and the connection (rebinding) cannot send it elsewhere. Where the environment names a
proxy for the URL, the proxy resolves the name and connects: guarding what it reaches is then the proxy's job.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import urllib.request
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import httpx

from app.errors import InvalidRequest, PayloadTooLarge


class UrlRefused(InvalidRequest):
    code = "url_refused"


def public_address(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return not (
        ip.is_private
        or ip.is_loopback
        or ip.is_link_local
        or ip.is_multicast
        or ip.is_reserved
        or ip.is_unspecified
        or getattr(ip, "is_site_local", False)
    )


def check_url(url: str, *, allow_private: bool, loc: list[str]) -> list[str]:
    """The addresses to connect to for ``url`` (the resolver's order), once every one its host resolves to is
    allowed."""
    try:
        return _check_url(url, allow_private=allow_private, loc=loc)
    except (ValueError, UnicodeError) as exc:  # a port out of range, a host no resolver takes (too long a label, …)
        raise UrlRefused(f"the URL is not valid: {exc}", errors=[{"loc": loc, "msg": "invalid URL"}]) from exc


def _check_url(url: str, *, allow_private: bool, loc: list[str]) -> list[str]:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise UrlRefused(
            f"only http and https URLs are accepted, not {parts.scheme or 'none'}",
            errors=[{"loc": loc, "msg": "scheme"}],
        )
    if not parts.hostname or parts.username or parts.password:
        raise UrlRefused("the URL needs a host and no credentials", errors=[{"loc": loc, "msg": "host"}])
    try:
        infos = socket.getaddrinfo(parts.hostname, parts.port or (443 if parts.scheme == "https" else 80))
    except socket.gaierror as exc:
        raise UrlRefused(f"cannot resolve {parts.hostname}", errors=[{"loc": loc, "msg": str(exc)}]) from exc
    # an IPv6 zone index ("%eth0") is no part of a URL
    addresses = list(dict.fromkeys(str(info[4][0]).split("%", 1)[0] for info in infos))
    blocked = sorted(a for a in addresses if not public_address(a))
    if blocked and not allow_private:
        raise UrlRefused(
            f"{parts.hostname} resolves to non-public addresses {blocked}",
            errors=[{"loc": loc, "msg": "private, loopback or link-local address"}],
        )
    if not addresses:
        raise UrlRefused(f"cannot resolve {parts.hostname}", errors=[{"loc": loc, "msg": "no address"}])
    return addresses


def through_proxy(url: str) -> bool:
    """Whether the environment sends ``url`` through a proxy (``HTTP(S)_PROXY``/``ALL_PROXY``, less ``NO_PROXY``):
    the proxy then resolves the name (an egress proxy is the deployment's own guard), so the connection cannot be
    pinned to an address checked here (a tunnel's TLS would be verified against the address)."""
    parts = urlsplit(url)
    proxies = urllib.request.getproxies()
    if not (proxies.get(parts.scheme) or proxies.get("all")):
        return False
    return not urllib.request.proxy_bypass(parts.hostname or "")


def fetch_to(url: str, sink: BinaryIO, *, max_bytes: int, allow_private: bool, loc: list[str]) -> int:
    """Stream ``url`` into ``sink``; returns the byte count. Raises UrlRefused / PayloadTooLarge. Connects to the
    addresses that were checked, in turn while a connection cannot be made (a dual-stack host whose IPv6 is down),
    unless a proxy carries it."""
    addresses = check_url(url, allow_private=allow_private, loc=loc)
    try:
        target = httpx.URL(url)
        if through_proxy(url):
            return _fetch(target, {}, {}, sink, max_bytes, loc, trust_env=True)
        headers = {"Host": target.netloc.decode("ascii")}
        extensions = {"sni_hostname": target.raw_host.decode("ascii")} if target.scheme == "https" else {}
        for address in addresses[:-1]:  # the next one while a connection cannot be made; the last one's error raised
            with contextlib.suppress(httpx.ConnectError, httpx.ConnectTimeout):
                return _fetch(
                    target.copy_with(host=address), headers, extensions, sink, max_bytes, loc, trust_env=False
                )
        pinned = target.copy_with(host=addresses[-1])
        return _fetch(pinned, headers, extensions, sink, max_bytes, loc, trust_env=False)
    except (httpx.HTTPError, httpx.InvalidURL) as exc:  # InvalidURL (control characters, …) is no HTTPError
        raise UrlRefused(f"cannot fetch the URL: {exc}", errors=[{"loc": loc, "msg": "fetch failed"}]) from exc


def _fetch(
    url: httpx.URL,
    headers: dict[str, str],
    extensions: dict[str, Any],
    sink: BinaryIO,
    max_bytes: int,
    loc: list[str],
    *,
    trust_env: bool,
) -> int:
    size = 0
    with (
        # certificates as the environment says (SSL_CERT_FILE, SSL_CERT_DIR) either way; its proxies only when asked
        httpx.Client(
            follow_redirects=False, timeout=30, trust_env=trust_env, verify=httpx.create_ssl_context(trust_env=True)
        ) as client,
        client.stream("GET", url, headers=headers, extensions=extensions) as response,
    ):
        if response.is_redirect:
            raise UrlRefused("redirects are not followed", errors=[{"loc": loc, "msg": "redirect"}])
        if response.status_code != 200:
            raise UrlRefused(f"the URL answered {response.status_code}", errors=[{"loc": loc, "msg": "status"}])
        for chunk in response.iter_bytes(1 << 20):
            size += len(chunk)
            if size > max_bytes:
                raise PayloadTooLarge(f"the download is larger than {max_bytes} bytes")
            sink.write(chunk)
    return size
