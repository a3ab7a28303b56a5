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
set. Errors are JSON ``{"error": message, "status": code}``: 4xx for bad input (413 for a limit
hit), 503 when the state store is unreachable, 507 when a project is over its storage cap, 500 for
bugs; a request never takes the server down, and a refused request writes nothing.

Bodies are checked before any handler sees them: at most ``MAX_REQUEST_BYTES`` (with a
``Content-Length`` or chunked), valid JSON, an object, nested at most ``MAX_JSON_DEPTH`` deep,
valid Unicode text (no lone surrogates), and the fields each route reads of the right type.
"""

from __future__ import annotations

import hmac
import io
import json
import logging
import sys
import time
from typing import Any

from flask import Flask, Response, g, jsonify, request
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from .errors import BackendError, BadRequest
from .health import reason_phrase
from .model import OneShotModel
from .project import project_id_of
from .runtime import Runtime, get_runtime
from .settings import Settings, check_base_url
from .store import StateStore, StoreError
from .telemetry import Metrics

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
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.ERROR, root.level))


NOISY_LOGGERS = ("label_studio_sdk._extensions.label_studio_tools.core.utils.io",)
"""The SDK's downloader warns "`localhost` is not accessible inside of docker containers" and
"Download failed for proxy URL" at every image, also when the download then works; a download
that fails is logged by this backend, with the task."""


def _error(status: int, message: str) -> tuple[Response, Any]:
    """``{"error": message}`` with ``status``; for 503, the message is the HTTP reason phrase too:
    Label Studio shows a failed ``/setup`` or ``/predict`` as ``str(HTTPError)``, which holds the
    reason phrase and never the body (see ``backend.health``)."""
    response = jsonify({"error": message, "status": status})
    if status == 503:
        response.status = f"503 {reason_phrase(message)}"
        return response, response.status
    return response, status


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


def nesting_exceeds(value: Any, limit: int) -> bool:
    """Whether arrays/objects in ``value`` nest deeper than ``limit`` (iterative: a hostile
    depth cannot exhaust the stack here)."""
    stack = [(value, 1)] if isinstance(value, (dict, list)) else []
    while stack:
        node, depth = stack.pop()
        if depth > limit:
            return True
        children = node.values() if isinstance(node, dict) else node
        stack.extend((child, depth + 1) for child in children if type(child) in (dict, list))
    return False


def lone_surrogate_in(value: Any) -> str | None:
    """The first string (key or value) in ``value`` that is not valid Unicode text (JSON's
    ``"\\ud800"`` escapes decode to lone UTF-16 surrogates, which no UTF-8 store key, database
    or log can hold), shown escaped; ``None`` when every string is valid. Iterative, like
    :func:`nesting_exceeds`."""
    stack = [value]
    while stack:
        node = stack.pop()
        if isinstance(node, str):
            try:
                node.encode("utf-8")
            except UnicodeEncodeError:
                return ascii(node[:40])
        elif isinstance(node, dict):
            stack.extend(node.keys())
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return None


STREAM_CHUNK = 1 << 20


def buffer_streamed_body(environ: dict, limit: int) -> None:
    """Read a body that arrives without a ``Content-Length`` (``Transfer-Encoding: chunked``)
    into memory, counting its bytes, so it meets the same ``MAX_REQUEST_BYTES`` as one with a
    length: Werkzeug would silently cut such a stream at the limit and hand on the first part.

    Only servers that end the stream themselves (``wsgi.input_terminated``: gunicorn, Werkzeug
    for chunked requests) are read; on others a length-less body stays unread, as before.

    Raises:
        RequestEntityTooLarge: more than ``limit`` bytes arrived (the rest is left unread; the
            answer closes the connection).
    """
    if environ.get("CONTENT_LENGTH") or not environ.get("wsgi.input_terminated"):
        return
    stream = environ["wsgi.input"]
    chunks: list[bytes] = []
    size = 0
    while True:
        chunk = stream.read(min(STREAM_CHUNK, limit + 1 - size))
        if not chunk:
            break
        size += len(chunk)
        if size > limit:
            raise RequestEntityTooLarge()
        chunks.append(chunk)
    data = b"".join(chunks)
    environ["wsgi.input"] = io.BytesIO(data)
    environ["CONTENT_LENGTH"] = str(len(data))


def _json_body(max_depth: int) -> dict:
    """The request's JSON object.

    Raises:
        BadRequest: the body is not JSON, not an object, or nested deeper than ``max_depth``.
    """
    data = request.get_data(cache=True)
    if not data:
        return {}
    too_deep = BadRequest(f"request body nests deeper than {max_depth} levels (MAX_JSON_DEPTH)")
    try:
        body = json.loads(data)
    except RecursionError:
        raise too_deep from None
    except ValueError as error:  # includes UnicodeDecodeError and over-long integers
        raise BadRequest(f"request body is not valid JSON ({str(error)[:200]})") from None
    if not isinstance(body, dict):
        raise BadRequest(f"request body must be a JSON object, not {type(body).__name__}")
    if nesting_exceeds(body, max_depth):
        raise too_deep
    bad_text = lone_surrogate_in(body)
    if bad_text is not None:
        # Refused once here rather than in every handler a string can reach.
        raise BadRequest(f"request body holds text that is not valid Unicode: {bad_text}")
    return body


def _optional_text(body: dict, key: str) -> str | None:
    """``body[key]`` when it is a string, None when absent or null.

    Raises:
        BadRequest: present with another type.
    """
    value = body.get(key)
    if value is None or isinstance(value, str):
        return value
    raise BadRequest(f"'{key}' must be a string, not {type(value).__name__}")


def _optional_url(body: dict, key: str) -> str | None:
    """``body[key]`` as an ``http(s)://host`` URL (None when absent or empty).

    Raises:
        BadRequest: another type, or not an http(s) URL with a host.
    """
    value = _optional_text(body, key)
    if not value:
        return None
    try:
        return check_base_url(value)
    except ValueError as error:
        raise BadRequest(
            f"'{key}' must be an http(s) URL of a host, got {ascii(value[:100])}: {error}"
        ) from None


def create_app(runtime: Runtime | None = None) -> Flask:
    """The Flask application serving ``runtime`` (the process's runtime by default)."""
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

    _register_hooks(app, settings, metrics)
    _register_error_handlers(app, settings)
    _register_routes(app, runtime)
    return app


def _register_hooks(app: Flask, settings: Settings, metrics: Metrics) -> None:
    """Cross-cutting, every request: basic auth, body buffering, timing, the access log."""

    @app.before_request
    def start_request() -> Any:
        g.started = time.perf_counter()
        if request.path in PUBLIC_ROUTES:
            return None
        if not settings.auth_enabled:
            buffer_streamed_body(request.environ, settings.max_request_bytes)
            return None
        if not _credentials_match(settings):
            response, status = _error(401, "authentication required (HTTP basic auth)")
            response.headers["WWW-Authenticate"] = 'Basic realm="oneshot-backend"'
            return response, status
        buffer_streamed_body(request.environ, settings.max_request_bytes)
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


def _register_error_handlers(app: Flask, settings: Settings) -> None:
    """Every failure answered as ``{"error": message}`` with its status."""

    @app.errorhandler(BackendError)
    def backend_error(error: BackendError):
        log.warning("%s %s refused (%d): %s", request.method, request.path, error.status, error)
        return _error(error.status, str(error))

    @app.errorhandler(StoreError)
    def store_error(error: StoreError):
        log.error("%s %s: state store failed: %s", request.method, request.path, error)
        return _error(error.http_status, f"state store unavailable: {error}")

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        message = error.description or error.name
        if error.code == 413:
            message = (
                f"request body larger than the limit of {settings.max_request_bytes} bytes "
                "(MAX_REQUEST_BYTES)"
            )
            response, status = _error(413, message)
            # The rest of the body is still on the wire: a reused connection would read it as
            # the next request (and answer nothing). Closing is what the client can rely on.
            response.headers["Connection"] = "close"
            return response, status
        return _error(error.code or 500, message)

    @app.errorhandler(Exception)
    def unexpected_error(error: Exception):
        log.exception("%s %s failed", request.method, request.path)
        return _error(500, f"internal error: {type(error).__name__}: {error}")


def _register_routes(app: Flask, runtime: Runtime) -> None:
    """The ML backend protocol: ``/health``, ``/setup``, ``/predict``, ``/webhook``, ``/train``,
    ``/versions``, ``/metrics``."""
    _register_model_routes(app, runtime)
    _register_status_routes(app, runtime)


def _model_for(body: dict, runtime: Runtime, config_field: str) -> OneShotModel:
    """The model of the project a request names, with the label config it carries in
    ``config_field`` (``schema`` at ``/setup``, ``label_config`` elsewhere)."""
    return OneShotModel(
        project_id=body.get("project"),
        label_config=_optional_text(body, config_field),
        runtime=runtime,
    )


def _register_model_routes(app: Flask, runtime: Runtime) -> None:
    """The routes the model answers: ``/setup``, ``/predict``, ``/webhook``, ``/train``."""
    depth = runtime.settings.max_json_depth

    @app.post("/setup")
    def setup():
        body = _json_body(depth)
        version = _model_for(body, runtime, "schema").setup(
            hostname=_optional_url(body, "hostname"),
            access_token=_optional_text(body, "access_token"),
        )
        return jsonify({"model_version": version})

    @app.post("/predict")
    def predict():
        body = _json_body(depth)
        params = body.get("params") if isinstance(body.get("params"), dict) else {}
        context = params.get("context")
        if context is not None and not isinstance(context, dict):
            raise BadRequest(f"'params.context' must be an object, not {type(context).__name__}")
        model = _model_for(body, runtime, "label_config")
        return jsonify(model.predict(body.get("tasks"), context=context))

    @app.post("/webhook")
    def webhook():
        body = _json_body(depth)
        model = OneShotModel(runtime=runtime)
        return jsonify(model.fit(body.get("action"), body))

    @app.post("/train")
    def train():
        body = _json_body(depth)
        model = _model_for(body, runtime, "label_config")
        return jsonify(model.fit("START_TRAINING", {"project": body.get("project")}))


def _register_status_routes(app: Flask, runtime: Runtime) -> None:
    """What the service reports: ``/health``, ``/versions``, ``/metrics``."""
    settings = runtime.settings
    depth = settings.max_json_depth

    @app.get("/health")
    def health():
        # No store access and no call out here: Label Studio gives /health 1 s, also
        # mid-predict. Problems are answered with 200 all the same: Label Studio then calls
        # /setup, whose 503 it shows on the model card; a failed /health only says
        # "Disconnected", without a word of why.
        errors = [runtime.model_problem] if runtime.model_problem else []
        errors += runtime.connections.known_problems()
        return jsonify(
            {
                "status": "ERROR" if errors else "UP",
                "errors": errors,
                "model_class": OneShotModel.__name__,
                "model_loaded": runtime.model_loaded,
                "random_weights": settings.random_weights,
                "mode": settings.mode,
            }
        )

    @app.get("/versions")
    def versions():
        body = _json_body(depth) if request.content_length else {}
        project = request.args.get("project") or body.get("project")
        project_id = project_id_of(project) if project is not None else None
        return jsonify(versions_answer(runtime.store, project_id))

    @app.get("/metrics")
    def prometheus_metrics():
        return Response(
            runtime.metrics.render(), mimetype="text/plain; version=0.0.4; charset=utf-8"
        )


def versions_answer(store: StateStore, project_id: str | None) -> dict:
    """``/versions``: a project's model versions, history, current version and last error; for
    no project, each project's versions apart."""
    history = store.versions(project_id)
    if project_id is None:
        # Label Studio 1.23 sends no project on this GET: one list would mix the versions of
        # every project, so each project's are listed apart.
        by_project: dict[str, list[str]] = {}
        for entry in history:
            names = by_project.setdefault(str(entry["project_id"]), [])
            if entry["model_version"] not in names:
                names.append(entry["model_version"])
        return {"versions": [], "by_project": by_project, "hint": "/versions?project=<id>"}
    names = list(dict.fromkeys(entry["model_version"] for entry in history))
    state = store.load(project_id)
    return {
        "versions": names,
        "history": history,
        "current": state.model_version,
        "last_error": state.last_error,
    }
