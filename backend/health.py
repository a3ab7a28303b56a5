"""What stops pre-labels, found before the first task: models that failed to load, and a Label
Studio that refuses (or cannot be reached with) the backend's token.

Label Studio 1.23 shows a backend's trouble in one place only: the model card's *Error* state,
whose text is the error of the last ``/setup`` call (``ml/models.py`` ``update_state``). And it
keeps only ``str(HTTPError)`` of that call, ``"503 Server Error: <reason phrase> for url: ..."``,
never the body: so ``/setup`` answers such a problem with 503 and the message as its HTTP reason
phrase (``backend.server``), ``/health`` lists it, and it is logged once, with the fix.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from dataclasses import dataclass

from labelstudio.api import LabelStudioAPI, LabelStudioAPIError
from labelstudio.redaction import redact_url

log = logging.getLogger("oneshot.health")

CHECK_TIMEOUT_S = 2.0
"""Label Studio gives ``/setup`` 3 s, and the token check runs inside it."""
OK_TTL_S = 600.0
"""How long a token Label Studio accepted is trusted without asking again."""
REFUSED_TTL_S = 20.0
"""How long a refusal is remembered: short, so a fixed token is noticed at the next ``/setup``
(Label Studio calls it whenever the model card or the Data Manager asks for the backend)."""

TOKEN_FIX = (
    "Label Studio 1.23 organisations accept only personal access tokens by default. Fix: copy "
    "one from Label Studio (Account & Settings > Personal Access Token) and start the backend "
    "with LABEL_STUDIO_URL={url} LABEL_STUDIO_API_KEY=<that token>, or run Label Studio with "
    "scripts/label_studio.sh (legacy tokens on)"
)


@dataclass
class _Check:
    problem: str | None
    checked_at: float


class ConnectionChecks:
    """One cheap authenticated call to Label Studio per (URL, token), cached; thread-safe."""

    def __init__(self) -> None:
        self._results: dict[tuple[str, str], _Check] = {}
        self._lock = threading.Lock()

    def problem(self, hostname: str | None, token: str | None) -> str | None:
        """Why the backend cannot use Label Studio at ``hostname`` with ``token`` (refused,
        unreachable), or ``None`` when it can or there is nothing to check."""
        if not hostname or not token:
            return None
        key = (hostname.rstrip("/"), hashlib.sha256(token.encode()).hexdigest())
        with self._lock:
            cached = self._results.get(key)
        if cached is not None:
            ttl = OK_TTL_S if cached.problem is None else REFUSED_TTL_S
            if time.monotonic() - cached.checked_at < ttl:
                return cached.problem
        problem = check_connection(hostname, token)
        with self._lock:
            previous = self._results.get(key)
            self._results[key] = _Check(problem, time.monotonic())
        if problem and (previous is None or previous.problem != problem):
            log.error("%s", problem)  # once per new problem, not at every /setup
        elif problem is None and previous is not None and previous.problem:
            log.info("Label Studio at %s accepts the backend's token again", redact_url(hostname))
        return problem

    def known_problems(self) -> list[str]:
        """Problems found by recent checks (for ``/health``; no call is made)."""
        now = time.monotonic()
        with self._lock:
            return sorted(
                {
                    check.problem
                    for check in self._results.values()
                    if check.problem and now - check.checked_at < 10 * REFUSED_TTL_S
                }
            )


def check_connection(hostname: str, token: str) -> str | None:
    """Ask Label Studio who the token belongs to; the problem in words, or ``None``."""
    url = redact_url(hostname.rstrip("/"))
    try:
        LabelStudioAPI(hostname, token, timeout=CHECK_TIMEOUT_S, retries=0).whoami()
    except LabelStudioAPIError as error:
        if error.status in (401, 403):
            return (
                f"Label Studio at {url} refused the backend's API token (HTTP {error.status}): "
                "no image can be downloaded, so there are no pre-labels and no training. "
                + TOKEN_FIX.format(url=url)
            )
        if error.status == 0:
            return (
                f"Label Studio at {url} cannot be reached from the backend ({error}): images "
                "cannot be downloaded. Fix: set LABEL_STUDIO_URL to an address the backend "
                "reaches (and LABEL_STUDIO_HOST in Label Studio)"
            )
        return None  # any other answer: Label Studio is there and took the token
    return None


def model_problem(error: BaseException | None) -> str | None:
    """The message of a failed model load, with where to look."""
    if error is None:
        return None
    return (
        f"the models failed to load ({type(error).__name__}: {error}); nothing can be "
        "predicted or learned. Fix: check SAM_MODEL_TYPE, SAM_CHECKPOINT, ENCODER, "
        "ENCODER_CHECKPOINT, DEVICE and MODEL_DIR (the backend log has the traceback), then "
        "restart the backend"
    )


def reason_phrase(message: str, limit: int = 600) -> str:
    """``message`` as an HTTP reason phrase: printable ASCII on one line (Label Studio shows
    the reason phrase of a failed ``/setup``, see the module docstring)."""
    text = " ".join(message.split())
    text = text.encode("ascii", "replace").decode("ascii")
    return text if len(text) <= limit else text[: limit - 3] + "..."
