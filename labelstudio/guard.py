"""Guarded HTTP: which hosts images may come from, checked on every hop and every connection.

**SSRF guard**: the first URL must be on the Label Studio host (scheme, host and port) or on an
``allowed_hosts`` entry (``host``, ``host:port``, ``*.example.com``, or ``*`` for any public
host). Redirects are followed by hand (at most ``MAX_REDIRECTS``), re-checked at every hop, and
the ``Authorization`` header is dropped when leaving the Label Studio host. Every connection is
checked *when it is opened*, on the resolved address it actually connects to (so DNS rebinding
gains nothing): link-local addresses (including the cloud metadata service 169.254.169.254),
multicast, unspecified and reserved ones are always refused; loopback and private addresses
are allowed only for the Label Studio host and explicitly listed hosts; any other host (one
Label Studio redirects to, e.g. a presigned S3 URL) must resolve to public addresses only.
Downloads stop at ``max_bytes`` (decoded) and at ``timeout`` seconds overall.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import requests
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from .redaction import redact_url

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
"""Label Studio's access tokens live 5 minutes; exchanged ones are reused for at most 4."""
_CHUNK_BYTES = 64 * 1024
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(address)
    for address in ("169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200")
)
"""Cloud metadata services (AWS, ECS, AWS IPv6, Alibaba): never reachable, whatever the lists say."""


class FetchError(Exception):
    """The image could not be fetched; ``status`` is the HTTP status when one was received.

    The message never contains the access token.
    """

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class BlockedURLError(FetchError):
    """The URL (or a redirect, or the address it resolves to) is refused by the SSRF guard."""


# ---------------------------------------------------------------------------------------------
# Host policy


def _split_host_port(netloc: str) -> tuple[str, int | None]:
    parsed = urllib.parse.urlsplit(f"//{netloc}")
    try:
        port = parsed.port
    except ValueError as error:
        raise ValueError(f"bad port in {netloc!r}") from error
    return (parsed.hostname or "").lower(), port


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80


@dataclass(frozen=True)
class HostPolicy:
    """Which hosts and addresses a fetch may reach (see the module docstring)."""

    label_studio: tuple[str, int] | None
    """``(host, port)`` of the Label Studio URL, or None when unknown."""
    trusted: frozenset[tuple[str, int | None]]
    """Explicitly allowed ``(host, port)``; port None = any port."""
    suffixes: tuple[str, ...] = ()
    """``.example.com`` from ``*.example.com`` entries: public addresses only."""
    any_public: bool = False
    """``*`` was listed: any host, public addresses only."""

    @classmethod
    def build(cls, hostname: str | None, allowed_hosts: Iterable[str] = ()) -> HostPolicy:
        label_studio = None
        trusted: set[tuple[str, int | None]] = set()
        if hostname:
            parsed = urllib.parse.urlsplit(hostname)
            if parsed.scheme not in ("http", "https") or not parsed.hostname:
                raise FetchError(
                    f"Label Studio URL {hostname!r} must start with http:// or https://"
                )
            label_studio = (parsed.hostname.lower(), parsed.port or _default_port(parsed.scheme))
            trusted.add(label_studio)
        suffixes: list[str] = []
        any_public = False
        for entry in allowed_hosts:
            entry = entry.strip().lower()
            if not entry:
                continue
            if entry == "*":
                any_public = True
            elif entry.startswith("*."):
                suffixes.append(entry[1:])
            else:
                if "://" in entry:
                    entry = urllib.parse.urlsplit(entry).netloc
                try:
                    trusted.add(_split_host_port(entry))
                except ValueError as error:
                    raise FetchError(f"allowed host entry {entry!r}: {error}") from error
        return cls(label_studio, frozenset(trusted), tuple(suffixes), any_public)

    def is_label_studio(self, url: str) -> bool:
        parsed = urllib.parse.urlsplit(url)
        host = (parsed.hostname or "").lower()
        return self.label_studio == (host, parsed.port or _default_port(parsed.scheme))

    def is_trusted(self, host: str, port: int) -> bool:
        host = host.lower().strip("[]")
        return (host, port) in self.trusted or (host, None) in self.trusted

    def may_start_at(self, host: str, port: int) -> bool:
        host = host.lower().strip("[]")
        return (
            self.is_trusted(host, port)
            or self.any_public
            or any(host.endswith(suffix) for suffix in self.suffixes)
        )

    def address_problem(
        self, host: str, port: int, address: ipaddress.IPv4Address | ipaddress.IPv6Address
    ) -> str | None:
        """Why connecting to ``address`` for ``host:port`` is refused, or None if allowed."""
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        if address in _METADATA_ADDRESSES:
            return f"{address} is a cloud metadata address"
        if address.is_link_local:
            return f"{address} is a link-local address"
        if address.is_multicast or address.is_unspecified or address.is_reserved:
            return f"{address} is not a unicast address"
        if self.is_trusted(host, port):
            return None
        if not address.is_global:
            kind = "loopback" if address.is_loopback else "private"
            return (
                f"{address} is a {kind} address and {host} is neither the Label Studio host "
                "nor an allowed host"
            )
        return None

    def check_url(self, url: str, first: bool) -> None:
        """Refuse a URL before any connection: scheme, credentials, host, literal addresses."""
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme not in ("http", "https"):
            raise BlockedURLError(f"only http(s) URLs are fetched, not {parsed.scheme or url!r}:")
        if parsed.username or parsed.password:
            raise BlockedURLError("URLs with credentials in them are not fetched")
        host = (parsed.hostname or "").lower()
        if not host:
            raise BlockedURLError(f"URL {redact_url(url)} has no host")
        try:
            port = parsed.port or _default_port(parsed.scheme)
        except ValueError as error:
            raise BlockedURLError(f"URL {redact_url(url)} has a bad port") from error
        if first and not self.may_start_at(host, port):
            raise BlockedURLError(
                f"{host}:{port} is neither the Label Studio host nor in the allowed hosts "
                "(add it to the allowed hosts setting to fetch images from it)"
            )
        try:
            literal = ipaddress.ip_address(host)
        except ValueError:
            return  # a name: checked on the addresses it resolves to, when connecting
        problem = self.address_problem(host, port, literal)
        if problem:
            raise BlockedURLError(f"refused {'URL' if first else 'redirect'} to {host}: {problem}")


# ---------------------------------------------------------------------------------------------
# Connections checked on the address they actually connect to

_ACTIVE_POLICY: ContextVar[HostPolicy | None] = ContextVar("fetch_host_policy", default=None)


@contextmanager
def policy_in_force(policy: HostPolicy) -> Iterator[None]:
    token = _ACTIVE_POLICY.set(policy)
    try:
        yield
    finally:
        _ACTIVE_POLICY.reset(token)


def _guarded_socket(connection: HTTPConnection) -> socket.socket:
    """Resolve, check every address against the active policy, connect to an allowed one.

    Connecting to the very address that was checked (not re-resolving the name) is what makes
    DNS rebinding useless.
    """
    policy = _ACTIVE_POLICY.get()
    if policy is None:
        raise BlockedURLError("guarded connection opened outside fetch_image_bytes")
    host = connection._dns_host.strip("[]")
    port = connection.port or 80
    candidates = []
    problems = []
    for family, kind, proto, _, sockaddr in socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM):
        address = ipaddress.ip_address(str(sockaddr[0]).split("%")[0])
        problem = policy.address_problem(connection.host, port, address)
        if problem:
            problems.append(problem)
        else:
            candidates.append((family, kind, proto, sockaddr))
    if not candidates:
        raise BlockedURLError(f"refused connection to {connection.host}: {'; '.join(problems)}")
    error: OSError | None = None
    for family, kind, proto, sockaddr in candidates:
        sock = socket.socket(family, kind, proto)
        try:
            for option in connection.socket_options or ():
                sock.setsockopt(*option)
            if isinstance(connection.timeout, (int, float)):
                sock.settimeout(connection.timeout)
            sock.connect(sockaddr)
            return sock
        except OSError as caught:
            error = caught
            sock.close()
    assert error is not None
    raise error


class _GuardedHTTPConnection(HTTPConnection):
    def _new_conn(self) -> socket.socket:
        return _guarded_socket(self)


class _GuardedHTTPSConnection(HTTPSConnection):
    def _new_conn(self) -> socket.socket:
        return _guarded_socket(self)


class _GuardedHTTPPool(HTTPConnectionPool):
    ConnectionCls = _GuardedHTTPConnection


class _GuardedHTTPSPool(HTTPSConnectionPool):
    ConnectionCls = _GuardedHTTPSConnection


class _GuardedAdapter(HTTPAdapter):
    def init_poolmanager(self, *args, **kwargs) -> None:
        super().init_poolmanager(*args, **kwargs)
        self.poolmanager.pool_classes_by_scheme = {
            "http": _GuardedHTTPPool,
            "https": _GuardedHTTPSPool,
        }

    def proxy_manager_for(self, *args, **kwargs):
        raise BlockedURLError("HTTP proxies are not used for image downloads")


class GuardedSession(requests.Session):
    """A session that follows redirects itself (checking each hop) and caps time and bytes.

    The SDK's downloader calls ``get(url, stream=True, headers=..., verify=...)`` and then reads
    ``response.content``; here the body is already read, within the caps, when ``get`` returns.
    """

    def __init__(self, policy: HostPolicy, deadline: float, max_bytes: int):
        super().__init__()
        self.trust_env = False  # no proxies or .netrc credentials from the environment
        self.policy = policy
        self.deadline = deadline
        self.max_bytes = max_bytes
        self.statuses: list[tuple[str, int]] = []
        """``(redacted URL, status)`` of every response, for error reports."""
        self.failure: Exception | None = None
        """The last exception a request raised. The SDK retries a failed upload download on
        another path and then re-raises the *first* error, which would hide this one."""
        adapter = _GuardedAdapter(max_retries=0)
        self.mount("http://", adapter)
        self.mount("https://", adapter)

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise FetchError("timed out fetching the image (FETCH_TIMEOUT)")
        return left

    def request(self, method, url, **kwargs):  # type: ignore[override]
        try:
            return self._follow(method, url, **kwargs)
        except Exception as error:
            self.failure = error
            raise

    def _follow(self, method, url, **kwargs):
        for ignored in ("allow_redirects", "stream", "timeout", "proxies"):
            kwargs.pop(ignored, None)
        headers = dict(kwargs.pop("headers", None) or {})
        for hop in range(MAX_REDIRECTS + 1):
            self.policy.check_url(url, first=hop == 0)
            if not self.policy.is_label_studio(url):
                headers.pop("Authorization", None)  # the token only ever goes to Label Studio
            left = self.remaining()
            response = super().request(
                method,
                url,
                headers=headers,
                allow_redirects=False,
                stream=True,
                timeout=(left, left),
                **kwargs,
            )
            self.statuses.append((redact_url(url), response.status_code))
            if not response.is_redirect:
                self._read_body(response)
                return response
            location = response.headers["location"]
            response.close()
            url = urllib.parse.urljoin(response.url, location)
            if response.status_code == 303 or (
                response.status_code in (301, 302) and method.upper() == "POST"
            ):
                method = "GET"
                kwargs.pop("data", None)
                kwargs.pop("json", None)
        raise FetchError(f"more than {MAX_REDIRECTS} redirects")

    def _read_body(self, response: requests.Response) -> None:
        declared = response.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.max_bytes:
            response.close()
            raise FetchError(
                f"image of {declared} bytes exceeds the cap of {self.max_bytes} bytes (MAX_IMAGE_BYTES)",
                response.status_code,
            )
        chunks = []
        total = 0
        for chunk in response.iter_content(_CHUNK_BYTES):
            total += len(chunk)
            if total > self.max_bytes:
                response.close()
                raise FetchError(
                    f"image exceeds the cap of {self.max_bytes} bytes (MAX_IMAGE_BYTES)",
                    response.status_code,
                )
            chunks.append(chunk)
            self.remaining()
        response._content = b"".join(chunks)
