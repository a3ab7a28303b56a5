"""The HTTP protocol Label Studio 1.23 speaks to the backend, and every kind of bad input.

Runs the Flask app (test client, or a real threaded server where concurrency matters) on tiny
random models, against a fake Label Studio serving images and recording posted predictions.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import re
import threading
import time

import numpy as np
import pytest
import requests
from label_studio_sdk.converter.brush import decode_rle
from PIL import Image
from werkzeug.serving import make_server

from backend.server import create_app
from backend.store import WAITING_VERSION, RedisStore
from matcher_core import Reference
from server_helpers import (
    IMAGE_SIZE,
    LABEL_CONFIG,
    annotation_event,
    brush_result,
    free_port,
    png_bytes,
    scene,
    square_mask,
)

PROJECT = 12


@pytest.fixture
def backend(make_runtime, fake_ls):
    """``(client, runtime)``: the app connected to the fake Label Studio as project 12."""
    runtime = make_runtime()
    client = create_app(runtime).test_client()
    answer = client.post("/setup", json=setup_body(fake_ls))
    assert answer.status_code == 200, answer.json
    return client, runtime


def setup_body(ls, project=PROJECT, schema=LABEL_CONFIG) -> dict:
    return {
        "project": f"{project}.1735689600",
        "schema": schema,
        "hostname": ls.url,
        "access_token": ls.token,
        "extra_params": None,
    }


def predict_body(tasks, project=PROJECT, context=None, label_config=LABEL_CONFIG) -> dict:
    return {
        "tasks": tasks,
        "project": f"{project}.1735689600",
        "label_config": label_config,
        "params": {"login": None, "password": None, "context": context},
    }


def task(task_id: int, url: str) -> dict:
    return {"id": task_id, "data": {"image": url}, "project": PROJECT}


def learn_reference(client, runtime, ls, project=PROJECT, annotation_id=100, seed=0):
    """Submit the first annotation (a brush square) and wait for the reference."""
    url = ls.add_image(project, f"ref{annotation_id}.png", png_bytes(scene(seed)))
    event = annotation_event(project, annotation_id, 1, url, [brush_result(square_mask())])
    answer = client.post("/webhook", json=event)
    assert answer.status_code == 200, answer.json
    assert runtime.jobs.wait_idle(60)
    return url


def decoded_mask(result: dict) -> np.ndarray:
    height, width = result["original_height"], result["original_width"]
    return decode_rle(result["value"]["rle"]).reshape(height, width, 4)[:, :, 3] > 0


# ---------------------------------------------------------------------------------------------
# Protocol
# ---------------------------------------------------------------------------------------------


def test_health_answers_without_auth_and_without_loading_models(make_runtime):
    runtime = make_runtime(BASIC_AUTH_USER="ls", BASIC_AUTH_PASS="secret")
    runtime._segmenter = None  # a fresh process: nothing loaded yet
    answer = create_app(runtime).test_client().get("/health")
    assert answer.status_code == 200
    assert answer.json["status"] == "UP"
    assert answer.json["model_loaded"] is False
    assert runtime.model_loaded is False


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("post", "/setup"),
        ("post", "/predict"),
        ("post", "/webhook"),
        ("post", "/train"),
        ("get", "/versions"),
        ("get", "/metrics"),
    ],
)
def test_basic_auth_guards_every_route_but_health(make_runtime, method, path):
    client = create_app(make_runtime(BASIC_AUTH_USER="ls", BASIC_AUTH_PASS="secret")).test_client()
    send = getattr(client, method)

    def auth(user, password):
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        return {"Authorization": f"Basic {token}"}

    assert send(path).status_code == 401
    assert send(path, headers=auth("ls", "wrong")).status_code == 401
    refused = send(path, headers=auth("other", "secret"))
    assert refused.status_code == 401
    assert refused.json["error"].startswith("authentication required")
    assert refused.headers["WWW-Authenticate"].startswith("Basic")
    assert send(path, headers=auth("ls", "secret")).status_code != 401


def test_before_a_reference_predict_answers_nothing_to_store_per_task(backend, fake_ls):
    """A per-task ``[]``: Label Studio stores no prediction (an empty "waiting" one would stay on
    the task for ever) and asks again once there is a reference."""
    client, runtime = backend
    runtime._segmenter = None  # must not be needed
    tasks = [task(i, f"/data/upload/{PROJECT}/missing{i}.png") for i in range(3)]

    answer = client.post("/predict", json=predict_body(tasks))

    assert answer.status_code == 200
    assert answer.json["results"] == [[], [], []]
    assert fake_ls.downloads == 0
    assert runtime.model_loaded is False


def test_a_token_label_studio_refuses_fails_setup_with_the_fix_and_shows_in_health(
    backend, fake_ls
):
    """Label Studio shows a failed /setup's reason phrase on the model card (Error state); the
    same problem is in /health, and it is found at /setup, before any task."""
    client, _ = backend
    body = {**setup_body(fake_ls), "access_token": "a-legacy-key-the-organisation-refuses"}

    answer = client.post("/setup", json=body)

    assert answer.status_code == 503
    assert "refused the backend's API token (HTTP 401)" in answer.status
    assert "LABEL_STUDIO_API_KEY" in answer.status  # the fix, where Label Studio shows it
    assert answer.json["error"].startswith(f"Label Studio at {fake_ls.url} refused")
    health = client.get("/health").json
    assert health["status"] == "ERROR"
    assert any("refused the backend's API token" in error for error in health["errors"])
    # The good token: /setup succeeds and the project is usable again.
    assert client.post("/setup", json=setup_body(fake_ls)).status_code == 200


def test_models_that_fail_to_load_fail_setup_and_health(backend, fake_ls, monkeypatch):
    """A backend without models does not look healthy: /setup (the model card) answers 503 with
    the cause and the fix, /health says ERROR."""
    client, runtime = backend
    runtime._segmenter = None
    monkeypatch.setattr(runtime, "warm_up", lambda: None)  # the load stays failed
    runtime._segmenter_error = FileNotFoundError("no such checkpoint: /models/sam.pth")

    setup = client.post("/setup", json=setup_body(fake_ls))
    health = client.get("/health").json

    assert setup.status_code == 503
    assert "the models failed to load" in setup.status and "SAM_CHECKPOINT" in setup.status
    assert health["status"] == "ERROR" and health["model_loaded"] is False
    assert "no such checkpoint" in health["errors"][0]


def test_a_new_version_removes_only_superseded_predictions_of_unlabeled_tasks(backend, fake_ls):
    """After a training changes the version, each unlabeled task keeps no prediction of an older
    version of this backend (Label Studio then fetches the current one on open); labeled tasks,
    the current version and other models' predictions are left alone."""
    from backend.project import ProjectContext
    from backend.superseded import remove_superseded

    _, runtime = backend
    old, current = "rnd-g1-0123ab", "rnd-g2-4567ef"
    fake_ls.posted.extend(
        [
            {"task": 1, "model_version": old},  # id 1: unlabeled, superseded -> removed
            {"task": 1, "model_version": current},  # id 2: current -> kept
            {"task": 2, "model_version": old},  # id 3: labeled task -> kept
            {"task": 3, "model_version": "yolo-v8"},  # id 4: another model -> kept
            {"task": 3, "model_version": "oneshot-waiting"},  # id 5: earlier release -> removed
        ]
    )
    fake_ls.annotations[2] = [{"id": 7, "parent_prediction": 3}]
    state = runtime.store.load(str(PROJECT))
    state.model_version = current

    removed = remove_superseded(ProjectContext(PROJECT, runtime=runtime).api(state), state)

    assert removed == 2
    assert sorted(fake_ls.deleted) == [1, 5]


def test_first_annotation_becomes_the_reference_and_changes_the_version(backend, fake_ls):
    client, runtime = backend
    assert client.post("/setup", json=setup_body(fake_ls)).json["model_version"] == WAITING_VERSION

    started = time.perf_counter()
    url = fake_ls.add_image(PROJECT, "first.png", png_bytes(scene(0)))
    event = annotation_event(PROJECT, 100, 1, url, [brush_result(square_mask())])
    answer = client.post("/webhook", json=event)
    assert answer.status_code == 200
    assert time.perf_counter() - started < 1.0  # Label Studio's webhook timeout
    assert answer.json["stored"] == ["annotation:100"]
    assert runtime.jobs.wait_idle(60)

    version = client.post("/setup", json=setup_body(fake_ls)).json["model_version"]
    # Short enough for Label Studio's version tabs; random test weights say so first.
    assert re.fullmatch(r"rnd-g1-[0-9a-f]{6}", version), version
    state = runtime.store.load(str(PROJECT))
    assert state.reference_source["annotation_id"] == 100
    versions = client.get("/versions", query_string={"project": f"{PROJECT}.1"}).json
    # Without a project (Label Studio's own GET sends none) no list mixes projects.
    unnamed = client.get("/versions").json
    assert unnamed["versions"] == [] and unnamed["by_project"] == {str(PROJECT): [version]}
    assert versions["versions"] == [version]
    assert versions["current"] == version


def test_predict_returns_brush_masks_of_the_task_size_with_the_setup_version(backend, fake_ls):
    client, runtime = backend
    learn_reference(client, runtime, fake_ls)
    version = client.post("/setup", json=setup_body(fake_ls)).json["model_version"]
    other_size = (48, 72)
    urls = [
        fake_ls.add_image(PROJECT, "a.png", png_bytes(scene(1))),
        fake_ls.add_image(PROJECT, "b.png", png_bytes(scene(2, other_size, (10, 10, 30, 40)))),
    ]

    answer = client.post("/predict", json=predict_body([task(2, urls[0]), task(3, urls[1])]))

    assert answer.status_code == 200
    results = answer.json["results"]
    assert len(results) == 2
    for entry, (height, width) in zip(results, [IMAGE_SIZE, other_size], strict=True):
        assert entry["model_version"] == version
        assert 0.0 <= entry["score"] <= 1.0
        assert entry["result"], "the tiny engine finds at least one instance with threshold 0"
        for result in entry["result"]:
            assert result["type"] == "brushlabels"
            assert result["from_name"] == "tag" and result["to_name"] == "image"
            assert (result["original_height"], result["original_width"]) == (height, width)
            assert result["value"]["brushlabels"] == ["Cat"]
            assert decoded_mask(result).shape == (height, width)
    # The same version again: same answer (Label Studio would not pile up duplicates).
    again = client.post("/predict", json=predict_body([task(2, urls[0]), task(3, urls[1])]))
    assert again.json["results"] == results


def served_with_reference(make_runtime, fake_ls, **env: str):
    """``(client, runtime)`` of a backend set up for the fake Label Studio's project, its
    reference learned; ``env`` are settings."""
    runtime = make_runtime(**env)
    client = create_app(runtime).test_client()
    client.post("/setup", json=setup_body(fake_ls))
    learn_reference(client, runtime, fake_ls)
    return client, runtime


def uploaded_tasks(ls, first_id: int, count: int, name: str) -> list[dict]:
    """``count`` tasks with distinct scenes uploaded to the fake Label Studio."""
    return [
        task(first_id + i, ls.add_image(PROJECT, f"{name}{i}.png", png_bytes(scene(first_id + i))))
        for i in range(count)
    ]


def test_a_batch_over_the_time_budget_finishes_in_the_background(make_runtime, fake_ls):
    client, runtime = served_with_reference(make_runtime, fake_ls, PREDICT_TIME_BUDGET="0")
    tasks = uploaded_tasks(fake_ls, 10, 3, "t")

    answer = client.post("/predict", json=predict_body(tasks))

    results = answer.json["results"]
    assert len(results) == 3
    assert isinstance(results[0], dict) and results[0]["result"]
    # Deferred tasks: an empty list each, so Label Studio stores nothing for them now...
    assert results[1:] == [[], []]
    assert runtime.jobs.wait_idle(60)
    # ...and their predictions arrive through Label Studio's API, with the same version.
    posted = sorted(fake_ls.posted, key=lambda p: p["task"])
    assert [p["task"] for p in posted] == [11, 12]
    assert {p["model_version"] for p in posted} == {results[0]["model_version"]}
    assert all(p["result"] for p in posted)


def test_the_tasks_of_a_predict_go_through_the_encoders_together_with_the_same_results(
    make_runtime, fake_ls, monkeypatch
):
    client, runtime = served_with_reference(make_runtime, fake_ls, ENCODER_BATCH="3")
    tasks = uploaded_tasks(fake_ls, 30, 4, "batch")
    tasks.insert(1, task(39, f"/data/upload/{PROJECT}/missing-from-batch.png"))
    segmenter = runtime.segmenter()
    batches = []
    features_many = segmenter.features_many

    def spy(images, batch_size=4):
        batches.append(len(images))
        return features_many(images, batch_size)

    monkeypatch.setattr(segmenter, "features_many", spy)
    segmenter.cache.clear()

    batched = client.post("/predict", json=predict_body(tasks)).json

    # The first task alone (nothing timed yet), then tasks 2-4 together: the missing image is
    # left out of that batch and reported on its own; task 5 is a batch of one.
    assert batches == [2]
    assert [e["task"] for e in batched["errors"]] == [39] and "404" in batched["errors"][0]["error"]
    assert batched["results"][1] == []
    segmenter.cache.clear()
    monkeypatch.setattr(runtime, "settings", dataclasses.replace(runtime.settings, encoder_batch=1))
    alone = client.post("/predict", json=predict_body(tasks)).json
    assert batches == [2]  # no batch with ENCODER_BATCH=1
    assert alone["results"] == batched["results"]


def test_a_failing_batch_encoding_falls_back_to_one_task_at_a_time(
    make_runtime, fake_ls, monkeypatch
):
    client, runtime = served_with_reference(make_runtime, fake_ls, ENCODER_BATCH="4")
    tasks = uploaded_tasks(fake_ls, 50, 3, "fallback")

    def broken(images, batch_size=4):
        raise RuntimeError("out of memory")

    monkeypatch.setattr(runtime.segmenter(), "features_many", broken)
    answer = client.post("/predict", json=predict_body(tasks))

    assert answer.status_code == 200 and "errors" not in answer.json
    assert all(entry["result"] for entry in answer.json["results"])


def test_health_answers_fast_while_a_prediction_runs(make_runtime, fake_ls):
    runtime = make_runtime()
    app = create_app(runtime)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    base = f"http://127.0.0.1:{server.server_port}"
    try:
        requests.post(f"{base}/setup", json=setup_body(fake_ls), timeout=5)
        client = app.test_client()
        learn_reference(client, runtime, fake_ls)
        url = fake_ls.add_image(PROJECT, "slow.png", png_bytes(scene(5)))
        with runtime.inference_slot():  # hold the engine: the prediction below must wait
            pending = threading.Thread(
                target=requests.post,
                args=(f"{base}/predict",),
                kwargs={"json": predict_body([task(5, url)]), "timeout": 60},
            )
            pending.start()
            time.sleep(0.3)
            started = time.perf_counter()
            health = requests.get(f"{base}/health", timeout=1)
            assert health.status_code == 200
            assert time.perf_counter() - started < 1.0
            assert pending.is_alive(), "the prediction should still be waiting"
        pending.join(60)
    finally:
        server.shutdown()


def test_smart_tools_return_sams_mask_for_a_keypoint_and_a_box(backend, fake_ls):
    client, runtime = backend  # no reference needed for smart tools
    url = fake_ls.add_image(PROJECT, "smart.png", png_bytes(scene(3)))
    keypoint = {
        "from_name": "kp",
        "to_name": "image",
        "type": "keypointlabels",
        "original_width": IMAGE_SIZE[1],
        "original_height": IMAGE_SIZE[0],
        "is_positive": True,
        "value": {"x": 40.0, "y": 45.0, "width": 1, "keypointlabels": ["Dog"]},
    }
    rectangle = {
        "from_name": "box",
        "to_name": "image",
        "type": "rectanglelabels",
        "original_width": IMAGE_SIZE[1],
        "original_height": IMAGE_SIZE[0],
        "value": {"x": 25, "y": 25, "width": 37.5, "height": 41.7, "rectanglelabels": ["Dog"]},
    }
    engine = runtime.segmenter()
    encoder_calls = []
    for region in (keypoint, rectangle):
        answer = client.post(
            "/predict", json=predict_body([task(3, url)], context={"result": [region]})
        )
        encoder_calls.append(engine.encoder_calls)
        assert answer.status_code == 200, answer.json
        (entry,) = answer.json["results"]
        (result,) = entry["result"]
        assert result["value"]["brushlabels"] == ["Dog"]
        assert decoded_mask(result).any()
        assert decoded_mask(result).shape == IMAGE_SIZE
    # The second prompt on the same image reused the cached embedding: no encoder pass.
    assert encoder_calls[1] == encoder_calls[0]


def test_start_training_rebuilds_from_label_studio_to_the_incremental_version(backend, fake_ls):
    client, runtime = backend
    url = learn_reference(client, runtime, fake_ls)
    incremental = runtime.store.load(str(PROJECT)).model_version
    fake_ls.exported[PROJECT] = [
        {
            "id": 1,
            "data": {"image": url},
            "annotations": [
                {"id": 100, "result": [brush_result(square_mask())], "was_cancelled": False}
            ],
        }
    ]
    runtime.store.delete_examples(str(PROJECT), ["annotation:100"])  # forget what we know

    answer = client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": PROJECT}})
    assert answer.status_code == 200
    assert runtime.jobs.wait_idle(60)

    state = runtime.store.load(str(PROJECT))
    assert state.model_version == incremental
    assert list(runtime.store.examples(str(PROJECT))) == ["annotation:100"]
    reasons = [v["reason"] for v in runtime.store.versions(str(PROJECT))]
    assert reasons == ["reference built"]  # same version: no new history entry


def test_deleting_the_reference_annotation_promotes_the_next_one(backend, fake_ls):
    client, runtime = backend
    learn_reference(client, runtime, fake_ls, annotation_id=100, seed=0)
    first = runtime.store.load(str(PROJECT)).model_version
    url = fake_ls.add_image(PROJECT, "second.png", png_bytes(scene(7, box=(5, 5, 30, 30))))
    second = annotation_event(PROJECT, 101, 2, url, [brush_result(square_mask(box=(5, 5, 30, 30)))])
    client.post("/webhook", json=second)
    assert runtime.jobs.wait_idle(60)
    learned = runtime.store.load(str(PROJECT))
    assert learned.model_version != first  # the second annotation was learned from
    assert learned.reference_source["annotation_id"] == 100

    deleted = {
        "action": "ANNOTATIONS_DELETED",
        "annotations": [{"id": 100}],
        "project": {"id": PROJECT},
    }
    assert client.post("/webhook", json=deleted).status_code == 200
    assert runtime.jobs.wait_idle(60)

    state = runtime.store.load(str(PROJECT))
    assert state.reference_source["annotation_id"] == 101
    assert state.model_version not in (first, learned.model_version, WAITING_VERSION)


def _region(from_name: str, result_type: str, value: dict) -> dict:
    """A Label Studio result on the test image."""
    height, width = IMAGE_SIZE
    return {
        "from_name": from_name,
        "to_name": "image",
        "type": result_type,
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": value,
    }


def _polygon(mask_box=(15, 20, 40, 50)) -> dict:
    y0, x0, y1, x1 = mask_box
    height, width = IMAGE_SIZE
    points = [
        [100 * x / width, 100 * y / height] for x, y in ((x0, y0), (x1, y0), (x1, y1), (x0, y1))
    ]
    value = {"points": points, "closed": True, "polygonlabels": ["Cat"]}
    return _region("poly", "polygonlabels", value)


def _rectangle() -> dict:
    value = {"x": 25, "y": 25, "width": 37.5, "height": 41.7, "rectanglelabels": ["Cat"]}
    return _region("box", "rectanglelabels", value)


def _keypoint() -> dict:
    value = {"x": 43.75, "y": 45.0, "width": 1, "keypointlabels": ["Cat"]}
    return _region("kp", "keypointlabels", value)


@pytest.mark.parametrize("region", [_polygon, _rectangle, _keypoint])
def test_polygons_boxes_and_keypoints_make_a_reference_too(backend, fake_ls, region):
    config = LABEL_CONFIG.replace(
        "</View>",
        '<PolygonLabels name="poly" toName="image"><Label value="Cat"/></PolygonLabels></View>',
    )
    client, runtime = backend
    client.post("/setup", json=setup_body(fake_ls, schema=config))
    url = fake_ls.add_image(PROJECT, "shape.png", png_bytes(scene(0)))
    event = annotation_event(PROJECT, 100, 1, url, [region()], label_config=config)

    assert client.post("/webhook", json=event).status_code == 200
    assert runtime.jobs.wait_idle(60)

    state = runtime.store.load(str(PROJECT))
    assert state.model_version != WAITING_VERSION, state.last_error
    (shot,) = Reference.from_bytes(state.reference).labels["Cat"].shots
    assert shot.patch_mask.max() > 0  # the region covers part of the image


def test_metrics_are_prometheus_text(backend, fake_ls):
    client, runtime = backend
    learn_reference(client, runtime, fake_ls)
    url = fake_ls.add_image(PROJECT, "m.png", png_bytes(scene(4)))
    client.post("/predict", json=predict_body([task(4, url)]))
    client.post("/predict", json=predict_body([task(4, url)]))

    text = client.get("/metrics").get_data(as_text=True)

    assert 'oneshot_http_requests_total{route="/predict",status="200"} 2.0' in text
    assert 'oneshot_http_request_seconds_count{route="/predict"} 2' in text
    assert 'oneshot_trainings_total{outcome="ok"} 1.0' in text
    assert 'oneshot_webhook_events_total{action="ANNOTATION_CREATED"} 1.0' in text
    (hits,) = re.findall(r"^oneshot_embedding_cache_hits_total (\S+)$", text, re.MULTILINE)
    hits = float(hits)
    assert hits >= 1  # the second prediction of m.png reused its embedding
    assert "# TYPE oneshot_http_request_seconds histogram" in text


def test_other_webhook_events_are_acknowledged_and_ignored(backend):
    client, runtime = backend
    answer = client.post("/webhook", json={"action": "TASKS_CREATED", "project": {"id": PROJECT}})
    assert answer.status_code == 200
    assert answer.json["status"] == "ignored"
    assert runtime.store.load(str(PROJECT)).revision == 1  # only the setup wrote


# ---------------------------------------------------------------------------------------------
# Bad input: a clear error, nothing lost, the server stays up
# ---------------------------------------------------------------------------------------------

NO_IMAGE_CONFIG = '<View><Text name="t" value="$text"/><Choices name="c" toName="t"><Choice value="a"/></Choices></View>'
NO_MASK_CONTROL_CONFIG = '<View><Image name="image" value="$image"/><Choices name="c" toName="image"><Choice value="a"/></Choices></View>'


@pytest.mark.parametrize(
    ("config", "message"),
    [(NO_IMAGE_CONFIG, "Image"), (NO_MASK_CONTROL_CONFIG, "BrushLabels")],
)
def test_unusable_label_configs_are_refused_with_the_reason(make_runtime, fake_ls, config, message):
    client = create_app(make_runtime()).test_client()
    setup = client.post("/setup", json=setup_body(fake_ls, schema=config))
    assert setup.status_code == 400
    assert "unusable label config" in setup.json["error"] and message in setup.json["error"]
    predict = client.post("/predict", json=predict_body([task(1, "/x.png")], label_config=config))
    assert predict.status_code == 400
    assert client.get("/health").status_code == 200


def _corrupt_rle(result):
    result["value"]["rle"] = result["value"]["rle"][:5]


def _wrong_size(result):
    result["original_width"] += 7


def _empty(result):
    result["value"]["rle"] = brush_result(np.zeros(IMAGE_SIZE, bool))["value"]["rle"]


def _unknown_label(result):
    result["value"]["brushlabels"] = ["Unicorn"]


@pytest.mark.parametrize(
    ("spoil", "message"),
    [
        (_empty, "empty mask"),
        (_corrupt_rle, "rle"),
        (_wrong_size, "87x60"),
        (_unknown_label, "Unicorn"),
    ],
)
def test_unusable_annotations_are_refused_and_nothing_is_stored(backend, fake_ls, spoil, message):
    client, runtime = backend
    result = brush_result(square_mask())
    spoil(result)
    event = annotation_event(PROJECT, 100, 1, "/data/upload/12/a.png", [result])

    answer = client.post("/webhook", json=event)

    assert answer.status_code == 400
    assert message.lower() in answer.json["error"].lower()
    assert runtime.store.examples(str(PROJECT)) == {}
    assert runtime.store.load(str(PROJECT)).model_version == WAITING_VERSION
    assert client.get("/health").status_code == 200


def test_an_unknown_label_next_to_a_known_one_is_skipped(backend, fake_ls):
    client, runtime = backend
    url = fake_ls.add_image(PROJECT, "mixed.png", png_bytes(scene(0)))
    unknown = brush_result(square_mask(box=(0, 0, 10, 10)), label="Unicorn")
    event = annotation_event(PROJECT, 100, 1, url, [brush_result(square_mask()), unknown])
    assert client.post("/webhook", json=event).status_code == 200
    assert runtime.jobs.wait_idle(60)
    reference = Reference.from_bytes(runtime.store.load(str(PROJECT)).reference)
    assert list(reference.labels) == ["Cat"]


def _bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buffer, format="PNG")  # 400 MPixel, a few KB
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"this is not an image", "not a readable image"),
        (b"", "empty"),
        (png_bytes(scene(0))[:200], "not a readable image"),
        (_bomb(), "exceeds"),
    ],
    ids=["not-an-image", "zero-bytes", "truncated", "decompression-bomb"],
)
def test_unreadable_images_fail_their_task_only(backend, fake_ls, content, message):
    client, runtime = backend
    learn_reference(client, runtime, fake_ls)
    bad = fake_ls.add_image(PROJECT, "bad.png", content)
    good = fake_ls.add_image(PROJECT, "good.png", png_bytes(scene(1)))

    answer = client.post("/predict", json=predict_body([task(2, bad), task(3, good)]))

    assert answer.status_code == 200
    bad_entry, good_entry = answer.json["results"]
    assert bad_entry == []
    assert good_entry["result"]
    (error,) = answer.json["errors"]
    assert error["task"] == 2 and message in error["error"]


def test_label_studio_errors_and_outages_fail_their_tasks_with_the_status(backend, fake_ls):
    client, runtime = backend
    learn_reference(client, runtime, fake_ls)
    missing = task(2, f"/data/upload/{PROJECT}/missing.png")

    answer = client.post("/predict", json=predict_body([missing]))
    assert answer.json["results"] == [[]]
    assert "404" in answer.json["errors"][0]["error"]

    forbidden = task(5, f"{fake_ls.url}/status/403")  # a file Label Studio refuses to serve
    answer = client.post("/predict", json=predict_body([forbidden]))
    assert answer.json["results"] == [[]]
    assert "403" in answer.json["errors"][0]["error"]

    fake_ls.token = "another-token"  # the backend's key no longer works
    url = fake_ls.add_image(PROJECT, "denied.png", png_bytes(scene(1)))
    answer = client.post("/predict", json=predict_body([task(3, url)]))
    assert answer.json["results"] == [[]]
    assert "401" in answer.json["errors"][0]["error"]

    down = setup_body(fake_ls)
    down["hostname"] = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    client.post("/setup", json=down)
    answer = client.post("/predict", json=predict_body([task(4, "/data/upload/12/x.png")]))
    assert answer.status_code == 200
    assert answer.json["results"] == [[]]
    assert "connect" in answer.json["errors"][0]["error"]
    assert client.get("/health").status_code == 200


def _exif_rotated(image: np.ndarray) -> bytes:
    # Stored landscape, EXIF orientation 6 (rotate 90 degrees clockwise to display).
    buffer = io.BytesIO()
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(image).save(buffer, format="JPEG", exif=exif.tobytes())
    return buffer.getvalue()


def _sixteen_bit(image: np.ndarray) -> bytes:
    gray = (image.mean(axis=2) * 256).astype(np.uint16)
    buffer = io.BytesIO()
    Image.fromarray(gray).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.parametrize(
    ("encode", "displayed_size"),
    [
        (lambda image: png_bytes(image[:, :, 0]), IMAGE_SIZE),
        (
            lambda image: png_bytes(np.dstack([image, np.full(IMAGE_SIZE, 200, np.uint8)])),
            IMAGE_SIZE,
        ),
        (_sixteen_bit, IMAGE_SIZE),
        (_exif_rotated, IMAGE_SIZE[::-1]),
    ],
    ids=["grayscale", "rgba", "16-bit", "exif-rotated"],
)
def test_any_image_mode_is_predicted_at_its_displayed_size(
    backend, fake_ls, encode, displayed_size
):
    client, runtime = backend
    learn_reference(client, runtime, fake_ls)
    url = fake_ls.add_image(PROJECT, "mode.img", encode(scene(1)))

    answer = client.post("/predict", json=predict_body([task(2, url)]))

    (entry,) = answer.json["results"]
    assert "errors" not in answer.json
    for result in entry["result"]:
        assert (result["original_height"], result["original_width"]) == displayed_size


def test_a_task_with_several_images_is_predicted_on_the_labelled_one(backend, fake_ls):
    config = LABEL_CONFIG.replace(
        '<Image name="image" value="$image"/>',
        '<Image name="thumb" value="$thumbnail"/><Image name="image" value="$image"/>',
    )
    client, runtime = backend
    client.post("/setup", json=setup_body(fake_ls, schema=config))
    learn_reference(client, runtime, fake_ls)
    big = fake_ls.add_image(PROJECT, "big.png", png_bytes(scene(1)))
    thumb = fake_ls.add_image(PROJECT, "thumb.png", png_bytes(scene(1, (20, 20), (5, 5, 10, 10))))
    two_images = {"id": 2, "data": {"thumbnail": thumb, "image": big}}

    answer = client.post("/predict", json=predict_body([two_images], label_config=config))

    (entry,) = answer.json["results"]
    assert entry["result"]
    assert {(r["original_height"], r["original_width"]) for r in entry["result"]} == {IMAGE_SIZE}


def test_webhooks_for_another_project_never_touch_this_one(backend, fake_ls):
    client, runtime = backend
    learn_reference(client, runtime, fake_ls, project=PROJECT)
    mine = runtime.store.load(str(PROJECT))
    assert client.post("/setup", json=setup_body(fake_ls, project=13)).status_code == 200

    url = fake_ls.add_image(13, "other.png", png_bytes(scene(9, box=(0, 0, 20, 20))))
    other = annotation_event(
        13, 500, 50, url, [brush_result(square_mask(box=(0, 0, 20, 20)), "Dog")]
    )
    assert client.post("/webhook", json=other).status_code == 200
    deleted = {"action": "ANNOTATIONS_DELETED", "annotations": [{"id": 100}], "project": {"id": 13}}
    assert client.post("/webhook", json=deleted).status_code == 200
    assert runtime.jobs.wait_idle(60)

    after = runtime.store.load(str(PROJECT))
    assert (after.reference, after.model_version, after.revision) == (
        mine.reference,
        mine.model_version,
        mine.revision,
    )
    assert list(runtime.store.examples(str(PROJECT))) == ["annotation:100"]
    theirs = runtime.store.load("13")
    assert theirs.model_version not in (WAITING_VERSION, mine.model_version)
    assert theirs.reference_source["annotation_id"] == 500


def test_concurrent_webhooks_for_one_project_store_all_and_train_together(make_runtime, fake_ls):
    runtime = make_runtime(TRAIN_DEBOUNCE="0.5")
    client = create_app(runtime).test_client()
    client.post("/setup", json=setup_body(fake_ls))
    events = []
    for i in range(8):
        url = fake_ls.add_image(PROJECT, f"c{i}.png", png_bytes(scene(20 + i)))
        events.append(
            annotation_event(PROJECT, 200 + i, 20 + i, url, [brush_result(square_mask())])
        )

    answers = []
    threads = [
        threading.Thread(target=lambda e=e: answers.append(client.post("/webhook", json=e)))
        for e in events
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert runtime.jobs.wait_idle(60)

    assert sorted(a.status_code for a in answers) == [200] * 8
    assert len(runtime.store.examples(str(PROJECT))) == 8
    state = runtime.store.load(str(PROJECT))
    assert (
        state.reference_source["annotation_id"] == 200
    )  # the first created, whatever arrived first
    trainings = runtime.metrics.trainings.value("ok") + runtime.metrics.trainings.value("skipped")
    assert 1 <= trainings <= 2


def test_oversized_bodies_are_refused_with_413(make_runtime):
    client = create_app(make_runtime(MAX_REQUEST_BYTES="4096")).test_client()
    answer = client.post("/predict", data=b"x" * 10_000, content_type="application/json")
    assert answer.status_code == 413
    assert "MAX_REQUEST_BYTES" in answer.json["error"]
    assert client.get("/health").status_code == 200


@pytest.mark.parametrize(
    ("path", "body", "message"),
    [
        ("/predict", b"{not json", "not valid JSON"),
        ("/predict", b"[1, 2]", "JSON object"),
        ("/setup", b'{"project": "../../etc"}', "invalid project id"),
        ("/webhook", b'{"action": "ANNOTATION_CREATED", "project": {"id": 12}}', "annotation"),
        ("/webhook", b'{"project": {"id": 12}}', "action"),
    ],
)
def test_malformed_requests_get_a_400_with_the_reason(backend, path, body, message):
    client, _ = backend
    answer = client.post(path, data=body, content_type="application/json")
    assert answer.status_code == 400
    assert message in answer.json["error"]


def test_predict_with_tasks_that_are_not_a_list_is_a_400(backend):
    client, _ = backend
    answer = client.post("/predict", json=predict_body({"id": 1}))
    assert answer.status_code == 400
    assert "'tasks' must be a list" in answer.json["error"]


def test_redis_going_away_is_a_503_with_the_reason_and_state_survives(
    redis_server, make_runtime, fake_ls
):
    runtime = make_runtime(store=RedisStore(redis_server.url), JOBS="thread")
    client = create_app(runtime).test_client()
    client.post("/setup", json=setup_body(fake_ls))
    learn_reference(client, runtime, fake_ls)
    before = runtime.store.load(str(PROJECT))

    redis_server.kill()
    url = fake_ls.add_image(PROJECT, "late.png", png_bytes(scene(3)))
    late = annotation_event(PROJECT, 101, 2, url, [brush_result(square_mask())])
    for answer in (
        client.post("/setup", json=setup_body(fake_ls)),
        client.post("/predict", json=predict_body([task(2, url)])),
        client.post("/webhook", json=late),
        client.get("/versions"),
    ):
        assert answer.status_code == 503
        assert "state store unavailable" in answer.json["error"]
        assert "is unreachable" in answer.json["error"]
    assert client.get("/health").status_code == 200

    redis_server.start()
    after = runtime.store.load(str(PROJECT))
    assert (after.reference, after.model_version) == (before.reference, before.model_version)
    assert list(runtime.store.examples(str(PROJECT))) == ["annotation:100"]
    assert client.post("/setup", json=setup_body(fake_ls)).json["model_version"] == (
        before.model_version
    )
