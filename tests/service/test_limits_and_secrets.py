"""Resource limits (each a setting, each refused with a message naming it, nothing written) and
secrets (the Label Studio token and the basic-auth password never reach a log line, an error,
``/versions`` or ``/metrics``)."""

from __future__ import annotations

import base64
import json
import logging

import pytest

from backend.jobs import ThreadJobs
from backend.server import create_app
from backend.settings import Settings
from backend.store import RedisStore, SQLiteStore, StateTooLarge
from matcher_core import Reference
from model import OneShotModel
from server_helpers import (
    LABEL_CONFIG,
    annotation_event,
    brush_result,
    png_bytes,
    scene,
    square_mask,
)

PROJECT = 41


def setup_body(ls, token=None) -> dict:
    return {
        "project": f"{PROJECT}.1",
        "schema": LABEL_CONFIG,
        "hostname": ls.url,
        "access_token": token or ls.token,
    }


def predict_body(tasks) -> dict:
    return {"project": f"{PROJECT}.1", "label_config": LABEL_CONFIG, "tasks": tasks}


def event_for(url: str, results: list[dict], annotation_id: int = 100) -> dict:
    return annotation_event(PROJECT, annotation_id, 1, url, results)


def stored(runtime) -> tuple:
    store = runtime.store
    return (store.load(str(PROJECT)).header(), store.examples(str(PROJECT)))


@pytest.fixture
def connect(make_runtime, fake_ls):
    """``connect(**env)``: ``(client, runtime)`` set up for the project with those settings."""

    def build(**env):
        runtime = make_runtime(**env)
        client = create_app(runtime).test_client()
        assert client.post("/setup", json=setup_body(fake_ls)).status_code == 200
        return client, runtime

    return build


# ---------------------------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------------------------


def test_every_limit_is_a_setting_read_from_the_environment():
    settings = Settings.from_env(
        {
            "MAX_REQUEST_BYTES": "2048",
            "MAX_JSON_DEPTH": "16",
            "MAX_TASKS_PER_REQUEST": "5",
            "MAX_IMAGE_BYTES": "1000",
            "MAX_IMAGE_PIXELS": "4000",
            "MAX_INSTANCES_PER_LABEL": "3",
            "MAX_SHOTS_PER_LABEL": "2",
            "MAX_PROJECT_STATE_BYTES": "100000",
            "TRAIN_LOCK_TTL": "30",
            "POST_RETRIES": "2",
            "POST_RETRY_BACKOFF": "0.5",
            "DEVICE": "cpu",
        }
    )
    assert (
        settings.max_request_bytes,
        settings.max_json_depth,
        settings.max_tasks_per_request,
        settings.max_image_bytes,
        settings.max_image_pixels,
        settings.max_instances_per_label,
        settings.max_shots_per_label,
        settings.max_project_state_bytes,
        settings.train_lock_ttl,
        settings.post_retries,
        settings.post_retry_backoff,
    ) == (2048, 16, 5, 1000, 4000, 3, 2, 100000, 30.0, 2, 0.5)


def test_too_many_tasks_in_one_predict_are_refused(connect, fake_ls):
    client, runtime = connect(MAX_TASKS_PER_REQUEST="2")
    before = stored(runtime)
    tasks = [{"id": i, "data": {"image": "/data/upload/41/x.png"}} for i in range(3)]

    answer = client.post("/predict", json=predict_body(tasks))

    assert answer.status_code == 413
    assert "3 tasks" in answer.json["error"] and "MAX_TASKS_PER_REQUEST" in answer.json["error"]
    assert stored(runtime) == before
    assert client.post("/predict", json=predict_body(tasks[:2])).status_code == 200


def test_nesting_deeper_than_the_setting_is_refused(connect):
    client, runtime = connect(MAX_JSON_DEPTH="8")
    body = predict_body([{"id": 1, "data": {"image": "x", "meta": [[[[[[[[1]]]]]]]]}}])
    answer = client.post("/predict", json=body)
    assert answer.status_code == 400
    assert "MAX_JSON_DEPTH" in answer.json["error"]


def test_an_annotation_drawn_on_too_many_pixels_is_refused(connect, fake_ls):
    client, runtime = connect(MAX_IMAGE_PIXELS="4000")  # the 80x60 scene has 4800
    before = stored(runtime)
    url = fake_ls.add_image(PROJECT, "a.png", png_bytes(scene(0)))

    answer = client.post("/webhook", json=event_for(url, [brush_result(square_mask())]))

    assert answer.status_code == 413
    assert "80x60" in answer.json["error"] and "MAX_IMAGE_PIXELS" in answer.json["error"]
    assert stored(runtime) == before


def test_a_task_image_over_the_pixel_cap_fails_that_task_with_the_setting(connect, fake_ls):
    client, runtime = connect(MAX_IMAGE_PIXELS="5000")
    url = fake_ls.add_image(PROJECT, "a.png", png_bytes(scene(0)))
    client.post("/webhook", json=event_for(url, [brush_result(square_mask())]))
    assert runtime.jobs.wait_idle(60)
    big = fake_ls.add_image(PROJECT, "big.png", png_bytes(scene(1, size=(100, 100))))

    answer = client.post(
        "/predict", json=predict_body([{"id": 2, "data": {"image": big}}])
    )  # 10 000 pixels

    assert answer.status_code == 200
    assert answer.json["results"] == [[]]
    (error,) = answer.json["errors"]
    assert "100x100" in error["error"] and "MAX_IMAGE_PIXELS" in error["error"]


def test_too_many_regions_of_one_label_are_refused(connect, fake_ls):
    client, runtime = connect(MAX_INSTANCES_PER_LABEL="2")
    url = fake_ls.add_image(PROJECT, "a.png", png_bytes(scene(0)))
    squares = [(0, 0, 5, 5), (10, 10, 15, 15), (20, 20, 25, 25)]
    regions = [brush_result(square_mask(box=box)) for box in squares]
    before = stored(runtime)

    answer = client.post("/webhook", json=event_for(url, regions))

    assert answer.status_code == 413
    assert "3 regions of label 'Cat'" in answer.json["error"]
    assert "MAX_INSTANCES_PER_LABEL" in answer.json["error"]
    assert stored(runtime) == before
    assert client.post("/webhook", json=event_for(url, regions[:2])).status_code == 200


class ShotAdder(OneShotModel):
    """Learning that adds every later annotation as a further shot (as few-shot learning may)."""

    def learn(self, project, reference, examples):
        segmenter = self.runtime.segmenter()
        return segmenter.add_examples(reference, [e.load() for e in examples], max_shots=100)


def test_shots_beyond_the_limit_keep_the_newest_and_say_so(make_runtime, fake_ls, caplog):
    runtime = make_runtime(MAX_SHOTS_PER_LABEL="2")
    runtime.jobs = ThreadJobs(
        runtime, debounce=0.05, train=lambda pid, full: ShotAdder(pid, runtime=runtime).train(full)
    )
    client = create_app(runtime).test_client()
    client.post("/setup", json=setup_body(fake_ls))
    for annotation_id in (100, 101, 102, 103):
        url = fake_ls.add_image(PROJECT, f"{annotation_id}.png", png_bytes(scene(annotation_id)))
        answer = client.post(
            "/webhook", json=event_for(url, [brush_result(square_mask())], annotation_id)
        )
        assert answer.status_code == 200
        assert runtime.jobs.wait_idle(60)

    state = runtime.store.load(str(PROJECT))
    reference = Reference.from_bytes(state.reference)
    assert len(reference.labels["Cat"].shots) == 2
    assert "MAX_SHOTS_PER_LABEL" in caplog.text


@pytest.fixture(params=["sqlite", "redis"])
def capped_store(request, tmp_path):
    if request.param == "sqlite":
        store = SQLiteStore(tmp_path / "state.sqlite3", max_project_bytes=10_000)
    else:
        url = request.getfixturevalue("redis_server").url
        store = RedisStore(url, max_project_bytes=10_000)
    yield store
    store.close()


def _reference(blob: bytes):
    def change(state):
        state.reference = blob
        return state

    return change


def test_a_project_cannot_store_more_than_its_byte_cap(capped_store):
    store = capped_store
    store.put_example("1", "annotation:1", {"rle": "x" * 4000})
    store.update("1", _reference(b"r" * 3000))
    assert 7000 < store.stored_bytes("1") < 10_000

    with pytest.raises(StateTooLarge, match="MAX_PROJECT_STATE_BYTES"):
        store.put_example("1", "annotation:2", {"rle": "x" * 4000})
    with pytest.raises(StateTooLarge, match="over the limit of 10000"):
        store.update("1", _reference(b"r" * 7000))
    assert list(store.examples("1")) == ["annotation:1"]
    assert store.load("1").reference == b"r" * 3000

    # Replacing an example by a smaller one, shrinking, and other projects: all allowed.
    store.put_example("1", "annotation:1", {"rle": "x" * 10})
    store.put_example("1", "annotation:2", {"rle": "x" * 4000})
    store.put_example("2", "annotation:1", {"rle": "x" * 8000})
    assert store.stored_bytes("2") > 8000


def test_a_webhook_over_the_project_cap_is_a_507_and_stores_nothing(connect, fake_ls):
    client, runtime = connect(MAX_PROJECT_STATE_BYTES="8000")
    before = stored(runtime)
    url = fake_ls.add_image(PROJECT, "a.png", png_bytes(scene(0)))
    event = event_for(url, [brush_result(square_mask())])
    event["task"]["data"]["notes"] = "x" * 10_000

    answer = client.post("/webhook", json=event)

    assert answer.status_code == 507
    assert "MAX_PROJECT_STATE_BYTES" in answer.json["error"]
    assert stored(runtime) == before


# ---------------------------------------------------------------------------------------------
# Secrets
# ---------------------------------------------------------------------------------------------

SECRET_TOKEN = "f00dfeedcafe5ec7e7f00dfeedcafe5ec7e7f00d"
SECRET_PASSWORD = "hunter2-but-longer-and-unique"


def _jwt(claims: dict) -> str:
    def part(data: dict) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    return f"{part({'alg': 'HS256', 'typ': 'JWT'})}.{part(claims)}.c2lnbmF0dXJlLXNlY3JldA"


@pytest.mark.parametrize(
    "token", [SECRET_TOKEN, _jwt({"token_type": "refresh", "jti": "personal-secret-42"})]
)
def test_the_label_studio_token_never_reaches_logs_errors_versions_or_metrics(
    make_runtime, fake_ls, caplog, token
):
    """Everything that can fail with the token in hand does fail (Label Studio refuses it): a
    training download, a prediction download, a smart tool, background posts, the export."""
    caplog.set_level(logging.DEBUG)
    runtime = make_runtime(
        BASIC_AUTH_USER="ls", BASIC_AUTH_PASS=SECRET_PASSWORD, PREDICT_TIME_BUDGET="0"
    )
    client = create_app(runtime).test_client()
    auth = {"Authorization": "Basic " + base64.b64encode(f"ls:{SECRET_PASSWORD}".encode()).decode()}
    wrong = {"Authorization": "Basic " + base64.b64encode(b"ls:" + SECRET_PASSWORD[::-1].encode()).decode()}  # fmt: skip
    # The reference is learned while Label Studio still accepts the token...
    fake_ls.token = token if token == SECRET_TOKEN else fake_ls.token
    bodies = []
    setup = setup_body(fake_ls, token=fake_ls.token)
    bodies.append(client.post("/setup", json=setup, headers=auth))
    url = fake_ls.add_image(PROJECT, "a.png", png_bytes(scene(0)))
    bodies.append(
        client.post("/webhook", json=event_for(url, [brush_result(square_mask())]), headers=auth)
    )
    assert runtime.jobs.wait_idle(60)
    # ...then everything runs with the secret token, which Label Studio now refuses.
    fake_ls.token = "rotated-" + SECRET_TOKEN[::-1]
    bodies.append(client.post("/setup", json=setup_body(fake_ls, token=token), headers=auth))
    # New images: nothing comes from the download cache, every one is fetched with the token.
    fresh = [fake_ls.add_image(PROJECT, f"t{i}.png", png_bytes(scene(i))) for i in range(4)]
    tasks = [{"id": 2 + i, "data": {"image": fresh[i]}} for i in range(3)]
    bodies.append(client.post("/predict", json=predict_body(tasks), headers=auth))
    context = {"result": [{"type": "keypointlabels", "from_name": "kp", "to_name": "image",
                           "original_width": 80, "original_height": 60,
                           "value": {"x": 50, "y": 50, "keypointlabels": ["Cat"]}}]}  # fmt: skip
    body = {**predict_body(tasks[:1]), "params": {"context": context}}
    bodies.append(client.post("/predict", json=body, headers=auth))
    redrawn = event_for(fresh[3], [brush_result(square_mask(box=(0, 0, 30, 30)))])
    redrawn["action"] = "ANNOTATION_UPDATED"
    bodies.append(client.post("/webhook", json=redrawn, headers=auth))
    bodies.append(client.post("/webhook", json={"action": "START_TRAINING", "project": {"id": PROJECT}}, headers=auth))  # fmt: skip
    bodies.append(client.post("/setup", json=setup, headers=wrong))
    assert runtime.jobs.wait_idle(60)
    bodies.append(client.get("/versions", query_string={"project": PROJECT}, headers=auth))
    metrics = client.get("/metrics", headers=auth)
    bodies += [metrics, client.get("/health")]

    # The failures did happen, and they are explained...
    assert runtime.metrics.trainings.value("failed") >= 1
    assert runtime.metrics.predictions_posted.value("failed") >= 1
    assert bodies[3].json["results"][0] == [] and bodies[3].json["errors"]
    assert bodies[4].status_code == 400  # the smart tool could not download its image
    assert bodies[7].status_code == 401
    versions = bodies[-3].json
    assert "answered 40" in versions["last_error"]  # 401 (legacy key) or 404 (no token exchange)
    # ...without the secrets.
    texts = [caplog.text, *(answer.get_data(as_text=True) for answer in bodies)]
    for secret in (token, SECRET_PASSWORD, *token.split(".")[1:2]):
        for text in texts:
            assert secret not in text
    assert "oneshot_http_requests_total" in metrics.get_data(as_text=True)


def test_settings_shown_at_startup_hide_every_secret():
    settings = Settings.from_env(
        {
            "LABEL_STUDIO_API_KEY": SECRET_TOKEN,
            "BASIC_AUTH_USER": "ls",
            "BASIC_AUTH_PASS": SECRET_PASSWORD,
            "REDIS_URL": f"redis://:{SECRET_PASSWORD}@127.0.0.1:6379/0",
            "DEVICE": "cpu",
        }
    )
    shown = json.dumps(settings.describe()) + repr(settings)
    assert SECRET_TOKEN not in shown and SECRET_PASSWORD not in shown
    assert all(key in shown for key in ("max_project_state_bytes", "train_lock_ttl"))


def test_a_token_pinned_in_the_environment_is_used_and_never_copied_to_the_store(
    make_runtime, fake_ls
):
    runtime = make_runtime(LABEL_STUDIO_API_KEY=fake_ls.token, LABEL_STUDIO_URL=fake_ls.url)
    client = create_app(runtime).test_client()
    setup = {**setup_body(fake_ls, token=SECRET_TOKEN), "hostname": "http://10.1.2.3:8080"}
    assert client.post("/setup", json=setup).status_code == 200
    url = fake_ls.add_image(PROJECT, "a.png", png_bytes(scene(0)))
    assert (
        client.post("/webhook", json=event_for(url, [brush_result(square_mask())])).status_code
        == 200
    )
    assert runtime.jobs.wait_idle(60)

    state = runtime.store.load(str(PROJECT))
    assert state.reference is not None  # downloaded from LABEL_STUDIO_URL with its key
    assert state.connection == {}
    assert SECRET_TOKEN not in json.dumps(state.header())
