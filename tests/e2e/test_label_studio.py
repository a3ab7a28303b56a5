"""End to end with a real Label Studio 1.23.2: one annotation pre-labels the rest of the project.

The tests follow what a user does, in file order, each step building on the last: create a
BrushLabels project, import images (uploaded files, served by Label Studio as ``/data/upload/...``),
connect the backend, label one image, press "Retrieve Predictions" in the Data Manager, press
"Start Training", correct one more image and train again. Everything goes through Label Studio's
REST API, so what is checked is what Label Studio stores, not what the backend claims to return.

Slow (Label Studio's first start alone takes about 30 s): runs only with ``ONESHOT_E2E=1``.
"""

from __future__ import annotations

import collections
import os
import re
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
from label_studio_sdk.converter.brush import decode_rle, mask2rle
from PIL import Image

from .harness import REPO_ROOT, Backend, LabelStudio, prometheus_value

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not os.environ.get("ONESHOT_E2E"),
        reason="end-to-end test with a real Label Studio (installs and starts it, ~2-5 min): "
        "set ONESHOT_E2E=1 to run it (.ci/run does)",
    ),
]

DATA_ROOT = Path(
    os.environ.get("ONESHOT_DATA_DIR", REPO_ROOT.parent / "shared" / "data" / "oneshot_seg_real")
)
# Five frames of one DAVIS sequence: one object, 854x480 (not square, so a swapped width and
# height in a prediction cannot pass unnoticed).
IMAGE_STEMS = ("00000", "00005", "00010", "00015", "00020")
SEQUENCE_DIR = DATA_ROOT / "davis2016_val" / "blackswan"
IMAGE_WIDTH, IMAGE_HEIGHT = 854, 480
LABEL = "Object"
LABEL_CONFIG = f"""
<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="tag" toName="image">
    <Label value="{LABEL}" background="#ff6a00"/>
  </BrushLabels>
</View>
"""
# How long the backend may take to turn annotations into stored predictions (tiny models on a
# 2-core machine: seconds; the margin covers a loaded CI runner).
PREDICTION_TIMEOUT_S = 180.0
TRAINING_TIMEOUT_S = 120.0


@dataclass
class Project:
    """The Label Studio project of the scenario and the ground truth of its tasks."""

    id: int
    ml_backend_id: int
    mask_by_task: dict[int, Path]
    """Task id -> ground-truth mask PNG (``(H, W)``, 0 / 255) of the image it shows."""
    annotated_task_ids: list[int] = field(default_factory=list)
    version_before_correction: str | None = None
    """The backend's model version just before the correction of the learning step."""

    @property
    def unlabeled_task_ids(self) -> list[int]:
        return [task_id for task_id in self.mask_by_task if task_id not in self.annotated_task_ids]


def brush_result(mask_path: Path, region_id: str) -> dict[str, Any]:
    """A Label Studio brush region for the object of a ground-truth mask PNG.

    The RLE is Label Studio's: the rle-pack bitstream of an RGBA ``(H, W, 4)`` buffer whose alpha
    channel holds the mask, as ``label_studio_sdk.converter.brush.mask2rle`` writes it.
    """
    mask = np.asarray(Image.open(mask_path).convert("L"))
    binary = np.where(mask > 127, 255, 0).astype(np.uint8)
    height, width = binary.shape
    return {
        "id": region_id,
        "from_name": "tag",
        "to_name": "image",
        "type": "brushlabels",
        "origin": "manual",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": mask2rle(binary), "brushlabels": [LABEL]},
    }


def submit_annotation(
    label_studio: LabelStudio, project: Project, task_id: int, parent_prediction: int | None = None
) -> None:
    """Submit the ground truth of ``task_id`` as an annotation, as the "Submit" button does;
    ``parent_prediction`` names the pre-label it corrects, as the UI records it."""
    result = brush_result(project.mask_by_task[task_id], region_id=f"gt{task_id}")
    annotation = {"result": [result], "was_cancelled": False, "lead_time": 4.2}
    if parent_prediction is not None:
        annotation["parent_prediction"] = parent_prediction
    label_studio.post(f"/api/tasks/{task_id}/annotations/", json=annotation, expect=201)
    project.annotated_task_ids.append(task_id)


def retrieve_predictions(label_studio: LabelStudio, project: Project) -> None:
    """The Data Manager action "Retrieve Predictions" on every task of the project."""
    reply = label_studio.post(
        f"/api/dm/actions/?id=retrieve_tasks_predictions&project={project.id}",
        json={"selectedItems": {"all": True, "excluded": []}},
    )
    assert reply["processed_items"] == len(project.mask_by_task)


def stored_predictions(label_studio: LabelStudio, project: Project) -> list[dict[str, Any]]:
    """Every prediction Label Studio stores for the project."""
    return label_studio.get("/api/predictions/", params={"project": project.id})


def backend_model_version(label_studio: LabelStudio, project: Project) -> str:
    """The model version the backend answers to ``/setup`` now (Label Studio asks it on GET)."""
    ml_backend = label_studio.get(f"/api/ml/{project.ml_backend_id}")
    assert ml_backend["state"] == "CO", ml_backend
    return ml_backend["model_version"]


def settled_model_version(
    label_studio: LabelStudio, project: Project, quiet_s: float = 5.0, timeout_s: float = 180.0
) -> str:
    """The backend's model version once it stayed the same for ``quiet_s`` (background work,
    e.g. a training started by an annotation, has finished)."""
    deadline = time.monotonic() + timeout_s
    seen: list[str] = []
    version = backend_model_version(label_studio, project)
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now_version = backend_model_version(label_studio, project)
        seen.append(now_version)
        if now_version != version:
            version, stable_since = now_version, time.monotonic()
        elif time.monotonic() - stable_since >= quiet_s:
            return version
    pytest.fail(f"the backend's model_version never settled within {timeout_s:.0f} s: {seen[-10:]}")


def wait_for_new_model_version(
    label_studio: LabelStudio, project: Project, old_version: str, timeout_s: float
) -> str:
    """The backend's model version once it differs from ``old_version`` (its learned state
    changed: a reference appeared, or a training finished)."""
    deadline = time.monotonic() + timeout_s
    while True:
        version = backend_model_version(label_studio, project)
        if version != old_version:
            return version
        if time.monotonic() > deadline:
            pytest.fail(f"the backend's model_version stayed {old_version!r} for {timeout_s:.0f} s")
        time.sleep(1.0)


def wait_for_predictions_of(
    label_studio: LabelStudio,
    project: Project,
    model_version: str,
    timeout_s: float = PREDICTION_TIMEOUT_S,
) -> dict[int, dict[str, Any]]:
    """Press "Retrieve Predictions" until every task has a stored prediction of
    ``model_version``; returns them per task id.

    A prediction may be empty (no instance found: random weights find nothing in some images),
    but it must be there, or Label Studio would keep asking for it.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        retrieve_predictions(label_studio, project)
        of_version = [
            p
            for p in stored_predictions(label_studio, project)
            if p["model_version"] == model_version
        ]
        by_task = {p["task"]: p for p in of_version}
        missing = sorted(set(project.mask_by_task) - set(by_task))
        if not missing:
            assert len(by_task) == len(of_version), "several predictions of one version"
            return by_task
        if time.monotonic() > deadline:
            pytest.fail(
                f"tasks {missing} got no prediction of version {model_version!r} within "
                f"{timeout_s:.0f} s (the logs of both servers follow)"
            )
        time.sleep(2.0)


def assert_prelabels_of_unlabeled_tasks(
    project: Project, predictions: dict[int, dict[str, Any]]
) -> None:
    """Every unlabeled task's prediction is a valid brush prediction, and they are not all
    empty."""
    unlabeled = [predictions[task_id] for task_id in project.unlabeled_task_ids]
    for prediction in unlabeled:
        assert_valid_brush_prediction(prediction)
    assert any(prediction["result"] for prediction in unlabeled), (
        "no unlabeled task got a single predicted region"
    )


def assert_valid_brush_prediction(prediction: dict[str, Any]) -> None:
    """A stored prediction is what Label Studio's brush tool can show on an 854x480 image."""
    assert isinstance(prediction["score"], float), prediction["score"]
    assert 0.0 <= prediction["score"] <= 1.0
    assert prediction["model_version"], "a prediction without model_version cannot be refreshed"
    for region in prediction["result"]:
        assert region["type"] == "brushlabels"
        assert (region["from_name"], region["to_name"]) == ("tag", "image")
        assert (region["original_width"], region["original_height"]) == (
            IMAGE_WIDTH,
            IMAGE_HEIGHT,
        )
        assert region["value"]["format"] == "rle"
        assert region["value"]["brushlabels"] == [LABEL]
        assert 0.0 <= float(region["score"]) <= 1.0
        rgba = decode_rle(region["value"]["rle"])
        assert rgba.size == IMAGE_HEIGHT * IMAGE_WIDTH * 4, "RLE length disagrees with the size"
        alpha = rgba.reshape(IMAGE_HEIGHT, IMAGE_WIDTH, 4)[:, :, 3]
        assert alpha.any(), "a predicted region with an empty mask"


def webhook_events(backend: Backend, action: str) -> float:
    """How many webhooks of ``action`` the backend has received (from its ``/metrics``)."""
    metrics = requests.get(backend.url + "/metrics", timeout=5)
    metrics.raise_for_status()
    return prometheus_value(metrics.text, "oneshot_webhook_events_total", {"action": action})


@pytest.fixture(scope="module")
def project(label_studio: LabelStudio, backend: Backend) -> Iterator[Project]:
    """A BrushLabels project with five uploaded images, connected to the backend; nothing
    labeled yet."""
    if not SEQUENCE_DIR.is_dir():
        pytest.fail(
            f"the real images are missing: {SEQUENCE_DIR} (set ONESHOT_DATA_DIR to the "
            "oneshot_seg_real folder)"
        )
    created = label_studio.post(
        "/api/projects/",
        json={"title": "one-shot end-to-end", "label_config": LABEL_CONFIG},
        expect=201,
    )
    project_id = created["id"]

    # One form field per file: Label Studio keeps only one upload per field name.
    files = {
        f"file{index}": (f"{stem}.jpg", (SEQUENCE_DIR / f"{stem}.jpg").read_bytes(), "image/jpeg")
        for index, stem in enumerate(IMAGE_STEMS)
    }
    imported = label_studio.post(f"/api/projects/{project_id}/import", files=files, expect=201)
    assert imported["task_count"] == len(IMAGE_STEMS)

    tasks = label_studio.get("/api/tasks", params={"project": project_id, "page_size": 100})
    mask_by_task: dict[int, Path] = {}
    for task in tasks["tasks"]:
        image_url = task["data"]["image"]
        assert image_url.startswith(f"/data/upload/{project_id}/"), image_url
        # Label Studio names the upload "<uuid8>-<original name>".
        stem = image_url.rsplit("-", 1)[1].removesuffix(".jpg")
        mask_by_task[task["id"]] = SEQUENCE_DIR / f"{stem}.png"
    assert sorted(path.stem for path in mask_by_task.values()) == sorted(IMAGE_STEMS)

    connected = label_studio.post(
        "/api/ml",
        json={
            "url": backend.url,
            "project": project_id,
            "title": "one-shot",
            "is_interactive": False,
        },
        expect=201,
    )
    assert connected["state"] == "CO", connected
    yield Project(id=project_id, ml_backend_id=connected["id"], mask_by_task=mask_by_task)


def test_a_task_opened_before_the_reference_stores_no_prediction(
    label_studio: LabelStudio, backend: Backend, project: Project
) -> None:
    """Opening a task, or "Retrieve Predictions", before any annotation stores nothing: no empty
    "waiting" prediction that would stay on the task (Label Studio asks again once the backend
    has a reference)."""
    label_studio.get(f"/api/tasks/{next(iter(project.mask_by_task))}/")  # opening the task
    retrieve_predictions(label_studio, project)

    assert stored_predictions(label_studio, project) == []
    assert backend_model_version(label_studio, project) == "oneshot-waiting"


def test_one_annotation_prelabels_the_other_tasks(
    label_studio: LabelStudio, backend: Backend, project: Project
) -> None:
    """After one submitted annotation the backend's model version changes (so Label Studio asks
    again for tasks it already pre-labeled empty), and "Retrieve Predictions" stores brush masks
    of the right size, with scores, on the other tasks."""
    version_without_reference = backend_model_version(label_studio, project)
    created_before = webhook_events(backend, "ANNOTATION_CREATED")

    reference_task = next(iter(project.mask_by_task))
    submit_annotation(label_studio, project, reference_task)
    # Label Studio (without Redis) sends the webhook inside the annotation request.
    assert webhook_events(backend, "ANNOTATION_CREATED") == created_before + 1

    version = wait_for_new_model_version(
        label_studio, project, version_without_reference, PREDICTION_TIMEOUT_S
    )
    # Short enough for Label Studio's version tabs, the random marker and generation first.
    assert re.fullmatch(r"rnd-g1-[0-9a-f]{6}", version), version
    predictions = wait_for_predictions_of(label_studio, project, version)
    assert_prelabels_of_unlabeled_tasks(project, predictions)


def test_the_data_manager_score_column_shows_each_prediction_s_score(
    label_studio: LabelStudio, backend: Backend, project: Project
) -> None:
    """README step 5, sorting by score: the Data Manager reads ``predictions_score`` of its task
    list, which Label Studio 1.23 fills only for predictions of the backend's version with the
    feature flag ``scripts/label_studio.sh`` sets."""
    version = settled_model_version(label_studio, project)
    predictions = wait_for_predictions_of(label_studio, project, version)
    listed = label_studio.get(
        "/api/tasks", params={"project": project.id, "fields": "all", "page_size": 100}
    )["tasks"]

    scores = {task["id"]: task["predictions_score"] for task in listed}
    for task_id in project.unlabeled_task_ids:
        assert scores[task_id] == pytest.approx(predictions[task_id]["score"]), scores


def test_repeated_retrieval_stores_no_duplicates(
    label_studio: LabelStudio, backend: Backend, project: Project
) -> None:
    """Pressing "Retrieve Predictions" again with an unchanged model stores nothing new: the
    backend's ``/predict`` versions match its ``/setup`` version, which is stable."""
    version = settled_model_version(label_studio, project)
    retrieve_predictions(label_studio, project)
    before = stored_predictions(label_studio, project)

    retrieve_predictions(label_studio, project)
    retrieve_predictions(label_studio, project)
    after = stored_predictions(label_studio, project)

    assert backend_model_version(label_studio, project) == version
    assert sorted(p["id"] for p in after) == sorted(p["id"] for p in before)
    per_task_and_version = collections.Counter((p["task"], p["model_version"]) for p in after)
    duplicated = {key: count for key, count in per_task_and_version.items() if count > 1}
    assert not duplicated, f"duplicate predictions (task, model_version): {duplicated}"
    # Every task, the labeled one included, has exactly one prediction of the current version.
    assert {task for task, model_version in per_task_and_version if model_version == version} == (
        set(project.mask_by_task)
    )


def test_start_training_reaches_the_backend(
    label_studio: LabelStudio, backend: Backend, project: Project
) -> None:
    """The "Start Training" button (``POST /api/ml/{id}/train``) delivers START_TRAINING to the
    backend's ``/webhook``, and the backend accepts it."""
    trainings_requested_before = webhook_events(backend, "START_TRAINING")
    label_studio.post(f"/api/ml/{project.ml_backend_id}/train")

    assert webhook_events(backend, "START_TRAINING") == trainings_requested_before + 1
    # Label Studio keeps the error message of a /webhook call that failed.
    ml_backend = label_studio.get(f"/api/ml/{project.ml_backend_id}")
    assert ml_backend["error_message"] in (None, ""), ml_backend["error_message"]


def test_a_correction_and_start_training_reach_the_backend(
    label_studio: LabelStudio, backend: Backend, project: Project
) -> None:
    """Submitting a corrected mask on a pre-labeled task sends ANNOTATION_CREATED to the backend;
    "Start Training" follows. The next test checks what the backend learned from them."""
    version = settled_model_version(label_studio, project)
    project.version_before_correction = version
    corrected_task = project.unlabeled_task_ids[0]
    prelabel = wait_for_predictions_of(label_studio, project, version)[corrected_task]
    created_before = webhook_events(backend, "ANNOTATION_CREATED")
    trainings_requested_before = webhook_events(backend, "START_TRAINING")

    submit_annotation(label_studio, project, corrected_task, parent_prediction=prelabel["id"])
    label_studio.post(f"/api/ml/{project.ml_backend_id}/train")

    assert webhook_events(backend, "ANNOTATION_CREATED") == created_before + 1
    assert webhook_events(backend, "START_TRAINING") == trainings_requested_before + 1


def test_training_refreshes_prelabels_with_a_new_version(
    label_studio: LabelStudio, backend: Backend, project: Project
) -> None:
    """After the correction and "Start Training", the backend serves a new model_version, and
    "Retrieve Predictions" refreshes the pre-labels of the tasks nobody labeled yet."""
    version_before = project.version_before_correction
    assert version_before is not None, "runs after test_a_correction_and_start_training_..."

    version_after = wait_for_new_model_version(
        label_studio, project, version_before, TRAINING_TIMEOUT_S
    )
    predictions = wait_for_predictions_of(label_studio, project, version_after)
    assert_prelabels_of_unlabeled_tasks(project, predictions)


def test_after_a_retraining_each_unlabeled_task_has_one_prediction(
    label_studio: LabelStudio, backend: Backend, project: Project
) -> None:
    """The new version replaces the older ones on tasks nobody labeled (one tab per task), while
    the labeled tasks keep theirs (an annotation may point to one as its parent)."""
    version = settled_model_version(label_studio, project)
    wait_for_predictions_of(label_studio, project, version)

    per_task = collections.Counter(p["task"] for p in stored_predictions(label_studio, project))
    assert {task: per_task[task] for task in project.unlabeled_task_ids} == dict.fromkeys(
        project.unlabeled_task_ids, 1
    )
    assert all(per_task[task] >= 1 for task in project.annotated_task_ids)


def test_start_training_on_unchanged_data_keeps_the_version(
    label_studio: LabelStudio, backend: Backend, project: Project
) -> None:
    """Two "Start Training" clicks with no new annotation: one version (nothing re-predicted)."""
    version = settled_model_version(label_studio, project)
    before = stored_predictions(label_studio, project)
    trained_before = trainings_done(backend)

    for _ in range(2):
        label_studio.post(f"/api/ml/{project.ml_backend_id}/train")
        wait_until_count(lambda: trainings_done(backend), trained_before + 1, TRAINING_TIMEOUT_S)
        trained_before = trainings_done(backend)
    retrieve_predictions(label_studio, project)

    assert settled_model_version(label_studio, project) == version
    assert sorted(p["id"] for p in stored_predictions(label_studio, project)) == sorted(
        p["id"] for p in before
    )


def trainings_done(backend: Backend) -> float:
    """Trainings the backend finished (learned something or found nothing new)."""
    text = requests.get(backend.url + "/metrics", timeout=5).text
    return sum(
        prometheus_value(text, "oneshot_trainings_total", {"outcome": outcome})
        for outcome in ("ok", "skipped")
    )


def wait_until_count(count, wanted: float, timeout_s: float) -> None:
    """Poll ``count()`` until it reaches ``wanted``."""
    deadline = time.monotonic() + timeout_s
    while count() < wanted:
        if time.monotonic() > deadline:
            pytest.fail(f"count stayed {count()} < {wanted} for {timeout_s:.0f} s")
        time.sleep(1.0)
