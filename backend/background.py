"""What background jobs run, whichever runner runs them: a training under the project's lease,
a batch of predictions posted to Label Studio. Plain arguments: the runtime and a project id.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from . import prediction, training
from .leases import TRAIN_LOCK_WAIT, acquire_lease, train_lock_name
from .project import ProjectContext

if TYPE_CHECKING:
    from .runtime import Runtime


def train_with_project_lock(runtime: Runtime, project_id: str, full: bool) -> None:
    """Run one training of ``project_id`` while holding its training lease (waits for it)."""
    lease = acquire_lease(
        runtime.store, train_lock_name(project_id), runtime.settings.train_lock_ttl, TRAIN_LOCK_WAIT
    )
    try:
        training.train(ProjectContext(project_id, runtime=runtime), full=full, fence=lease.fence)
    finally:
        lease.release()


def predict_and_post(runtime: Runtime, project_id: str, tasks: list[dict]) -> None:
    """Predict ``tasks`` and store each prediction in Label Studio."""
    prediction.predict_and_post(ProjectContext(project_id, runtime=runtime), tasks)
