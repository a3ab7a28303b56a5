"""Entry points: ``gunicorn _wsgi:app`` (production) and ``python _wsgi.py`` (development).

Settings come from the environment (see ``backend/settings.py`` and the README). Gunicorn should
run one worker with several threads (``--workers 1 --threads 16``, as the Dockerfile does): the models load once per
process, and ``/health`` keeps answering while a prediction runs.
"""

from __future__ import annotations

import argparse
import logging
import sys

from backend.runtime import Runtime, set_runtime
from backend.server import configure_logging, create_app
from backend.settings import Settings, SettingsError

log = logging.getLogger("oneshot")


def _build_app(overrides: dict[str, str] | None = None):
    try:
        settings = Settings.from_env(overrides=overrides)
    except SettingsError as error:
        # A readable message instead of a traceback in the gunicorn log.
        sys.stderr.write(f"configuration error: {error}\n")
        raise SystemExit(2) from error
    configure_logging(settings, json_lines=settings.log_format == "json")
    log.info("settings: %s", settings.describe())
    runtime = Runtime(settings)
    set_runtime(runtime)  # background jobs and anything else asking for the runtime get this one
    # Load the models now: a failed load is then known (and shown by /health and /setup) before
    # Label Studio connects, not at the first task.
    runtime.warm_up()
    return create_app(runtime)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="One-shot labeling ML backend for Label Studio")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on")
    parser.add_argument("--port", type=int, default=9090, help="port to listen on")
    parser.add_argument("--debug", action="store_true", help="Flask debug mode (reloader off)")
    parser.add_argument(
        "--log-level", default=None, help="overrides LOG_LEVEL (DEBUG, INFO, WARNING, ERROR)"
    )
    parser.add_argument(
        "--random-weights",
        action="store_true",
        help="tiny random models (same as ONESHOT_RANDOM_WEIGHTS=1; smoke runs only)",
    )
    parser.add_argument("--model-dir", default=None, help="overrides MODEL_DIR")
    args = parser.parse_args(argv)
    overrides = {}
    if args.log_level:
        overrides["LOG_LEVEL"] = args.log_level
    if args.random_weights:
        overrides["ONESHOT_RANDOM_WEIGHTS"] = "1"
    if args.model_dir:
        overrides["MODEL_DIR"] = args.model_dir
    application = _build_app(overrides)
    # threaded: /health must answer while /predict runs (Label Studio gives it 1 s).
    application.run(
        host=args.host, port=args.port, debug=args.debug, use_reloader=False, threaded=True
    )


if __name__ == "__main__":
    main()
else:
    app = _build_app()
