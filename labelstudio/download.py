"""Task image bytes, downloaded safely: Label Studio auth, an SSRF guard, local files, size/time caps.

:func:`fetch_image_bytes` takes a task's image URL as Label Studio stores it and returns the bytes.

* **Label Studio URLs** (``/data/upload/...``, ``upload/...``, ``/storage-data/...``) and cloud
  storage URIs (``s3://``, ``gs://``, ``azure-blob://``, presigned by Label Studio at
  ``/tasks/<id>/presign/``) are resolved by the SDK's ``get_local_path``; every HTTP request it
  makes goes through a guarded :class:`requests.Session` installed with the SDK's
  ``http_session`` hook.
* **Auth**: a legacy API key is sent as ``Authorization: Token <key>``; a personal access token (a
  JWT refresh token) is exchanged at ``POST {hostname}/api/token/refresh/`` for a short-lived
  access token sent as ``Bearer`` (see :mod:`.auth`). The token only
  goes to the Label Studio host, and never into a message, a log line or an exception.
* **SSRF guard**: see :mod:`.guard` (first URL, every redirect and every connection checked).
* **Local files**: ``/data/local-files/?d=<path>`` is read from disk when
  ``local_files_root`` is given (the ``LOCAL_FILES_DOCUMENT_ROOT`` setting), resolved under that root as Label
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
import logging
import os
import posixpath
import re
import tempfile
import time
import urllib.parse
from collections.abc import Iterable

import requests
from label_studio_sdk._extensions.label_studio_tools.core.utils.io import (
    get_local_path,
    http_session,
    local_files_resolver,
    resolve_local_storage_file,
)

from . import auth
from .guard import BlockedURLError, FetchError, GuardedSession, HostPolicy, policy_in_force
from .redaction import redact, redact_url

log = logging.getLogger(__name__)


def _local_files_root(root: str | None) -> str | None:
    """The real path of ``LOCAL_FILES_DOCUMENT_ROOT``, or None when local files are off."""
    root = (root or "").strip()
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
    local_files_root: str | None = None,
) -> bytes:
    """The bytes of a task's image (see the module docstring for what is fetched and how).

    Args:
        url: the task's image URL as Label Studio stores it.
        hostname: Label Studio URL (``LABEL_STUDIO_URL``, else ``/setup``'s).
        access_token: legacy API key or personal access token.
        task_id: needed for cloud storage URIs (presigned per task).
        cache_dir: where downloads are cached (created if missing).
        max_bytes: cap on the image size.
        timeout: cap on the whole fetch, in seconds (token exchange and redirects included).
        allowed_hosts: further hosts images may come from.
        local_files_root: ``LOCAL_FILES_DOCUMENT_ROOT`` (None: local files come from Label Studio).

    Raises:
        BlockedURLError: the URL, a redirect or an address is refused.
        FetchError: anything else (``status`` set when Label Studio or the host answered).
    """
    if not isinstance(url, str) or not url.strip():
        raise FetchError("task has an empty image URL")
    url = url.strip()
    hostname = (hostname or "").rstrip("/")
    token = access_token or None
    secrets: list[str | None] = [token]
    shown_url = redact_url(url if len(url) < 300 else url[:300] + "...")
    session: GuardedSession | None = None
    try:
        if url.startswith("data:"):
            return _decode_data_uri(url, max_bytes)
        root = _local_files_root(local_files_root)
        if root and _is_local_files_url(url):
            return _read_local_file(root, url, max_bytes)
        if _is_local_files_url(url) and hostname:
            # Not readable here: download it from Label Studio, which serves it with auth.
            url = hostname + url

        os.makedirs(cache_dir, exist_ok=True)
        cached = _cache_file(cache_dir, hostname, url)
        if os.path.isfile(cached):
            return _read_file(cached, max_bytes)

        policy = HostPolicy.build(hostname, allowed_hosts)
        session = GuardedSession(policy, time.monotonic() + timeout, max_bytes)
        data = _download(session, url, hostname, token, task_id, cache_dir, secrets)
        _cache_store(cached, data)
        return data
    except Exception as error:
        raise _as_fetch_error(error, session, shown_url, timeout, secrets) from None


def _read_local_file(root: str, url: str, max_bytes: int) -> bytes:
    """A ``/data/local-files/?d=...`` image read from under ``root``
    (``LOCAL_FILES_DOCUMENT_ROOT``), as Label Studio resolves it."""
    with local_files_resolver(_local_file_resolver(root)):
        path = resolve_local_storage_file(url)
    return _read_file(path, max_bytes)


def _download(
    session: GuardedSession,
    url: str,
    hostname: str,
    token: str | None,
    task_id: int | None,
    cache_dir: str,
    secrets: list[str | None],
) -> bytes:
    """Download ``url`` through the SDK on the guarded ``session`` (its policy in force); the
    credential sent to Label Studio is added to ``secrets`` (redacted from errors)."""
    policy = session.policy
    with session, http_session(session), policy_in_force(policy):
        # Only Label Studio gets the token, so only its URLs need a (possibly exchanged) one.
        needs_token = not url.startswith(("http://", "https://")) or policy.is_label_studio(url)
        credential = _credential(session, hostname, token) if needs_token and token else None
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
            return _read_file(path, max_bytes=session.max_bytes)


def _credential(session: GuardedSession, hostname: str, token: str) -> str:
    """The token to send (see :func:`.auth.access_token`), exchanged through ``session``."""
    if not hostname and auth.jwt_token_type(token) == "refresh":
        raise FetchError("a personal access token needs the Label Studio URL to be exchanged")

    def refresh(url: str, body: dict) -> str:
        response = session.post(url, json=body)
        if response.status_code in (401, 403):
            raise FetchError(
                f"Label Studio refused the personal access token at {auth.REFRESH_PATH} "
                f"({response.status_code}); create a new one in Account & Settings",
                response.status_code,
            )
        if not response.ok:
            raise FetchError(
                f"token exchange at {auth.REFRESH_PATH} answered {response.status_code}",
                response.status_code,
            )
        try:
            access = response.json()["access"]
        except (ValueError, KeyError, TypeError) as error:
            raise FetchError(
                f"token exchange at {auth.REFRESH_PATH} returned no access token"
            ) from error
        if not isinstance(access, str) or not access:
            raise FetchError(f"token exchange at {auth.REFRESH_PATH} returned no access token")
        return access

    return auth.access_token(hostname, token, refresh)


def _as_fetch_error(
    error: Exception,
    session: GuardedSession | None,
    shown_url: str,
    timeout: float,
    secrets: list[str | None],
) -> FetchError:
    """One :class:`FetchError` with a redacted message for whatever went wrong."""
    if session is not None and session.failure is not None and not isinstance(error, FetchError):
        error = session.failure  # the SDK re-raised an earlier, less telling error
    if isinstance(error, FetchError):
        error.args = (redact(f"{shown_url}: {error}", secrets),)
        return error
    if isinstance(error, requests.HTTPError):
        status = session.statuses[-1][1] if session and session.statuses else None
        if status is None and error.response is not None:
            status = error.response.status_code
        return FetchError(redact(_status_message(shown_url, status), secrets), status)
    if isinstance(error, requests.Timeout):
        return FetchError(f"{shown_url}: timed out after {timeout:g} s (FETCH_TIMEOUT)")
    if isinstance(error, requests.ConnectionError):
        return FetchError(redact(f"{shown_url}: cannot connect ({error})", secrets))
    # The SDK raises bare Exception, ValueError, FileNotFoundError... with useful messages.
    return FetchError(redact(f"{shown_url}: {error}", secrets))


def _status_message(url: str, status: int | None) -> str:
    hints = {
        401: "check the Label Studio API key given to the backend",
        403: "the API key's user has no access to this project or file",
        404: "no such file on Label Studio",
    }
    hint = hints.get(status or 0, "")
    return f"{url}: answered HTTP {status}" + (f" ({hint})" if hint else "")
