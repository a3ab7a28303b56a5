"""The few Label Studio API calls background jobs make: list annotated tasks, post predictions.

Authentication follows Label Studio 1.23 (see :mod:`.auth`, shared with the image download).

Posting predictions survives an unreachable or overloaded Label Studio without duplicates, under
any timing. :meth:`LabelStudioAPI.post_prediction` first lists the task's predictions
(``GET /api/predictions/?task=<id>``) and returns one of the same ``model_version`` if there is
one. It posts again only after an answer that says nothing was stored (no connection, 408, 429,
503). Once a post has been *sent* and its fate is unknown (no answer in time, the connection
dropped, 500, 502, 504), Label Studio may still store it at any later moment, so no second post
is ever sent: the attempts left only list the task's predictions again (waiting in between),
and if the prediction never shows up the call fails saying so. At most once, never twice: a
prediction lost that way is computed again when Label Studio next asks ``/predict`` for the
task. (Across job runs and processes, the service adds a claim in the state store.)

Error messages never contain the token (it only travels in the ``Authorization`` header).
"""

from __future__ import annotations

import logging
import random
import time

import requests
import urllib3

from . import auth

log = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({0, 408, 429, 500, 502, 503, 504})
"""Outcomes worth retrying: no answer (0), timeouts, rate limiting, server errors."""
MAYBE_DONE_STATUSES = frozenset({500, 502, 504})
"""Answers after which a request may have been carried out all the same (a crash after the
write, a proxy that lost the upstream's answer)."""
MAX_BACKOFF = 60.0


class LabelStudioAPIError(RuntimeError):
    """A Label Studio API call failed; ``status`` is the HTTP status (0: no answer)."""

    def __init__(self, message: str, status: int = 0, sent: bool = True):
        super().__init__(message)
        self.status = status
        self.sent = sent
        """False only when the request certainly never reached Label Studio (no connection)."""

    @property
    def maybe_done(self) -> bool:
        """Whether Label Studio may have carried the request out despite this error."""
        return (self.status == 0 and self.sent) or self.status in MAYBE_DONE_STATUSES


def _never_sent(error: requests.RequestException) -> bool:
    """Whether ``error`` happened before the request left (no connection was made)."""
    if isinstance(error, requests.ConnectTimeout):
        return True
    reason = getattr(error.args[0], "reason", None) if error.args else None
    return isinstance(error, requests.ConnectionError) and isinstance(
        reason or (error.args[0] if error.args else None),
        (urllib3.exceptions.NewConnectionError, urllib3.exceptions.ConnectTimeoutError),
    )


class LabelStudioAPI:
    """A client for one Label Studio instance (``hostname``) and one token."""

    def __init__(
        self,
        hostname: str,
        token: str,
        timeout: float = 30.0,
        retries: int = 5,
        backoff: float = 1.0,
    ):
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
        self.retries = retries
        """Further attempts after a retryable failure (see ``RETRY_STATUSES``)."""
        self.backoff = backoff
        """Seconds before the first retry; doubled at each one, at most ``MAX_BACKOFF``."""
        self.session = requests.Session()
        self.session.trust_env = False  # no proxy or .netrc credentials from the environment

    def _authorization(self) -> str:
        def refresh(url: str, body: dict) -> str:
            answer = self._send("POST", auth.REFRESH_PATH, json=body, authorize=False)
            access = answer.get("access") if isinstance(answer, dict) else None
            if not access or not isinstance(access, str):
                raise LabelStudioAPIError("token refresh answered without an access token")
            return access

        return auth.authorization(auth.access_token(self.hostname, self.token, refresh))

    def _send(self, method: str, path: str, authorize: bool = True, **kwargs):
        url = self.hostname + path
        headers = {"Authorization": self._authorization()} if authorize else {}
        try:
            response = self.session.request(
                method, url, headers=headers, timeout=self.timeout, **kwargs
            )
        except requests.RequestException as error:
            raise LabelStudioAPIError(
                f"Label Studio at {self.hostname} unreachable: {error}", sent=not _never_sent(error)
            ) from (error)
        if response.status_code >= 400:
            raise LabelStudioAPIError(
                f"{method} {path} answered {response.status_code}: {response.text[:300]}",
                status=response.status_code,
            )
        if response.status_code == 204 or not response.content:
            return None  # e.g. a DELETE
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

    def whoami(self) -> dict:
        """The token's user (``GET /api/current-user/whoami``): the cheapest call that proves
        Label Studio accepts the token."""
        return self._send("GET", "/api/current-user/whoami")

    def project_predictions(self, project_id: str) -> list[dict]:
        """Every prediction of a project (``GET /api/predictions/?project=<id>``)."""
        return self._prediction_list({"project": project_id})

    def task_annotations(self, task_id: int) -> list[dict]:
        """A task's annotations (``GET /api/tasks/<id>/annotations/``; unlike ``GET
        /api/tasks/<id>/`` it never makes Label Studio ask the backend for a prediction)."""
        answer = self._send("GET", f"/api/tasks/{task_id}/annotations/")
        return answer if isinstance(answer, list) else []

    def delete_prediction(self, prediction_id: int) -> None:
        """``DELETE /api/predictions/<id>/`` (one already gone counts as deleted)."""
        try:
            self._send("DELETE", f"/api/predictions/{prediction_id}/")
        except LabelStudioAPIError as error:
            if error.status != 404:
                raise

    def task(self, task_id: int) -> dict:
        return self._send("GET", f"/api/tasks/{task_id}/")

    def predictions(self, task_id: int) -> list[dict]:
        """The task's predictions (``GET /api/predictions/?task=<id>``)."""
        return self._prediction_list({"task": task_id})

    def _prediction_list(self, params: dict) -> list[dict]:
        """``GET /api/predictions/`` with ``params``, paginated or not, as a list of dicts."""
        answer = self._send("GET", "/api/predictions/", params=params)
        if isinstance(answer, dict):  # a paginated answer
            answer = answer.get("results")
        if not isinstance(answer, list):
            raise LabelStudioAPIError("the prediction list is not a list")
        return [p for p in answer if isinstance(p, dict)]

    def post_prediction(
        self, task_id: int, result: list[dict], score: float, model_version: str
    ) -> dict:
        """Store one prediction on a task (``POST /api/predictions/``), at most once.

        Returns a prediction of ``model_version`` already on the task instead of posting. A post
        refused before anything was stored is retried; once one was sent without a clear answer
        the attempts left only look for it (see the module docstring). Waits ``backoff`` seconds,
        then twice that, and so on (+-25 % jitter, so many workers do not retry in step).

        Raises:
            LabelStudioAPIError: a non-retryable answer (4xx), the last retryable failure, or a
                post whose fate stayed unknown (``maybe_done``: it was not sent again).
        """
        body = {"task": task_id, "result": result, "score": score, "model_version": model_version}
        unknown: LabelStudioAPIError | None = None  # a sent post whose answer never came
        last: LabelStudioAPIError | None = None
        for attempt in range(self.retries + 1):
            try:
                existing = self.existing_prediction(task_id, model_version)
                if existing is not None:
                    return existing
                if unknown is None:
                    return self._send("POST", "/api/predictions/", json=body)
            except LabelStudioAPIError as error:
                if error.status not in RETRY_STATUSES:
                    raise
                last = error
                if error.maybe_done and unknown is None:
                    unknown = error
                if attempt == self.retries:
                    break
                self._wait(attempt, task_id, error)
                continue
            if attempt < self.retries:  # sent earlier, not listed yet: wait, look again
                self._wait(attempt, task_id, unknown)
        if unknown is None:
            assert last is not None  # every attempt without an error returned
            raise last
        raise LabelStudioAPIError(
            f"the prediction of task {task_id} was sent but Label Studio never confirmed it "
            f"({unknown}); not sent again, so that it cannot be stored twice",
            status=unknown.status,
        )

    def existing_prediction(self, task_id: int, model_version: str) -> dict | None:
        """The task's prediction of ``model_version``, if Label Studio holds one."""
        for existing in self.predictions(task_id):
            if existing.get("model_version") == model_version:
                log.info(
                    "task %s already has a prediction of %s; not posted again",
                    task_id,
                    model_version,
                )
                return existing
        return None

    def _wait(self, attempt: int, task_id: int, error: Exception) -> None:
        """Sleep before attempt ``attempt + 1`` (exponential backoff with jitter)."""
        delay = min(self.backoff * 2**attempt, MAX_BACKOFF)
        delay *= random.uniform(0.75, 1.25)
        log.warning(
            "posting the prediction of task %s: %s; attempt %d/%d in %.1f s",
            task_id,
            error,
            attempt + 2,
            self.retries + 1,
            delay,
        )
        time.sleep(delay)
