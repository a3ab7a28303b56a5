"""Errors the backend answers with an HTTP status, and the per-task input errors it tolerates."""

from __future__ import annotations

from labelstudio.download import FetchError
from matcher_core.imageio import ImageError

from .store import StoreError

# Errors of one task's input (its image, its annotation): reported for that task, never fatal.
TASK_INPUT_ERRORS = (FetchError, ImageError, ValueError)


class BackendError(Exception):
    """A request the backend refuses or cannot serve; ``status`` is the HTTP status to answer."""

    status = 500

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        if status is not None:
            self.status = status


class BadRequest(BackendError):
    status = 400


class ServiceUnavailable(BackendError):
    status = 503


class LimitExceeded(BackendError):
    """A request over one of the documented limits (the message names the setting)."""

    status = 413


def store_failure(error: StoreError) -> BackendError:
    """The HTTP error for a store failure: 503 unreachable, 507 project over its byte cap."""
    return BackendError(f"state store unavailable: {error}", status=error.http_status)
