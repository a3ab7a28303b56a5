"""Downloading task images safely: Label Studio auth, an SSRF guard, local files, size/time caps.

:func:`fetch_image_bytes` takes a task's image URL as Label Studio stores it and returns the bytes.

* **Label Studio URLs** (``/data/upload/...``, ``upload/...``, ``/storage-data/...``) and cloud
  storage URIs (``s3://``, ``gs://``, ``azure-blob://``, presigned by Label Studio at
  ``/tasks/<id>/presign/``) are resolved by the SDK's ``get_local_path``; every HTTP request it
  makes goes through a guarded :class:`requests.Session` installed with the SDK's
  ``http_session`` hook.
* **Auth**: a legacy API key is sent as ``Authorization: Token <key>``; a personal access token (a
  JWT refresh token) is exchanged at ``POST {hostname}/api/token/refresh/`` for a short-lived
  access token sent as ``Bearer`` (cached for at most ``ACCESS_TOKEN_TTL_S``). The token only
  goes to the Label Studio host, and never into a message, a log line or an exception.
* **SSRF guard**: the first URL must be on the Label Studio host (scheme, host and port) or on an
  ``allowed_hosts`` entry (``host``, ``host:port``, ``*.example.com``, or ``*`` for any public
  host). Redirects are followed by hand (at most ``MAX_REDIRECTS``), re-checked at every hop, and
  the ``Authorization`` header is dropped when leaving the Label Studio host. Every connection is
  checked *when it is opened*, on the resolved address it actually connects to (so DNS rebinding
  gains nothing): link-local addresses (including the cloud metadata service 169.254.169.254),
  multicast, unspecified and reserved ones are always refused; loopback and private addresses
  are allowed only for the Label Studio host and explicitly listed hosts; any other host (one
  Label Studio redirects to, e.g. a presigned S3 URL) must resolve to public addresses only.
  Downloads stop at ``max_bytes`` (decoded) and at ``timeout`` seconds overall.
* **Local files**: ``/data/local-files/?d=<path>`` is read from disk when
  ``LOCAL_FILES_DOCUMENT_ROOT`` is set (read at each call), resolved under that root as Label
  Studio does (a leading ``/`` is relative to the root); paths with ``..`` and paths whose real
  location (symlinks followed) leaves the root are refused. Without the setting they are
  downloaded from Label Studio like uploads.
* **Cache**: downloaded bytes are kept in ``cache_dir`` under a hash of (Label Studio URL, task
  URL), written atomically, so concurrent workers never read half a file. Nothing evicts them:
  point ``cache_dir`` at a disk that can hold the dataset, or clean it periodically.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import ipaddress
import logging
import os
import posixpath
import re
import socket
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass

import jwt
import requests
from label_studio_sdk._extensions.label_studio_tools.core.utils.io import (
    get_local_path,
    http_session,
    local_files_resolver,
    resolve_local_storage_file,
)
from requests.adapters import HTTPAdapter
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

log = logging.getLogger(__name__)

MAX_REDIRECTS = 5
ACCESS_TOKEN_TTL_S = 240.0
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
            raise BlockedURLError(f"URL {_redact_url(url)} has no host")
        try:
            port = parsed.port or _default_port(parsed.scheme)
        except ValueError as error:
            raise BlockedURLError(f"URL {_redact_url(url)} has a bad port") from error
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
def _policy_in_force(policy: HostPolicy) -> Iterator[None]:
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


class _GuardedSession(requests.Session):
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
            self.statuses.append((_redact_url(url), response.status_code))
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


# ---------------------------------------------------------------------------------------------
# Tokens

_TOKEN_CACHE: dict[tuple[str, str], tuple[str, float]] = {}
_TOKEN_LOCK = threading.Lock()


def _jwt_claims(token: str) -> dict | None:
    """Unverified claims of a JWT, or None for anything else (e.g. a legacy 40-hex key)."""
    if token.count(".") != 2:
        return None
    try:
        jwt.get_unverified_header(token)
        claims = jwt.decode(token, options={"verify_signature": False, "verify_exp": False})
    except jwt.PyJWTError:
        return None
    return claims if isinstance(claims, dict) else None


def _credential(session: _GuardedSession, hostname: str, token: str | None) -> str | None:
    """The token to send: a legacy key or an access JWT as is, a personal token exchanged."""
    if not token:
        return None
    claims = _jwt_claims(token)
    if claims is None or claims.get("token_type") == "access":
        return token
    key = (hostname, hashlib.sha256(token.encode()).hexdigest())
    now = time.monotonic()
    with _TOKEN_LOCK:
        cached = _TOKEN_CACHE.get(key)
    if cached and cached[1] > now:
        return cached[0]
    if not hostname:
        raise FetchError("a personal access token needs the Label Studio URL to be exchanged")
    refresh_url = hostname.rstrip("/") + "/api/token/refresh/"
    response = session.post(refresh_url, json={"refresh": token})
    if response.status_code in (401, 403):
        raise FetchError(
            f"Label Studio refused the personal access token at /api/token/refresh/ "
            f"({response.status_code}); create a new one in Account & Settings",
            response.status_code,
        )
    if not response.ok:
        raise FetchError(
            f"token exchange at /api/token/refresh/ answered {response.status_code}",
            response.status_code,
        )
    try:
        access = response.json()["access"]
    except (ValueError, KeyError, TypeError) as error:
        raise FetchError(
            "token exchange at /api/token/refresh/ returned no access token"
        ) from error
    if not isinstance(access, str) or not access:
        raise FetchError("token exchange at /api/token/refresh/ returned no access token")
    lifetime = ACCESS_TOKEN_TTL_S
    expiry = (_jwt_claims(access) or {}).get("exp")
    if isinstance(expiry, (int, float)):
        lifetime = min(lifetime, expiry - time.time() - 30)
    with _TOKEN_LOCK:
        _TOKEN_CACHE[key] = (access, now + max(lifetime, 0.0))
    return access


# ---------------------------------------------------------------------------------------------
# Redaction

_SECRET_QUERY = re.compile(
    r"(?i)([?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|"
    r"x-goog-credential|signature|sig|token|access_token|key)=)[^&#\s'\"]*"
)


def _redact_url(url: str) -> str:
    """A URL for messages: signature-like query values (presigned URLs) blanked out."""
    return _SECRET_QUERY.sub(r"\1[redacted]", url)


def _redact(text: str, secrets: Iterable[str | None]) -> str:
    for secret in secrets:
        if secret:
            text = text.replace(secret, "[redacted]")
    return _redact_url(text)


# ---------------------------------------------------------------------------------------------
# Local files, data URIs, cache


def _local_files_root() -> str | None:
    root = os.environ.get("LOCAL_FILES_DOCUMENT_ROOT", "").strip()
    if not root:
        return None
    real_root = os.path.realpath(root)
    if real_root == os.path.realpath(os.sep):
        log.warning("LOCAL_FILES_DOCUMENT_ROOT=/ would expose every file; local files disabled")
        return None
    return real_root


def _is_local_files_url(url: str) -> bool:
    return url.startswith("/data/") and "?d=" in url  # the SDK's own test


def _local_file_resolver(root: str):
    def resolve(relative_path: str) -> str:
        if "\x00" in relative_path:
            raise BlockedURLError("local file path contains a NUL byte")
        if ".." in re.split(r"[\\/]", relative_path):
            raise BlockedURLError(f"local file path {relative_path!r} contains '..'")
        # As in Label Studio's /data/local-files/ view: the path is relative to the root even
        # when it starts with "/".
        candidate = os.path.join(root, posixpath.normpath(relative_path).lstrip("/"))
        real = os.path.realpath(candidate)
        if os.path.commonpath([real, root]) != root:
            raise BlockedURLError(
                f"local file {relative_path!r} resolves outside LOCAL_FILES_DOCUMENT_ROOT"
            )
        if not os.path.isfile(real):
            raise FetchError(
                f"local file {relative_path!r} not found under LOCAL_FILES_DOCUMENT_ROOT", 404
            )
        return real

    return resolve


def _read_file(path: str, max_bytes: int) -> bytes:
    with open(path, "rb") as handle:
        size = os.fstat(handle.fileno()).st_size
        if size > max_bytes:
            raise FetchError(
                f"image of {size} bytes exceeds the cap of {max_bytes} bytes (MAX_IMAGE_BYTES)"
            )
        data = handle.read(max_bytes + 1)
    if len(data) > max_bytes:  # the file grew while being read
        raise FetchError(f"image exceeds the cap of {max_bytes} bytes (MAX_IMAGE_BYTES)")
    return data


def _decode_data_uri(url: str, max_bytes: int) -> bytes:
    header, comma, payload = url.partition(",")
    if not comma:
        raise FetchError("malformed data: URI (no comma)")
    if len(payload) > max_bytes * 4 // 3 + 8:
        raise FetchError(f"data: URI image exceeds the cap of {max_bytes} bytes (MAX_IMAGE_BYTES)")
    if header.endswith(";base64"):
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as error:
            raise FetchError("malformed base64 in data: URI") from error
    else:
        data = urllib.parse.unquote_to_bytes(payload)
    if len(data) > max_bytes:
        raise FetchError(f"data: URI image exceeds the cap of {max_bytes} bytes (MAX_IMAGE_BYTES)")
    return data


def _cache_file(cache_dir: str, hostname: str, url: str) -> str:
    digest = hashlib.sha256(f"{hostname}\n{url}".encode()).hexdigest()
    return os.path.join(cache_dir, f"{digest}.img")


def _cache_store(path: str, data: bytes) -> None:
    temporary = None
    try:
        handle, temporary = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".part")
        with os.fdopen(handle, "wb") as out:
            out.write(data)
        os.replace(temporary, path)  # atomic: readers see the old state or the whole file
    except OSError as error:
        log.warning("could not cache a downloaded image: %s", error)
        if temporary and os.path.exists(temporary):
            os.unlink(temporary)


# ---------------------------------------------------------------------------------------------


def fetch_image_bytes(
    url: str,
    *,
    hostname: str | None,
    access_token: str | None,
    task_id: int | None = None,
    cache_dir: str,
    max_bytes: int,
    timeout: float,
    allowed_hosts: Iterable[str] = (),
) -> bytes:
    """The bytes of a task's image (see the module docstring for what is fetched and how).

    Args:
        url: the task's image URL as Label Studio stores it.
        hostname: Label Studio URL from ``/setup`` (else ``LABEL_STUDIO_URL``).
        access_token: legacy API key or personal access token (else ``LABEL_STUDIO_API_KEY``).
        task_id: needed for cloud storage URIs (presigned per task).
        cache_dir: where downloads are cached (created if missing).
        max_bytes: cap on the image size.
        timeout: cap on the whole fetch, in seconds (token exchange and redirects included).
        allowed_hosts: further hosts images may come from.

    Raises:
        BlockedURLError: the URL, a redirect or an address is refused.
        FetchError: anything else (``status`` set when Label Studio or the host answered).
    """
    if not isinstance(url, str) or not url.strip():
        raise FetchError("task has an empty image URL")
    url = url.strip()
    hostname = (
        hostname or os.environ.get("LABEL_STUDIO_URL") or os.environ.get("LABEL_STUDIO_HOST") or ""
    ).rstrip("/")
    token = access_token or os.environ.get("LABEL_STUDIO_API_KEY") or None
    secrets: list[str | None] = [token]
    shown_url = _redact_url(url if len(url) < 300 else url[:300] + "...")
    session: _GuardedSession | None = None
    try:
        if url.startswith("data:"):
            return _decode_data_uri(url, max_bytes)
        root = _local_files_root()
        if root and _is_local_files_url(url):
            with local_files_resolver(_local_file_resolver(root)):
                path = resolve_local_storage_file(url)
            return _read_file(path, max_bytes)
        if _is_local_files_url(url) and hostname:
            # Not readable here: download it from Label Studio, which serves it with auth.
            url = hostname + url

        os.makedirs(cache_dir, exist_ok=True)
        cached = _cache_file(cache_dir, hostname, url)
        if os.path.isfile(cached):
            return _read_file(cached, max_bytes)

        policy = HostPolicy.build(hostname, allowed_hosts)
        session = _GuardedSession(policy, time.monotonic() + timeout, max_bytes)
        with session, http_session(session), _policy_in_force(policy):
            # Only Label Studio gets the token, so only its URLs need a (possibly exchanged) one.
            needs_token = not url.startswith(("http://", "https://")) or policy.is_label_studio(url)
            credential = _credential(session, hostname, token) if needs_token else None
            secrets.append(credential)
            # A scratch directory per call: the SDK writes its download there, and no other
            # call can see the file half-written.
            with tempfile.TemporaryDirectory(dir=cache_dir, prefix="fetch-") as scratch:
                path = get_local_path(
                    url,
                    cache_dir=scratch,
                    hostname=hostname or None,
                    access_token=credential,
                    task_id=task_id,
                    # The SDK would otherwise look for uploads in this machine's own Label
                    # Studio data directory, bypassing auth and the caps; point it nowhere.
                    image_dir=os.path.join(scratch, "no-local-uploads"),
                )
                data = _read_file(path, max_bytes)
        _cache_store(cached, data)
        return data
    except Exception as error:
        raise _as_fetch_error(error, session, shown_url, timeout, secrets) from None


def _as_fetch_error(
    error: Exception,
    session: _GuardedSession | None,
    shown_url: str,
    timeout: float,
    secrets: list[str | None],
) -> FetchError:
    """One :class:`FetchError` with a redacted message for whatever went wrong."""
    if session is not None and session.failure is not None and not isinstance(error, FetchError):
        error = session.failure  # the SDK re-raised an earlier, less telling error
    if isinstance(error, FetchError):
        error.args = (_redact(f"{shown_url}: {error}", secrets),)
        return error
    if isinstance(error, requests.HTTPError):
        status = session.statuses[-1][1] if session and session.statuses else None
        if status is None and error.response is not None:
            status = error.response.status_code
        return FetchError(_redact(_status_message(shown_url, status), secrets), status)
    if isinstance(error, requests.Timeout):
        return FetchError(f"{shown_url}: timed out after {timeout:g} s (FETCH_TIMEOUT)")
    if isinstance(error, requests.ConnectionError):
        return FetchError(_redact(f"{shown_url}: cannot connect ({error})", secrets))
    # The SDK raises bare Exception, ValueError, FileNotFoundError... with useful messages.
    return FetchError(_redact(f"{shown_url}: {error}", secrets))


def _status_message(url: str, status: int | None) -> str:
    hints = {
        401: "check the Label Studio API key given to the backend",
        403: "the API key's user has no access to this project or file",
        404: "no such file on Label Studio",
    }
    hint = hints.get(status or 0, "")
    return f"{url}: answered HTTP {status}" + (f" ({hint})" if hint else "")
