"""Faults, with nothing lost: a trainer killed mid-training, Redis going away during predict and
fit, Label Studio failing while background predictions are posted, two backends on one Redis,
and a full disk under the SQLite store. Every test ends with the stored state intact and the
backend working again without a restart.

Real processes and servers throughout: a forked backend worker killed with SIGKILL, a real
``redis-server`` killed and restarted (append-only file, so acknowledged writes survive), a local
HTTP server standing in for a failing Label Studio, and a real tmpfs filled to the last byte.
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import os
import shutil
import subprocess
import threading
import time
from itertools import pairwise
from pathlib import Path

import numpy as np
import pytest
from flask import Flask, jsonify, request
from werkzeug.serving import make_server

from backend.leases import train_lock_name
from backend.runtime import Runtime
from backend.server import create_app
from backend.store import (
    WAITING_VERSION,
    LockLost,
    ProjectState,
    RedisStore,
    SQLiteStore,
    StoreError,
)
from backend.telemetry import Metrics
from backend.training import served_version
from labelstudio.api import LabelStudioAPI, LabelStudioAPIError
from matcher_core import Example
from model import OneShotModel, model_version_of
from server_helpers import (
    API_TOKEN,
    LABEL_CONFIG,
    annotation_event,
    brush_result,
    png_bytes,
    scene,
    square_mask,
)

PROJECT = 31
FIRST_BOX = (15, 20, 40, 50)  # (y0, x0, y1, x1) of the first annotation's square
UPDATED_BOX = (5, 5, 30, 35)  # the same annotation, redrawn


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------


def setup_body(ls_url: str, token: str = API_TOKEN) -> dict:
    return {
        "project": f"{PROJECT}.1",
        "schema": LABEL_CONFIG,
        "hostname": ls_url,
        "access_token": token,
    }


def predict_body(tasks: list[dict]) -> dict:
    return {"project": f"{PROJECT}.1", "label_config": LABEL_CONFIG, "tasks": tasks}


def event_for(url: str, box, action: str = "ANNOTATION_CREATED", annotation_id: int = 100):
    return annotation_event(
        PROJECT, annotation_id, 1, url, [brush_result(square_mask(box=box))], action=action
    )


def expected_version(segmenter, box, mode: str = "matcher") -> str:
    """The content part of the model version a training must reach from the reference image
    annotated with ``box`` (the same arrays the backend computes, so the same hash)."""
    example = Example(image=scene(0), masks={"Cat": [square_mask(box=box)]})
    return content_of(
        served_version(
            WAITING_VERSION, model_version_of(segmenter.build_reference([example]), {}, mode)
        )
    )


def content_of(version: str) -> str:
    """A served version without its generation (``rnd-g2-5a7baf`` -> ``5a7baf``)."""
    return version.rsplit("-", 1)[-1]


def wait_until(condition, timeout: float = 30.0, step: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(step)


def lock_free(store, name: str) -> bool:
    token = store.acquire_lock(name, 1.0)
    if token is None:
        return False
    store.release_lock(name, token)
    return True


def wait_for_stale_request(runtime) -> None:
    """Until the dead trainer's lease has expired and its request mark is old enough to be
    resumed (one lease plus the debounce)."""
    settings = runtime.settings
    wait_until(lambda: lock_free(runtime.store, train_lock_name(str(PROJECT))), timeout=30)
    requested = runtime.store.load(str(PROJECT)).training_requested_at
    assert requested is not None, "the interrupted training's request mark is kept"
    left = requested + settings.train_lock_ttl + settings.train_debounce - time.time()
    time.sleep(max(left, 0) + 0.05)


class Gate:
    """Holds the engine inside ``build_reference`` until opened (a training "in the middle")."""

    def __init__(self, segmenter, monkeypatch):
        self.entered = threading.Event()
        self.opened = threading.Event()
        original = segmenter.build_reference

        def gated(examples):
            examples = list(examples)
            self.entered.set()
            assert self.opened.wait(60)
            return original(examples)

        monkeypatch.setattr(segmenter, "build_reference", gated)


# ---------------------------------------------------------------------------------------------
# (a) A worker killed in the middle of training
# ---------------------------------------------------------------------------------------------


def _worker_killed_while_training(settings, store_path, segmenter, event, started_file):
    """A backend worker (own runtime, threads for jobs) that receives ``event`` and whose
    training then gets stuck in the engine, until the test kills the process."""

    def stuck(examples):
        list(examples)
        Path(started_file).touch()
        time.sleep(3600)

    segmenter.build_reference = stuck  # in this process only
    runtime = Runtime(
        settings, store=SQLiteStore(store_path), metrics=Metrics(), segmenter=segmenter
    )
    answer = create_app(runtime).test_client().post("/webhook", json=event)
    assert answer.status_code == 200
    time.sleep(3600)


def test_a_worker_killed_mid_training_keeps_the_last_version_and_the_training_reruns(
    make_runtime, fake_ls, segmenter, tmp_path
):
    runtime = make_runtime(TRAIN_LOCK_TTL="1.5")
    client = create_app(runtime).test_client()
    client.post("/setup", json=setup_body(fake_ls.url))
    url = fake_ls.add_image(PROJECT, "ref.png", png_bytes(scene(0)))
    assert client.post("/webhook", json=event_for(url, FIRST_BOX)).status_code == 200
    assert runtime.jobs.wait_idle(60)
    before = runtime.store.load(str(PROJECT))
    assert before.model_version.rsplit("-", 1)[-1] == expected_version(segmenter, FIRST_BOX)

    started = tmp_path / "training-started"
    worker = multiprocessing.get_context("fork").Process(
        target=_worker_killed_while_training,
        args=(
            runtime.settings,
            str(runtime.store.path),
            segmenter,
            event_for(url, UPDATED_BOX, "ANNOTATION_UPDATED"),
            str(started),
        ),
    )
    worker.start()
    try:
        wait_until(started.exists)
        # The lease is renewed while the training runs: two lease lengths on, it is still
        # held, so no other worker starts a second training of the project.
        time.sleep(2 * runtime.settings.train_lock_ttl)
        assert not lock_free(runtime.store, train_lock_name(str(PROJECT)))
    finally:
        worker.kill()
        worker.join(10)
    assert worker.exitcode == -9

    after_kill = runtime.store.load(str(PROJECT))
    assert (after_kill.model_version, after_kill.reference) == (
        before.model_version,
        before.reference,
    )
    assert client.post("/setup", json=setup_body(fake_ls.url)).json["model_version"] == (
        before.model_version
    )

    # Within one lease the dead worker's lock is free; the next request starts the training
    # again, and it learns the redrawn annotation.
    wait_for_stale_request(runtime)
    answer = client.post("/predict", json=predict_body([{"id": 2, "data": {"image": url}}]))
    assert answer.status_code == 200
    assert runtime.jobs.wait_idle(60)
    rerun = runtime.store.load(str(PROJECT))
    assert rerun.model_version.rsplit("-", 1)[-1] == expected_version(segmenter, UPDATED_BOX)
    assert rerun.training_requested_at is None
    assert rerun.last_error is None
    assert [v["model_version"] for v in runtime.store.versions(str(PROJECT))] == [
        before.model_version,
        rerun.model_version,
    ]


def test_an_annotation_updated_while_its_training_runs_is_learned_again(
    make_runtime, fake_ls, segmenter, monkeypatch
):
    runtime = make_runtime()
    client = create_app(runtime).test_client()
    client.post("/setup", json=setup_body(fake_ls.url))
    url = fake_ls.add_image(PROJECT, "ref.png", png_bytes(scene(0)))
    gate = Gate(segmenter, monkeypatch)

    client.post("/webhook", json=event_for(url, FIRST_BOX))
    assert gate.entered.wait(30)  # the training has read the first drawing...
    client.post("/webhook", json=event_for(url, UPDATED_BOX, "ANNOTATION_UPDATED"))
    gate.opened.set()  # ...and commits it after the update arrived
    assert runtime.jobs.wait_idle(60)

    state = runtime.store.load(str(PROJECT))
    assert state.model_version.rsplit("-", 1)[-1] == expected_version(segmenter, UPDATED_BOX)


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path):
    if request.param == "sqlite":
        built = SQLiteStore(tmp_path / "state.sqlite3")
    else:
        built = RedisStore(request.getfixturevalue("redis_server").url)
    yield built
    built.close()


def _set_reference(blob: bytes, version: str):
    def change(state: ProjectState) -> ProjectState:
        state.reference, state.model_version = blob, version
        return state

    return change


def test_a_write_fenced_by_a_lost_lease_is_refused(store):
    stale = store.acquire_lock("train:7", ttl=0.2)
    time.sleep(0.3)  # the holder paused past its lease; another trainer takes the project
    fresh = store.acquire_lock("train:7", ttl=30)
    assert fresh is not None

    assert store.extend_lock("train:7", stale, 30) is False
    with pytest.raises(LockLost, match="no longer held"):
        store.update("7", _set_reference(b"stale", "oneshot-stale"), fence=("train:7", stale))
    assert store.load("7").reference is None

    assert store.extend_lock("train:7", fresh, 30) is True
    store.update("7", _set_reference(b"fresh", "oneshot-fresh"), fence=("train:7", fresh))
    assert store.load("7").model_version == "oneshot-fresh"


# ---------------------------------------------------------------------------------------------
# (b) Redis restarted or unreachable during fit and predict
# ---------------------------------------------------------------------------------------------


def test_redis_dying_during_a_training_loses_nothing_and_the_training_resumes(
    redis_server, make_runtime, fake_ls, segmenter, monkeypatch
):
    runtime = make_runtime(store=RedisStore(redis_server.url), JOBS="thread", TRAIN_LOCK_TTL="1")
    client = create_app(runtime).test_client()
    client.post("/setup", json=setup_body(fake_ls.url))
    url = fake_ls.add_image(PROJECT, "ref.png", png_bytes(scene(0)))
    client.post("/webhook", json=event_for(url, FIRST_BOX))
    assert runtime.jobs.wait_idle(60)
    before = runtime.store.load(str(PROJECT))

    gate = Gate(segmenter, monkeypatch)
    client.post("/webhook", json=event_for(url, UPDATED_BOX, "ANNOTATION_UPDATED"))
    assert gate.entered.wait(30)
    redis_server.kill()  # in the middle of the training
    gate.opened.set()
    assert runtime.jobs.wait_idle(60)
    assert runtime.metrics.trainings.value("failed") == 1

    during = client.post("/predict", json=predict_body([{"id": 2, "data": {"image": url}}]))
    assert during.status_code == 503
    assert "state store unavailable" in during.json["error"]
    assert "is unreachable" in during.json["error"]
    assert client.get("/health").status_code == 200

    redis_server.start()  # same backend process: the client reconnects by itself
    state = runtime.store.load(str(PROJECT))
    assert (state.model_version, state.reference) == (before.model_version, before.reference)
    assert "annotation:100" in runtime.store.examples(str(PROJECT))

    wait_for_stale_request(runtime)
    assert client.post("/setup", json=setup_body(fake_ls.url)).status_code == 200
    assert runtime.jobs.wait_idle(60)
    assert runtime.store.load(str(PROJECT)).model_version.rsplit("-", 1)[-1] == expected_version(
        segmenter, UPDATED_BOX
    )


def test_redis_dying_during_a_predict_answers_what_was_done_and_says_why(
    redis_server, make_runtime, fake_ls, segmenter, monkeypatch
):
    runtime = make_runtime(
        store=RedisStore(redis_server.url), REDIS_URL=redis_server.url, PREDICT_TIME_BUDGET="0"
    )
    model = OneShotModel(f"{PROJECT}.1", LABEL_CONFIG, runtime=runtime)
    model.setup(fake_ls.url, fake_ls.token)
    url = fake_ls.add_image(PROJECT, "ref.png", png_bytes(scene(0)))
    model.fit("ANNOTATION_CREATED", event_for(url, FIRST_BOX))
    from rq import SimpleWorker

    SimpleWorker([runtime.jobs.queue], connection=runtime.jobs.connection).work(burst=True)
    version = runtime.store.load(str(PROJECT)).model_version
    client = create_app(runtime).test_client()
    tasks = [
        {
            "id": 2 + i,
            "data": {"image": fake_ls.add_image(PROJECT, f"{i}.png", png_bytes(scene(i)))},
        }
        for i in range(2)
    ]

    original = segmenter.segment

    def segment_then_lose_redis(*args, **kwargs):
        redis_server.kill()
        return original(*args, **kwargs)

    monkeypatch.setattr(segmenter, "segment", segment_then_lose_redis)
    answer = client.post("/predict", json=predict_body(tasks))
    monkeypatch.setattr(segmenter, "segment", original)

    # The first task was predicted; the second could not be deferred to the queue: it gets an
    # empty entry (Label Studio asks again) and the reason.
    assert answer.status_code == 200
    first, second = answer.json["results"]
    assert first["model_version"] == version and first["result"]
    assert second == []
    (error,) = answer.json["errors"]
    assert error["task"] == 3 and "unreachable" in error["error"]

    redis_server.start()
    again = client.post("/predict", json=predict_body(tasks[:1]))
    assert again.status_code == 200
    assert again.json["results"][0]["model_version"] == version
    assert runtime.store.load(str(PROJECT)).model_version == version


# ---------------------------------------------------------------------------------------------
# (c) Label Studio failing while background predictions are posted
# ---------------------------------------------------------------------------------------------


class FlakyLabelStudio:
    """Serves uploads and the predictions API like Label Studio, but the first ``fail_posts``
    prediction posts answer 503, and the next ``lose_answers`` posts are stored yet answered
    502 (the answer lost on the way back)."""

    def __init__(self, fail_posts: int = 0, lose_answers: int = 0, hold_posts: float = 0.0):
        self.fail_posts, self.lose_answers = fail_posts, lose_answers
        self.hold_posts = hold_posts
        """Seconds each post is held before it is stored (longer than a client's timeout: the
        client gives up, and the prediction is stored afterwards all the same)."""
        self.stored: list[dict] = []
        self.post_times: list[float] = []
        self.files: dict[str, bytes] = {}
        self._lock = threading.Lock()
        app = Flask("flaky_label_studio")

        def authorized() -> bool:
            return request.headers.get("Authorization") == f"Token {API_TOKEN}"

        @app.get("/data/upload/<path:rest>")
        def upload(rest):
            if not authorized() or request.path not in self.files:
                return jsonify({"detail": "no"}), 404
            return self.files[request.path], 200, {"Content-Type": "image/png"}

        @app.get("/api/predictions/")
        def listed():
            task = request.args.get("task", type=int)
            with self._lock:
                return jsonify([p for p in self.stored if p["task"] == task])

        @app.post("/api/predictions/")
        def posted():
            time.sleep(self.hold_posts)
            with self._lock:
                self.post_times.append(time.monotonic())
                if not authorized():
                    return jsonify({"detail": "no auth"}), 401
                if self.fail_posts > 0:
                    self.fail_posts -= 1
                    return jsonify({"detail": "upstream down"}), 503
                prediction = {"id": len(self.stored) + 1, **request.get_json()}
                self.stored.append(prediction)
                if self.lose_answers > 0:
                    self.lose_answers -= 1
                    return jsonify({"detail": "bad gateway"}), 502
                return jsonify(prediction), 201

        self.server = make_server("127.0.0.1", 0, app, threaded=True)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def close(self) -> None:
        self.server.shutdown()
        self.thread.join(5)


@pytest.fixture
def flaky_ls():
    servers: list[FlakyLabelStudio] = []

    def build(**kwargs) -> FlakyLabelStudio:
        servers.append(FlakyLabelStudio(**kwargs))
        return servers[-1]

    yield build
    for server in servers:
        server.close()


def test_posting_retries_with_growing_delays_and_never_duplicates(flaky_ls):
    ls = flaky_ls(fail_posts=3, lose_answers=1)
    api = LabelStudioAPI(ls.url, API_TOKEN, timeout=5, retries=5, backoff=0.05)

    answer = api.post_prediction(7, [], 0.5, "oneshot-abc")

    # 3 refused posts, 1 stored whose answer was lost, then the retry finds it stored.
    assert len(ls.post_times) == 4
    assert [p["task"] for p in ls.stored] == [7]
    assert answer["id"] == ls.stored[0]["id"]
    # Waits of at least 0.05, 0.1, 0.2 s (minus the 25 % jitter): exponential, not constant.
    gaps = np.diff(ls.post_times)
    assert all(gap >= 0.05 * 2**k * 0.75 for k, gap in enumerate(gaps))
    # Posting again (a rerun of the job) stores nothing new either.
    api.post_prediction(7, [], 0.5, "oneshot-abc")
    assert len(ls.stored) == 1 and len(ls.post_times) == 4


def test_retries_are_bounded_and_the_last_error_says_why(flaky_ls):
    ls = flaky_ls(fail_posts=100)
    api = LabelStudioAPI(ls.url, API_TOKEN, timeout=5, retries=2, backoff=0.01)
    with pytest.raises(LabelStudioAPIError, match="503") as caught:
        api.post_prediction(7, [], 0.5, "oneshot-abc")
    assert caught.value.status == 503
    assert len(ls.post_times) == 3 and ls.stored == []

    closed = f"http://127.0.0.1:{_closed_port()}"
    api = LabelStudioAPI(closed, API_TOKEN, timeout=1, retries=1, backoff=0.01)
    with pytest.raises(LabelStudioAPIError, match="unreachable") as caught:
        api.post_prediction(7, [], 0.5, "oneshot-abc")
    assert caught.value.status == 0
    assert API_TOKEN not in str(caught.value)


def test_a_client_error_is_not_retried(flaky_ls):
    ls = flaky_ls()
    api = LabelStudioAPI(ls.url, "wrong-token", timeout=5, retries=5, backoff=0.01)
    with pytest.raises(LabelStudioAPIError, match="401"):
        api.post_prediction(7, [], 0.5, "oneshot-abc")
    assert len(ls.post_times) == 1


def test_a_post_held_past_the_timeout_then_stored_is_found_not_posted_again(flaky_ls):
    ls = flaky_ls(hold_posts=1.0)
    api = LabelStudioAPI(ls.url, API_TOKEN, timeout=0.3, retries=6, backoff=0.1)

    answer = api.post_prediction(7, [], 0.5, "oneshot-abc")

    assert len(ls.post_times) == 1  # the timed-out post was never repeated...
    assert [p["task"] for p in ls.stored] == [7]  # ...and is the one stored
    assert answer["id"] == ls.stored[0]["id"]


def test_a_post_held_longer_than_every_recheck_fails_and_is_still_stored_once(flaky_ls):
    ls = flaky_ls(hold_posts=2.0)
    api = LabelStudioAPI(ls.url, API_TOKEN, timeout=0.3, retries=2, backoff=0.05)

    with pytest.raises(LabelStudioAPIError, match="not sent again") as caught:
        api.post_prediction(7, [], 0.5, "oneshot-abc")

    assert caught.value.maybe_done
    wait_until(lambda: len(ls.stored) == 1, timeout=10)
    time.sleep(0.3)
    assert len(ls.post_times) == 1 and len(ls.stored) == 1


def test_a_second_run_while_label_studio_holds_the_first_post_does_not_post(make_runtime, flaky_ls):
    ls = flaky_ls(hold_posts=1.5)
    runtime = make_runtime(FETCH_TIMEOUT="0.5", POST_RETRIES="1", POST_RETRY_BACKOFF="0.05")
    client = create_app(runtime).test_client()
    ls.files["/data/upload/31/ref.png"] = png_bytes(scene(0))
    ls.files["/data/upload/31/t.png"] = png_bytes(scene(1))
    client.post("/setup", json=setup_body(ls.url))
    client.post("/webhook", json=event_for("/data/upload/31/ref.png", FIRST_BOX))
    assert runtime.jobs.wait_idle(60)
    task = {"id": 40, "data": {"image": "/data/upload/31/t.png"}}
    model = OneShotModel(project_id=PROJECT, runtime=runtime)

    first = threading.Thread(target=model.predict_and_post, args=([task],))
    first.start()
    wait_until(lambda: len(ls.post_times) == 1)
    second = model.predict_and_post([task])  # a rerun: the held post is not listed yet
    first.join(30)

    assert second == 0
    wait_until(lambda: len(ls.stored) == 1, timeout=10)
    time.sleep(0.3)
    assert len(ls.post_times) == 1 and [p["task"] for p in ls.stored] == [40]
    assert runtime.metrics.predictions_posted.value("already_posted") == 1


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_background_predictions_survive_a_failing_label_studio_without_duplicates(
    make_runtime, flaky_ls
):
    ls = flaky_ls(fail_posts=2, lose_answers=2)
    runtime = make_runtime(PREDICT_TIME_BUDGET="0", POST_RETRY_BACKOFF="0.01")
    client = create_app(runtime).test_client()
    client.post("/setup", json=setup_body(ls.url))
    ls.files["/data/upload/31/ref.png"] = png_bytes(scene(0))
    client.post("/webhook", json=event_for("/data/upload/31/ref.png", FIRST_BOX))
    assert runtime.jobs.wait_idle(60)
    tasks = []
    for i in range(4):
        ls.files[f"/data/upload/31/{i}.png"] = png_bytes(scene(i))
        tasks.append({"id": 10 + i, "data": {"image": f"/data/upload/31/{i}.png"}})

    answer = client.post("/predict", json=predict_body(tasks))
    assert runtime.jobs.wait_idle(60)

    assert answer.json["results"][1:] == [[], [], []]  # deferred to the background
    assert sorted(p["task"] for p in ls.stored) == [11, 12, 13]  # each exactly once
    assert runtime.metrics.predictions_posted.value("ok") == 3
    # The job running again (e.g. requeued after a crash) posts nothing twice.
    OneShotModel(project_id=PROJECT, runtime=runtime).predict_and_post(tasks[1:])
    assert sorted(p["task"] for p in ls.stored) == [11, 12, 13]


# ---------------------------------------------------------------------------------------------
# (d) Two backends sharing one Redis
# ---------------------------------------------------------------------------------------------


def test_two_backends_on_one_redis_train_one_at_a_time_and_serve_one_version(
    redis_server, fake_ls, model_dir, segmenter, tmp_path, monkeypatch
):
    from server_helpers import make_settings

    wanted = expected_version(segmenter, UPDATED_BOX)
    trainings: list[tuple[float, float]] = []
    from backend import training

    original_train = training.train  # what every background training runs

    def recorded_train(*args, **kwargs):
        began = time.monotonic()
        time.sleep(0.2)  # widen the window in which an overlap would show
        try:
            return original_train(*args, **kwargs)
        finally:
            trainings.append((began, time.monotonic()))

    monkeypatch.setattr(training, "train", recorded_train)
    backends = []
    for name in ("a", "b"):
        settings = make_settings(model_dir, tmp_path / name, JOBS="thread")
        runtime = Runtime(
            settings, store=RedisStore(redis_server.url), metrics=Metrics(), segmenter=segmenter
        )
        backends.append((runtime, create_app(runtime).test_client()))
    try:
        url = fake_ls.add_image(PROJECT, "ref.png", png_bytes(scene(0)))
        for _, client in backends:
            assert client.post("/setup", json=setup_body(fake_ls.url)).status_code == 200
        # The annotation reaches backend a, its redrawing backend b, nearly together: each
        # backend starts a training of the project.
        (_, client_a), (_, client_b) = backends
        first = event_for(url, FIRST_BOX)
        redrawn = event_for(url, UPDATED_BOX, "ANNOTATION_UPDATED")
        sent = [
            threading.Thread(target=client_a.post, args=("/webhook",), kwargs={"json": first}),
            threading.Thread(target=client_b.post, args=("/webhook",), kwargs={"json": redrawn}),
        ]
        for thread in sent:
            thread.start()
            time.sleep(0.02)
        for thread in sent:
            thread.join()
        for runtime, _ in backends:
            assert runtime.jobs.wait_idle(60)

        assert len(trainings) >= 2  # one per backend at least
        ordered = sorted(trainings)
        assert all(end <= next_start for (_, end), (next_start, _) in pairwise(ordered))
        versions = {
            client.post("/setup", json=setup_body(fake_ls.url)).json["model_version"]
            for _, client in backends
        }
        assert {content_of(v) for v in versions} == {wanted}
    finally:
        for runtime, _ in backends:
            runtime.close()


# ---------------------------------------------------------------------------------------------
# (e) Disk full under the SQLite store
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(directory: Path, size: str = "512k"):
    """A real tmpfs of ``size`` at ``directory`` (needs root; skipped otherwise)."""
    directory.mkdir()
    mount = shutil.which("mount")
    if os.geteuid() != 0 or mount is None:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        [mount, "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(directory)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield directory
    finally:
        subprocess.run(["umount", "-l", str(directory)], check=False)


def fill_disk(directory: Path) -> Path:
    """Write a file until the file system refuses another byte."""
    filler = directory / "filler"
    descriptor = os.open(filler, os.O_WRONLY | os.O_CREAT)
    try:
        chunk = b"\0" * 4096
        while True:
            try:
                os.write(descriptor, chunk)
            except OSError as error:
                assert error.errno == errno.ENOSPC
                if len(chunk) == 1:
                    break
                chunk = chunk[: len(chunk) // 2]
    finally:
        os.close(descriptor)
    return filler


@contextlib.contextmanager
def full_disk(kind: str, tmp_path: Path):
    """``(store, free)``: a SQLite store whose disk is full, and a function freeing it.

    ``tmpfs``: the database lives on a 512 KiB tmpfs filled to the last byte (the real thing;
    root only). ``max_page_count``: SQLite's own cap on the database size, set just above its
    current size on the connection the test uses (the same SQLITE_FULL path, anywhere).
    """
    if kind == "tmpfs":
        with small_tmpfs(tmp_path / "disk") as disk:
            store = SQLiteStore(disk / "state.sqlite3")
            store.update("5", _set_reference(b"good" * 100, "oneshot-good"))
            filler = fill_disk(disk)
            try:
                yield store, filler.unlink
            finally:
                store.close()
    else:
        store = SQLiteStore(tmp_path / "state.sqlite3")
        store.update("5", _set_reference(b"good" * 100, "oneshot-good"))
        conn = store._connection()
        pages = conn.execute("PRAGMA page_count").fetchone()[0]
        conn.execute(f"PRAGMA max_page_count = {pages}")
        try:
            yield store, lambda: conn.execute("PRAGMA max_page_count = 1073741823")
        finally:
            store.close()


@pytest.mark.parametrize("kind", ["tmpfs", "max_page_count"])
def test_a_full_disk_fails_the_write_cleanly_and_keeps_the_previous_state(kind, tmp_path):
    with full_disk(kind, tmp_path) as (store, free):
        big = os.urandom(300_000)  # incompressible: needs pages the disk does not have
        with pytest.raises(StoreError, match="full"):
            store.update("5", _set_reference(big, "oneshot-big"))
        with pytest.raises(StoreError, match="full"):
            store.put_example("5", "annotation:1", {"blob": big.hex()})

        state = store.load("5")
        assert (state.reference, state.model_version) == (b"good" * 100, "oneshot-good")
        assert store.examples("5") == {}
        assert [v["model_version"] for v in store.versions("5")] == ["oneshot-good"]

        free()
        store.update("5", _set_reference(b"after", "oneshot-after"))
        assert store.load("5").model_version == "oneshot-after"


def test_a_webhook_on_a_full_disk_is_refused_with_the_reason_and_stores_nothing(
    make_runtime, fake_ls, tmp_path
):
    store = SQLiteStore(tmp_path / "full.sqlite3")
    runtime = make_runtime(store=store)
    client = create_app(runtime).test_client()
    client.post("/setup", json=setup_body(fake_ls.url))
    url = fake_ls.add_image(PROJECT, "ref.png", png_bytes(scene(0)))
    before = runtime.store.load(str(PROJECT))
    conn = store._connection()  # the test client runs requests on this thread
    conn.execute(f"PRAGMA max_page_count = {conn.execute('PRAGMA page_count').fetchone()[0]}")

    event = event_for(url, FIRST_BOX)
    event["task"]["data"]["notes"] = "x" * 20_000  # stored with the example: needs new pages
    answer = client.post("/webhook", json=event)

    assert answer.status_code == 503
    assert "database or disk is full" in answer.json["error"]
    assert runtime.store.examples(str(PROJECT)) == {}
    assert runtime.store.load(str(PROJECT)).header() == before.header()
    conn.execute("PRAGMA max_page_count = 1073741823")
    assert client.post("/webhook", json=event).status_code == 200
    assert runtime.jobs.wait_idle(60)
    assert runtime.store.load(str(PROJECT)).reference_source["annotation_id"] == 100


# ---------------------------------------------------------------------------------------------
# Images of any aspect ratio, down to one pixel wide or high
# ---------------------------------------------------------------------------------------------

THIN_SIZES = [(20, 20_000), (20_000, 20), (1, 3_000), (3_000, 1), (1, 1)]
"""(H, W): panoramas and line scans, thin enough that SAM's resize rounds a side below 1."""


@pytest.mark.parametrize("reference_size", [(20, 20_000), (20_000, 20), (1, 3_000)])
def test_images_of_any_aspect_ratio_are_references_and_predicted(
    make_runtime, fake_ls, reference_size
):
    runtime = make_runtime()
    client = create_app(runtime).test_client()
    assert client.post("/setup", json=setup_body(fake_ls.url)).status_code == 200
    height, width = reference_size
    mask = np.zeros(reference_size, dtype=bool)
    mask[: max(1, height // 2), : max(1, width // 2)] = True
    url = fake_ls.add_image(
        PROJECT, "thin-ref.png", png_bytes(scene(1, reference_size, (0, 0, 1, 1)))
    )
    event = annotation_event(PROJECT, 100, 1, url, [brush_result(mask)])
    assert client.post("/webhook", json=event).status_code == 200
    assert runtime.jobs.wait_idle(60)
    state = runtime.store.load(str(PROJECT))
    assert state.last_error is None and state.reference is not None

    tasks = []
    for index, size in enumerate(THIN_SIZES):
        image_url = fake_ls.add_image(
            PROJECT, f"thin-{index}.png", png_bytes(scene(2, size, (0, 0, 1, 1)))
        )
        tasks.append({"id": 10 + index, "data": {"image": image_url}})
    answer = client.post("/predict", json=predict_body(tasks))
    assert answer.status_code == 200, answer.get_json()
    assert "errors" not in answer.get_json(), answer.get_json()["errors"]
    assert len(answer.get_json()["results"]) == len(THIN_SIZES)
    for entry, (height, width) in zip(answer.get_json()["results"], THIN_SIZES, strict=True):
        for result in entry["result"]:
            assert (result["original_height"], result["original_width"]) == (height, width)


# ---------------------------------------------------------------------------------------------
# A correction whose image cannot be downloaded during its training
# ---------------------------------------------------------------------------------------------


def test_a_correction_whose_download_fails_stays_pending_and_is_learned_once_it_recovers(
    make_runtime, fake_ls
):
    runtime = make_runtime(TRAIN_RETRY_DELAY="0.3")
    client = create_app(runtime).test_client()
    assert client.post("/setup", json=setup_body(fake_ls.url)).status_code == 200
    reference_url = fake_ls.add_image(PROJECT, "ref.png", png_bytes(scene(0)))
    assert client.post("/webhook", json=event_for(reference_url, FIRST_BOX)).status_code == 200
    assert runtime.jobs.wait_idle(60)
    # The correction's image is not there yet (Label Studio answers 404 for it).
    missing = f"/data/upload/{PROJECT}/later.png"
    correction = annotation_event(
        PROJECT, 101, 2, missing, [brush_result(square_mask(box=UPDATED_BOX))]
    )
    assert client.post("/webhook", json=correction).status_code == 200
    assert runtime.jobs.wait_idle(60)

    state = runtime.store.load(str(PROJECT))
    assert "annotation:101" not in state.applied_examples  # pending, not marked applied
    assert "annotation:101" in (state.last_error or "")  # and the failure is reported
    assert "annotation:101" in runtime.store.examples(str(PROJECT))

    fake_ls.add_image(PROJECT, "later.png", png_bytes(scene(2)))  # Label Studio is back
    # No new event: the scheduled retry learns it.
    wait_until(
        lambda: "annotation:101" in runtime.store.load(str(PROJECT)).applied_examples, timeout=30
    )
    assert runtime.jobs.wait_idle(60)
    state = runtime.store.load(str(PROJECT))
    assert state.last_error is None
    assert state.learned["examples"] == 2  # the reference's annotation and the correction


@pytest.mark.parametrize("mode", ["persam", "matcher"])
def test_the_engine_segments_images_of_any_aspect_ratio_in_both_modes(model_dir, mode):
    from matcher_core import OneShotSegmenter, tiny_config

    engine = OneShotSegmenter(
        tiny_config(model_dir=str(model_dir), mode=mode, score_threshold=0.0, min_instance_area=1)
    )
    # A 1-pixel-high input still has embedding cells on the image (PerSAM looks only there).
    from matcher_core import persam

    assert persam.valid_cells(engine.decoder, (1, engine.decoder.img_size))[0].any()
    for reference_size in [(20, 20_000), (1, 3_000), (3_000, 1)]:
        mask = np.zeros(reference_size, dtype=bool)
        mask[: max(1, reference_size[0] // 2), : max(1, reference_size[1] // 2)] = True
        image = scene(1, reference_size, (0, 0, 1, 1))
        reference = engine.build_reference([Example(image=image, masks={"Cat": [mask]})])
        for size in THIN_SIZES:
            for instance in engine.segment(reference, scene(2, size, (0, 0, 1, 1))):
                assert instance.mask.shape == size
