"""The few Label Studio API calls background jobs make: list annotated tasks, post predictions.

Authentication follows Label Studio 1.23: a legacy token goes as ``Authorization: Token <key>``;
a personal access token (a JWT refresh token) is exchanged at ``POST /api/token/refresh/`` for a
short-lived access token sent as ``Bearer`` (the personal token itself gets 401).
"""

from __future__ import annotations

import base64
import json
import logging
import threading
import time

import requests

log = logging.getLogger(__name__)

ACCESS_TOKEN_LIFETIME = 240.0
"""Seconds an exchanged access token is reused (Label Studio issues them for 5 minutes)."""


class LabelStudioAPIError(RuntimeError):
    """A Label Studio API call failed; ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


def jwt_token_type(token: str) -> str | None:
    """The ``token_type`` claim of a JWT (``refresh`` for Label Studio's personal access tokens,
    ``access`` for exchanged ones); ``None`` when ``token`` is not a JWT (a legacy token)."""
    parts = token.split(".")
    if len(parts) != 3:
        return None
    try:
        padded = parts[1] + "=" * (-len(parts[1]) % 4)
        claims = json.loads(base64.urlsafe_b64decode(padded))
    except (ValueError, UnicodeDecodeError):
        return None
    return str(claims.get("token_type", "access")) if isinstance(claims, dict) else None


_access_tokens: dict[tuple[str, str], tuple[str, float]] = {}
_access_lock = threading.Lock()


class LabelStudioAPI:
    """A client for one Label Studio instance (``hostname``) and one token."""

    def __init__(self, hostname: str, token: str, timeout: float = 30.0):
        if not hostname:
            raise LabelStudioAPIError(
                "no Label Studio URL: connect the backend from Label Studio (it sends its "
                "hostname at /setup) or set LABEL_STUDIO_URL"
            )
        if not token:
            raise LabelStudioAPIError(
                "no Label Studio API key: Label Studio sends one at /setup, or set "
                "LABEL_STUDIO_API_KEY"
            )
        self.hostname = hostname.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.session = requests.Session()

    def _authorization(self) -> str:
        kind = jwt_token_type(self.token)
        if kind is None:
            return f"Token {self.token}"
        if kind != "refresh":
            return f"Bearer {self.token}"
        key = (self.hostname, self.token)
        with _access_lock:
            cached = _access_tokens.get(key)
            if cached and cached[1] > time.monotonic():
                return f"Bearer {cached[0]}"
        answer = self._send(
            "POST", "/api/token/refresh/", json={"refresh": self.token}, authorize=False
        )
        access = answer.get("access") if isinstance(answer, dict) else None
        if not access:
            raise LabelStudioAPIError("token refresh answered without an access token")
        with _access_lock:
            _access_tokens[key] = (access, time.monotonic() + ACCESS_TOKEN_LIFETIME)
        return f"Bearer {access}"

    def _send(self, method: str, path: str, authorize: bool = True, **kwargs):
        url = self.hostname + path
        headers = {"Authorization": self._authorization()} if authorize else {}
        try:
            response = self.session.request(
                method, url, headers=headers, timeout=self.timeout, **kwargs
            )
        except requests.RequestException as error:
            raise LabelStudioAPIError(
                f"Label Studio at {self.hostname} unreachable: {error}"
            ) from (error)
        if response.status_code >= 400:
            raise LabelStudioAPIError(
                f"{method} {path} answered {response.status_code}: {response.text[:300]}",
                status=response.status_code,
            )
        try:
            return response.json()
        except ValueError as error:
            raise LabelStudioAPIError(f"{method} {path} answered non-JSON: {error}") from error

    # --- calls ---------------------------------------------------------------------------
    def annotated_tasks(self, project_id: str) -> list[dict]:
        """Every task of the project that has annotations, each with ``data`` and
        ``annotations`` (Label Studio's JSON export of finished tasks)."""
        tasks = self._send(
            "GET", f"/api/projects/{project_id}/export", params={"exportType": "JSON"}
        )
        if not isinstance(tasks, list):
            raise LabelStudioAPIError("the project export is not a list of tasks")
        return tasks

    def task(self, task_id: int) -> dict:
        return self._send("GET", f"/api/tasks/{task_id}/")

    def post_prediction(
        self, task_id: int, result: list[dict], score: float, model_version: str
    ) -> dict:
        """Store one prediction on a task (``POST /api/predictions/``)."""
        return self._send(
            "POST",
            "/api/predictions/",
            json={
                "task": task_id,
                "result": result,
                "score": score,
                "model_version": model_version,
            },
        )
