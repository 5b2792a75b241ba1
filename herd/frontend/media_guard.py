"""Which hosts an image URL may make the server fetch from (server-side request forgery).

A client must not make the server read what only the server can reach: loopback, private networks,
link-local addresses (cloud metadata at 169.254.169.254 and fd00:ec2::254 among them). Each URL's host is
resolved and every address it resolves to must be public; `fetch` checks every redirect hop the same way,
and again the address it actually connected to, so a DNS answer that changes between the check and the
connection (rebinding) is caught before any byte of the answer is read. `--allowed-media-domains` names
the only hosts that may be fetched; those are trusted, whatever they resolve to.
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.parse
from collections.abc import Sequence


class ForbiddenMediaURL(ValueError):
    """A URL whose host the policy refuses; the message names the host and the flag that would allow it."""


def _normalise(host: str) -> str:
    return host.strip().lower().rstrip(".").removeprefix("[").removesuffix("]")


def is_public(address: str) -> bool:
    """Whether an IP address is globally routable (not loopback, private, link-local, reserved, multicast)."""
    ip = ipaddress.ip_address(address.split("%")[0])  # an IPv6 zone id ("fe80::1%eth0") is not part of it
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped  # ::ffff:127.0.0.1 is loopback
    return ip.is_global and not ip.is_multicast


class MediaHostPolicy:
    def __init__(self, allowed_domains: Sequence[str] | None = None) -> None:
        self.allowed = None if allowed_domains is None else frozenset(_normalise(d) for d in allowed_domains)
        self.resolve = socket.getaddrinfo  # replaceable in tests (a fake DNS)

    def check_url(self, url: str) -> bool:
        """Refuse `url` (ForbiddenMediaURL) unless its host may be fetched; True when its host is trusted
        (named in --allowed-media-domains), so its connected address need not be checked."""
        parts = urllib.parse.urlsplit(url)
        host = _normalise(parts.hostname or "")
        if not host:
            raise ForbiddenMediaURL(f"image URL {url[:64]!r} names no host")
        if self.allowed is not None:
            if host not in self.allowed:
                raise ForbiddenMediaURL(
                    f"image host {host!r} is not in --allowed-media-domains ({', '.join(sorted(self.allowed))})"
                )
            return True
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            infos = self.resolve(host, port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as e:
            raise ForbiddenMediaURL(f"cannot resolve image host {host!r}: {e}") from None
        for info in infos:
            self.check_address(host, str(info[4][0]))
        return False

    def check_address(self, host: str, address: str) -> None:
        if not is_public(address):
            raise ForbiddenMediaURL(
                f"image host {host!r} resolves to {address}, a loopback, private, link-local or reserved "
                "address; such hosts are refused unless named in --allowed-media-domains"
            )
