"""Which model URIs a node may fetch: the guard against reading or reaching
what a manifest author should not.

In Kubernetes mode anyone who can create an InferenceFunction chooses a URI
that a GPU manager (or the operator's check Job) then fetches. Without a
policy that is a file-read and SSRF primitive: ``file:///etc/shadow``, or
``http://169.254.169.254/`` for cloud credentials. The policy allows

- ``file://`` only below configured roots (after resolving ``..`` and links);
- ``http(s)://`` and S3 endpoints only on hosts whose every address is outside
  loopback, link-local (which holds the cloud metadata services) and the
  unspecified/multicast ranges. Private ranges stay allowed: in-cluster object
  stores live there.

The host check resolves names before the fetch, so a DNS answer that changes
between check and fetch (rebinding) is not covered; network policy is the
second line there (docs/reliability.md).
"""

from __future__ import annotations

import ipaddress
import socket
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

Resolver = Callable[[str], list[str]]

_METADATA_NAMES = frozenset({"metadata", "metadata.google.internal", "metadata.azure.internal"})


class UriNotAllowed(ValueError):
    """The URI is outside what this node may fetch; the message says why."""


def resolve_host(host: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except socket.gaierror as e:
        raise UriNotAllowed(f"cannot resolve host {host!r}: {e.strerror}") from None
    return sorted({str(info[4][0]) for info in infos})


def is_internal_address(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return (
        ip.is_loopback or ip.is_link_local or ip.is_unspecified or ip.is_multicast or ip.is_reserved
    )


@dataclass(frozen=True)
class UriPolicy:
    """``file_roots=None`` allows any local file (local mode); ``()`` allows none."""

    file_roots: tuple[Path, ...] | None = None
    block_internal_hosts: bool = False
    resolver: Resolver = field(default=resolve_host, compare=False)

    @classmethod
    def for_kubernetes(cls, *, file_roots: Sequence[Path] = ()) -> UriPolicy:
        return cls(file_roots=tuple(Path(r) for r in file_roots), block_internal_hosts=True)

    def check(self, uri: str, *, s3_endpoint: str | None = None) -> None:
        parts = urllib.parse.urlsplit(uri)
        scheme = parts.scheme.lower()
        if scheme == "file":
            self._check_file(uri, urllib.parse.unquote(parts.path))
        elif scheme in ("http", "https"):
            self._check_host(uri, parts.hostname)
        elif scheme == "s3" and s3_endpoint:
            self._check_host(uri, urllib.parse.urlsplit(s3_endpoint).hostname)

    def _check_file(self, uri: str, path: str) -> None:
        if self.file_roots is None:
            return
        resolved = Path(path).resolve()
        for root in self.file_roots:
            if resolved.is_relative_to(root.resolve()):
                return
        roots = ", ".join(str(r) for r in self.file_roots) or "none are allowed"
        raise UriNotAllowed(f"{uri}: file URIs must be below an allowed root ({roots})")

    def _check_host(self, uri: str, host: str | None) -> None:
        if not self.block_internal_hosts:
            return
        if not host:
            raise UriNotAllowed(f"{uri}: no host in the URI")
        if host.lower().rstrip(".") in _METADATA_NAMES:
            raise UriNotAllowed(f"{uri}: {host} is a cloud metadata service")
        try:
            addresses = [str(ipaddress.ip_address(host))]
        except ValueError:
            addresses = self.resolver(host)
        blocked = [a for a in addresses if is_internal_address(a)]
        if blocked:
            raise UriNotAllowed(
                f"{uri}: host {host} resolves to {', '.join(blocked)} "
                "(loopback, link-local or metadata addresses are not allowed)"
            )
