"""Label Studio credentials: token kinds and the one personal-access-token exchange.

Label Studio 1.23 accepts a legacy API key as ``Authorization: Token <key>`` and a short-lived
access JWT as ``Bearer``. A personal access token is a JWT *refresh* token: it is exchanged at
``POST {hostname}/api/token/refresh/`` for an access token, which is cached (per Label Studio and
token) until 30 s before its ``exp``, at most ``ACCESS_TOKEN_TTL_S``.

Both the image download (:mod:`.download`) and the API client (:mod:`.api`) go through
:func:`access_token`; each brings its own transport (``refresh``) and error type.
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
import time
from collections.abc import Callable

ACCESS_TOKEN_TTL_S = 240.0
"""Seconds an exchanged access token is reused at most (Label Studio issues them for 5 min)."""
EXPIRY_MARGIN_S = 30.0
"""An access token is not reused in its last seconds (clock skew, request time)."""
REFRESH_PATH = "/api/token/refresh/"

_CACHE: dict[tuple[str, str], tuple[str, float]] = {}
_LOCK = threading.Lock()


def jwt_claims(token: str) -> dict | None:
    """Unverified claims of a JWT, or None for anything else (e.g. a legacy 40-hex key).

    The payload segment is decoded directly rather than with PyJWT: the backend holds no key, the
    claims only tell token kinds apart, and PyJWT's unverified decode still rejects a signature
    segment it cannot base64-decode.
    """
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, UnicodeDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


def jwt_token_type(token: str) -> str | None:
    """``refresh`` (a personal access token), ``access`` (an exchanged one, also a JWT without
    ``token_type``), or None when ``token`` is not a JWT (a legacy key)."""
    claims = jwt_claims(token)
    if claims is None:
        return None
    return str(claims.get("token_type", "access"))


def authorization(token: str) -> str:
    """The ``Authorization`` header for a legacy key or an access token."""
    return f"Token {token}" if jwt_token_type(token) is None else f"Bearer {token}"


def access_token(hostname: str, token: str, refresh: Callable[[str, dict], object]) -> str:
    """The token to send to ``hostname``: a legacy key or an access JWT as is, a personal access
    token exchanged (cached).

    Args:
        hostname: the Label Studio URL (part of the cache key).
        token: what the user configured.
        refresh: ``(url, json body) -> access token``: posts the exchange and raises the caller's
            own error type when Label Studio refuses it or answers without an access token.
    """
    if jwt_token_type(token) != "refresh":
        return token
    hostname = hostname.rstrip("/")
    key = (hostname, hashlib.sha256(token.encode()).hexdigest())
    now = time.monotonic()
    with _LOCK:
        cached = _CACHE.get(key)
    if cached and cached[1] > now:
        return cached[0]
    access = refresh(hostname + REFRESH_PATH, {"refresh": token})
    if not isinstance(access, str) or not access:
        raise ValueError("refresh must return the access token")
    lifetime = ACCESS_TOKEN_TTL_S
    expiry = (jwt_claims(access) or {}).get("exp")
    if isinstance(expiry, (int, float)):
        lifetime = min(lifetime, expiry - time.time() - EXPIRY_MARGIN_S)
    with _LOCK:
        _CACHE[key] = (access, now + max(lifetime, 0.0))
    return access


def forget_access_tokens() -> None:
    """Drop every cached access token (tests; a rotated personal token)."""
    with _LOCK:
        _CACHE.clear()
