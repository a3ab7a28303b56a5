"""The Label Studio ML backend protocol over HTTP (Flask), as Label Studio 1.23 speaks it.

========================  ======================================================================
``GET /health``           liveness, never authenticated, never waits for a model or the store
``POST /setup``           ``{project: "<id>.<ts>", schema, hostname, access_token}`` -> version
``POST /predict``         ``{tasks, project, label_config, params: {context}}`` -> ``results``
``POST /webhook``         annotation events and ``START_TRAINING`` (answers at once)
``POST /train``           what Label Studio sends instead of ``START_TRAINING`` with its
                          webhook-training feature flag off: treated the same
``GET /versions``         the project's model versions
``GET /metrics``          Prometheus text format
========================  ======================================================================

Every route but ``/health`` takes HTTP basic auth when ``BASIC_AUTH_USER``/``BASIC_AUTH_PASS`` are
set. Errors are JSON ``{"error": message, "status": code}``: 4xx for bad input, 503 when the state
store is unreachable, 500 for bugs; a request never takes the server down.
"""

from __future__ import annotations

import hmac
import json
import logging
import sys
import time
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException

from .runtime import Runtime, get_runtime
from .settings import Settings
from .store import StoreError

log = logging.getLogger("oneshot.server")

PUBLIC_ROUTES = {"/health"}
QUIET_ROUTES = {"/health", "/metrics"}


class JsonFormatter(logging.Formatter):
    """One JSON object per log line (``LOG_FORMAT=json``), for log collectors."""

    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def configure_logging(settings: Settings, json_lines: bool = False) -> None:
    """Root logging at ``LOG_LEVEL`` on stderr (plain text, or JSON lines)."""
    handler = logging.StreamHandler(sys.stderr)
    if json_lines:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s [%(threadName)s] %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level)


def _error(status: int, message: str) -> tuple[Response, int]:
    return jsonify({"error": message, "status": status}), status


def _credentials_match(settings: Settings) -> bool:
    auth = request.authorization
    if auth is None or auth.type != "basic":
        return False
    user = (auth.username or "").encode()
    password = (auth.password or "").encode()
    # Both comparisons always run (constant time, and no early exit on a wrong user name).
    user_ok = hmac.compare_digest(user, (settings.basic_auth_user or "").encode())
    pass_ok = hmac.compare_digest(password, (settings.basic_auth_pass or "").encode())
    return user_ok and pass_ok


def _json_body() -> dict:
    """The request's JSON object.

    Raises:
        BadRequest: the body is not JSON, or not an object.
    """
    from model import BadRequest

    if not request.get_data(cache=True):
        return {}
    body = request.get_json(silent=True, force=True)
    if body is None:
        raise BadRequest("request body is not valid JSON")
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, not {type(body).__name__}")
    return body


def create_app(runtime: Runtime | None = None) -> Flask:
    """The Flask application serving ``runtime`` (the process's runtime by default)."""
    from model import BackendError, OneShotModel, project_id_of

    runtime = runtime or get_runtime()
    settings = runtime.settings
    metrics = runtime.metrics
    app = Flask("oneshot_backend")
    app.config["MAX_CONTENT_LENGTH"] = settings.max_request_bytes
    app.json.sort_keys = False
    app.extensions["oneshot_runtime"] = runtime

    if settings.random_weights:
        log.warning(
            "ONESHOT_RANDOM_WEIGHTS=1: serving tiny RANDOM models; predictions are meaningless "
            "(smoke runs and tests only)"
        )
    if not settings.auth_enabled:
        log.warning("no BASIC_AUTH_USER/BASIC_AUTH_PASS: every route is open")

    # --- cross-cutting: auth, timing, errors ----------------------------------------------
    @app.before_request
    def start_request() -> Any:
        g.started = time.perf_counter()
        if request.path in PUBLIC_ROUTES or not settings.auth_enabled:
            return None
        if not _credentials_match(settings):
            response, status = _error(401, "authentication required (HTTP basic auth)")
            response.headers["WWW-Authenticate"] = 'Basic realm="oneshot-backend"'
            return response, status
        return None

    @app.after_request
    def record_request(response: Response) -> Response:
        route = request.url_rule.rule if request.url_rule else "unmatched"
        seconds = time.perf_counter() - g.get("started", time.perf_counter())
        metrics.requests.inc(route, str(response.status_code))
        metrics.latency.observe(seconds, route)
        level = logging.DEBUG if route in QUIET_ROUTES else logging.INFO
        log.log(
            level,
            "%s %s -> %d in %.3f s",
            request.method,
            request.path,
            response.status_code,
            seconds,
        )
        return response

    @app.errorhandler(BackendError)
    def backend_error(error: BackendError):
        log.warning("%s %s refused (%d): %s", request.method, request.path, error.status, error)
        return _error(error.status, str(error))

    @app.errorhandler(StoreError)
    def store_error(error: StoreError):
        log.error("%s %s: state store failed: %s", request.method, request.path, error)
        return _error(503, f"state store unavailable: {error}")

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        message = error.description or error.name
        if error.code == 413:
            message = (
                f"request body larger than the limit of {settings.max_request_bytes} bytes "
                "(MAX_REQUEST_BYTES)"
            )
        return _error(error.code or 500, message)

    @app.errorhandler(Exception)
    def unexpected_error(error: Exception):
        log.exception("%s %s failed", request.method, request.path)
        return _error(500, f"internal error: {type(error).__name__}: {error}")

    # --- routes ---------------------------------------------------------------------------
    @app.get("/health")
    def health():
        # No store or model access here: Label Studio gives /health 1 s, also mid-predict.
        return jsonify(
            {
                "status": "UP",
                "model_class": OneShotModel.__name__,
                "model_loaded": runtime.model_loaded,
                "random_weights": settings.random_weights,
                "mode": settings.mode,
            }
        )

    @app.post("/setup")
    def setup():
        body = _json_body()
        model = OneShotModel(
            project_id=body.get("project"), label_config=body.get("schema"), runtime=runtime
        )
        version = model.setup(hostname=body.get("hostname"), access_token=body.get("access_token"))
        return jsonify({"model_version": version})

    @app.post("/predict")
    def predict():
        body = _json_body()
        params = body.get("params") if isinstance(body.get("params"), dict) else {}
        model = OneShotModel(
            project_id=body.get("project"), label_config=body.get("label_config"), runtime=runtime
        )
        return jsonify(model.predict(body.get("tasks"), context=params.get("context")))

    @app.post("/webhook")
    def webhook():
        body = _json_body()
        model = OneShotModel(runtime=runtime)
        return jsonify(model.fit(body.get("action"), body))

    @app.post("/train")
    def train():
        body = _json_body()
        model = OneShotModel(
            project_id=body.get("project"), label_config=body.get("label_config"), runtime=runtime
        )
        return jsonify(model.fit("START_TRAINING", {"project": body.get("project")}))

    @app.get("/versions")
    def versions():
        body = _json_body() if request.content_length else {}
        project = request.args.get("project") or body.get("project")
        project_id = project_id_of(project) if project is not None else None
        history = runtime.store.versions(project_id)
        names = list(dict.fromkeys(entry["model_version"] for entry in history))
        answer: dict[str, Any] = {"versions": names, "history": history}
        if project_id is not None:
            state = runtime.store.load(project_id)
            answer["current"] = state.model_version
            answer["last_error"] = state.last_error
        return jsonify(answer)

    @app.get("/metrics")
    def prometheus_metrics():
        return Response(metrics.render(), mimetype="text/plain; version=0.0.4; charset=utf-8")

    return app
