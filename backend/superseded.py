"""Superseded predictions of unlabeled tasks are removed after a training changes the version.

Why: Label Studio 1.23 keeps every prediction ever stored. After each new model version an
unlabeled task would gain one more tab (13 predictions for 6 tasks after one retraining), and
opening a task asks the backend only when the task has *no* prediction, so the stale one stays
what the annotator sees. Removing this backend's older predictions of tasks nobody annotated leaves
each such task at most one prediction, of the current version, fetched on open, by "Retrieve
Predictions" or by the label stream.

Never removed: predictions of tasks with any annotation (skipped ones included; an annotation may
point to one as its ``parent_prediction``), the current version's, and versions this backend did
not make (another model's on the same project).
"""

from __future__ import annotations

import logging
import re
from collections import defaultdict

from labelstudio.api import LabelStudioAPI, LabelStudioAPIError

from .store import ProjectState

log = logging.getLogger("oneshot.model")

OWN_VERSION = re.compile(
    r"^(?:rnd-)?g\d+-[0-9a-f]{6}$"  # this backend's versions
    r"|^oneshot-(?:random-)?[0-9a-f]{12}$|^oneshot-waiting$"  # and those of earlier releases
)


def superseded_by_task(predictions: list[dict], current_version: str) -> dict[int, list[int]]:
    """Task id -> ids of its predictions made by this backend under another version."""
    by_task: dict[int, list[int]] = defaultdict(list)
    for prediction in predictions:
        version = prediction.get("model_version") or ""
        if version != current_version and OWN_VERSION.match(version):
            by_task[prediction.get("task")].append(prediction.get("id"))
    return dict(by_task)


def remove_superseded(api: LabelStudioAPI, state: ProjectState) -> int:
    """Delete this backend's predictions of older versions on the project's unlabeled tasks
    through ``api`` (the project's Label Studio client); returns how many were deleted. A failure
    is logged and ends the cleanup (it never fails the training that called it)."""
    try:
        stale = superseded_by_task(api.project_predictions(state.project_id), state.model_version)
        removed = 0
        for task_id, prediction_ids in stale.items():
            if api.task_annotations(task_id):
                continue  # labeled: its predictions are part of its history
            for prediction_id in prediction_ids:
                api.delete_prediction(prediction_id)
                removed += 1
    except LabelStudioAPIError as error:
        log.warning("project %s: superseded predictions not removed: %s", state.project_id, error)
        return 0
    if removed:
        log.info(
            "project %s: removed %d superseded prediction(s) of unlabeled tasks (version %s "
            "replaces them when a task is opened or predictions are retrieved)",
            state.project_id,
            removed,
            state.model_version,
        )
    return removed
