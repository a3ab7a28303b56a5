"""Fixtures of the service tests: a fake Label Studio, a real redis-server, and runtimes on one
shared tiny random engine (built from ``Settings`` as the service builds it, under the session's
``tiny_model_dir``)."""

from __future__ import annotations

import shutil
import threading
from pathlib import Path

import pytest
from flask import Flask, jsonify, request
from werkzeug.serving import make_server

from backend.runtime import Runtime, set_runtime
from backend.settings import Settings
from backend.store import SQLiteStore
from backend.telemetry import Metrics
from server_helpers import API_TOKEN, FakeLabelStudio, RedisServer, free_port, make_settings

# ---------------------------------------------------------------------------------------------
# A fake Label Studio (files, export, predictions), served on 127.0.0.1
# ---------------------------------------------------------------------------------------------


def _serve(app: Flask) -> tuple[object, threading.Thread, int]:
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    return server, thread, server.server_port


@pytest.fixture
def fake_ls():
    """A Label Studio stand-in: serves uploads with token auth, the project export, and records
    predictions posted to ``/api/predictions/``."""
    app = Flask("fake_label_studio")
    state = FakeLabelStudio(url="", token=API_TOKEN)

    def authorized() -> bool:
        return request.headers.get("Authorization") == f"Token {state.token}"

    @app.get("/data/upload/<path:rest>")
    def upload(rest):
        if not authorized():
            return jsonify({"detail": "no auth"}), 401
        data = state.files.get(request.path)
        if data is None:
            return jsonify({"detail": "not found"}), 404
        state.downloads += 1
        return data, 200, {"Content-Type": "image/png"}

    @app.get("/api/current-user/whoami")
    def whoami():
        if not authorized():
            return jsonify({"detail": "Authentication credentials were not provided."}), 401
        return jsonify({"id": 1, "email": "admin@example.com"})

    @app.get("/status/<int:code>")
    def status(code):
        return jsonify({"detail": "status"}), code

    @app.get("/api/projects/<int:project>/export")
    def export(project):
        if not authorized():
            return jsonify({"detail": "no auth"}), 401
        return jsonify(state.exported.get(project, []))

    @app.post("/api/predictions/")
    def predictions():
        if not authorized():
            return jsonify({"detail": "no auth"}), 401
        state.posted.append(request.get_json())
        return jsonify({"id": len(state.posted), **request.get_json()}), 201

    @app.get("/api/predictions/")
    def list_predictions():
        if not authorized():
            return jsonify({"detail": "no auth"}), 401
        task_id = request.args.get("task", type=int)
        return jsonify(
            [
                {"id": index + 1, **p}
                for index, p in enumerate(state.posted)
                if (task_id is None or p.get("task") == task_id) and index + 1 not in state.deleted
            ]
        )

    @app.delete("/api/predictions/<int:prediction_id>/")
    def delete_prediction(prediction_id):
        if not authorized():
            return jsonify({"detail": "no auth"}), 401
        state.deleted.append(prediction_id)
        return "", 204

    @app.get("/api/tasks/<int:task_id>/annotations/")
    def task_annotations(task_id):
        if not authorized():
            return jsonify({"detail": "no auth"}), 401
        return jsonify(state.annotations.get(task_id, []))

    server, thread, port = _serve(app)
    state.url = f"http://127.0.0.1:{port}"
    yield state
    server.shutdown()
    thread.join(5)


# ---------------------------------------------------------------------------------------------
# Engine and runtime
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def model_dir(tiny_model_dir) -> Path:
    """Tiny random checkpoints (the root conftest's folder, under pytest's temporary folder)."""
    return Path(tiny_model_dir)


@pytest.fixture(scope="session")
def segmenter(model_dir):
    """One tiny random-weight engine shared by the tests (loading it is the slow part)."""
    from matcher_core import OneShotSegmenter

    settings = Settings.from_env(
        {"ONESHOT_RANDOM_WEIGHTS": "1", "MODEL_DIR": str(model_dir), "DEVICE": "cpu"}
    )
    config = settings.segmenter_config()
    return OneShotSegmenter(config)


@pytest.fixture
def make_runtime(tmp_path, model_dir, segmenter):
    """Build a :class:`Runtime` on the shared engine with SQLite state in ``tmp_path``;
    keyword arguments are environment variables."""
    built: list[Runtime] = []

    def build(store=None, **env: str) -> Runtime:
        settings = make_settings(model_dir, tmp_path / f"state{len(built)}", **env)
        store = store or SQLiteStore(
            Path(settings.model_dir) / "state.sqlite3",
            max_project_bytes=settings.max_project_state_bytes,
        )
        runtime = Runtime(settings, store=store, metrics=Metrics(), segmenter=segmenter)
        built.append(runtime)
        set_runtime(runtime)
        return runtime

    yield build
    for runtime in built:
        runtime.jobs.wait_idle(30)
        runtime.close()
    set_runtime(None)


# ---------------------------------------------------------------------------------------------
# A real redis-server
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def redis_server(tmp_path):
    """A real ``redis-server`` on a free port (skipped when the binary is not installed)."""
    binary = shutil.which("redis-server")
    if binary is None:
        pytest.skip("redis-server not installed (apt-get install -y redis-server)")
    server = RedisServer(binary, tmp_path / "redis", free_port())
    server.directory.mkdir()
    server.start()
    yield server
    server.kill()
