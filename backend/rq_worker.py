"""RQ entry points: the functions ``rq worker`` processes run (by dotted name, see
:class:`backend.jobs.RQJobs`). Each builds what it needs from the process runtime.
"""

from __future__ import annotations

import time

from .background import predict_and_post, train_with_project_lock
from .jobs import full_training_requested, training_requested
from .runtime import get_runtime


def rq_train(project_id: str) -> None:
    """RQ job: one coalesced training of ``project_id`` (see the module docstring)."""
    runtime = get_runtime()
    time.sleep(runtime.settings.train_debounce)
    store = runtime.store
    # Clear the flag before reading anything: a request arriving from now on enqueues a new job.
    training_requested(store, project_id).clear()
    full = full_training_requested(store, project_id).pop()
    train_with_project_lock(runtime, project_id, full)


def rq_retry_training(project_id: str) -> None:
    """RQ scheduled job: request a training again (see :meth:`RQJobs.retry_training_later`)."""
    get_runtime().jobs.request_training(project_id)


def rq_predict(project_id: str, tasks: list[dict]) -> None:
    """RQ job: predict ``tasks`` and post the predictions to Label Studio."""
    predict_and_post(get_runtime(), project_id, tasks)
