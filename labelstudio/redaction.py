"""Secrets out of URLs and messages: the one redaction used for logs, errors and ``/health``.

Two kinds of secret travel in URLs: a password in the user-info part (``redis://:pw@host``,
shown as ``***``) and signature-like query values of presigned URLs (``?X-Amz-Signature=...``,
shown as ``[redacted]``). :func:`redact_url` blanks both, so every caller means the same thing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from urllib.parse import urlsplit, urlunsplit

REDACTED = "[redacted]"

_SECRET_QUERY = re.compile(
    r"(?i)([?&](?:x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|"
    r"x-goog-credential|signature|sig|token|access_token|key)=)[^&#\s'\"]*"
)


def _without_password(url: str) -> str:
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:  # not a URL (e.g. a message that merely contains one)
        return url
    if password is None:
        return url
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    user = parts.username or ""
    return urlunsplit((parts.scheme, f"{user}:***@{host}", parts.path, parts.query, parts.fragment))


def redact_url(url: str | None) -> str | None:
    """``url`` for logs and messages: a password as ``***``, signature-like query values as
    ``[redacted]``; ``None`` and ``""`` unchanged."""
    if not url:
        return url
    return _SECRET_QUERY.sub(r"\1" + REDACTED, _without_password(url))


def redact(text: str, secrets: Iterable[str | None]) -> str:
    """``text`` (a message) with each of ``secrets`` and signature-like query values blanked."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, REDACTED)
    return _SECRET_QUERY.sub(r"\1" + REDACTED, text)
