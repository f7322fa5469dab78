"""Where a webhook may go: http(s) URLs of public addresses (no SSRF).

Checked when the request comes (a clear 422) and again at each delivery,
where the HTTP client connects only to addresses this module allows
(`PublicResolver`): a name that resolved to a public address at submit
time and to 127.0.0.1 later (DNS rebinding) is refused then too.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import aiohttp.abc

from service.settings import is_ip_address

URL_MAX_CHARS = 2048
RESOLVE_TIMEOUT_S = 5.0

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


class WebhookRefused(Exception):
    """The URL may not be called; the message says why, for the client."""


class Unresolvable(WebhookRefused):
    """The host's name did not resolve (now: at delivery, worth another try)."""


def parse_url(url: str) -> tuple[str, int]:
    """The host and port of an http(s) URL; WebhookRefused if it is not one."""
    if len(url) > URL_MAX_CHARS:
        raise WebhookRefused(f"webhook URL is longer than {URL_MAX_CHARS} characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise WebhookRefused(f"webhook is not a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise WebhookRefused("webhook must be an http:// or https:// URL with a host")
    host = parts.hostname
    try:
        if not is_ip_address(host):
            host.encode("idna")  # what a resolver is given: labels of 1 to 63 characters
    except UnicodeError:
        raise WebhookRefused(f"webhook host {host!r} is not a valid host name") from None
    return host, port or (443 if parts.scheme == "https" else 80)


def forbidden(address: IPAddress) -> bool:
    """Loopback, private, link-local and the like: not the public internet."""
    if isinstance(address, ipaddress.IPv6Address):
        # An IPv4 address carried in IPv6 (mapped, 6to4, NAT64) is judged as itself.
        embedded = address.ipv4_mapped or address.sixtofour
        if embedded is None and address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
        if embedded is not None:
            address = embedded
    return not address.is_global or address.is_multicast


async def check_public(url: str, allow_private: bool) -> None:
    """Refuse a URL that is not http(s), or whose host resolves to a forbidden address."""
    host, port = parse_url(url)
    if allow_private:
        return
    for address in await _resolve(host, port):
        if forbidden(address):
            raise WebhookRefused(
                f"webhook host {host!r} resolves to {address}, a loopback, private or "
                "link-local address; such URLs are refused"
            )


async def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        return [ipaddress.ip_address(host)]
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_S):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, TimeoutError, UnicodeError) as exc:
        raise Unresolvable(f"webhook host {host!r} cannot be resolved ({exc})") from None
    return [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]


class PublicResolver(aiohttp.abc.AbstractResolver):
    """aiohttp's resolver, minus the addresses a webhook may not reach."""

    def __init__(self, allow_private: bool) -> None:
        self._allow_private = allow_private
        self._resolver = aiohttp.ThreadedResolver()

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[Any]:
        found = await self._resolver.resolve(host, port, family)
        if self._allow_private:
            return found
        allowed = [info for info in found if not forbidden(ipaddress.ip_address(info["host"]))]
        if not allowed:
            raise OSError(f"{host} resolves only to addresses webhooks may not reach")
        return allowed

    async def close(self) -> None:
        await self._resolver.close()
