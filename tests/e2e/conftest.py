"""Fixtures of the end-to-end test: a real Label Studio 1.23.2 and the backend, as subprocesses.

Label Studio runs from its own virtual environment (``scripts/label_studio.sh`` creates it on first
use; ``LS_VENV`` points at another one), the backend runs from this interpreter with the small
random-weight models (``ONESHOT_RANDOM_WEIGHTS=1``). Both listen on free ports of 127.0.0.1 and log
to files under pytest's temporary directory; a failing test prints the tails of both logs.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from .harness import (
    BACKEND_START_TIMEOUT_S,
    LABEL_STUDIO_SCRIPT,
    LABEL_STUDIO_START_TIMEOUT_S,
    LABEL_STUDIO_TOKEN,
    REPO_ROOT,
    Backend,
    LabelStudio,
    free_port,
    stop_process_group,
    tail,
    wait_until,
)


@pytest.fixture(scope="session")
def label_studio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LabelStudio]:
    """Label Studio 1.23.2 started offline on a free port with a fresh data directory."""
    work = tmp_path_factory.mktemp("label-studio")
    log = work / "label_studio.log"
    port = free_port()
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [
                "bash",
                str(LABEL_STUDIO_SCRIPT),
                "--port",
                str(port),
                "--data-dir",
                str(work / "data"),
                "--token",
                LABEL_STUDIO_TOKEN,
            ],
            cwd=REPO_ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: teardown stops Label Studio too
        )
    try:

        def ready() -> bool:
            if process.poll() is not None:
                pytest.fail(f"label_studio.sh exited with {process.returncode}:\n{tail(log)}")
            return "Label Studio is ready" in log.read_text(errors="replace")

        wait_until(ready, LABEL_STUDIO_START_TIMEOUT_S, 1.0, "Label Studio to start", log)
        yield LabelStudio(url=f"http://127.0.0.1:{port}", token=LABEL_STUDIO_TOKEN, log=log)
    finally:
        stop_process_group(process)


@contextlib.contextmanager
def running_backend(
    label_studio: LabelStudio, work: Path, wait_healthy: bool = True, **extra_env: str
) -> Iterator[Backend]:
    """The backend's development server with the small random-weight models on a free port,
    its log and model folder under ``work``; ``extra_env`` overrides its settings (a wrong token,
    models that cannot load)."""
    entry_point = REPO_ROOT / "_wsgi.py"
    if not entry_point.exists():
        pytest.fail(f"the backend entry point {entry_point} does not exist")
    log = work / "backend.log"
    model_dir = work / "model_dir"
    model_dir.mkdir()
    port = free_port()
    env = {
        key: value
        for key, value in os.environ.items()
        # A Redis or basic-auth setting of the caller's shell must not leak into this backend.
        if key not in {"REDIS_URL", "BASIC_AUTH_USER", "BASIC_AUTH_PASS"}
    }
    env.update(
        ONESHOT_RANDOM_WEIGHTS="1",
        MODEL_DIR=str(model_dir),
        DEVICE="cpu",
        LABEL_STUDIO_URL=label_studio.url,
        LABEL_STUDIO_API_KEY=label_studio.token,
        LOG_LEVEL="INFO",
        OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"),
        MKL_NUM_THREADS=env.get("MKL_NUM_THREADS", "1"),
        PYTHONUNBUFFERED="1",
    )
    env.update(extra_env)
    with log.open("wb") as log_file:
        process = subprocess.Popen(
            [sys.executable, str(entry_point), "--host", "127.0.0.1", "--port", str(port)],
            cwd=REPO_ROOT,
            env=env,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    url = f"http://127.0.0.1:{port}"
    try:

        def healthy() -> bool:
            if process.poll() is not None:
                pytest.fail(f"the backend exited with {process.returncode}:\n{tail(log)}")
            try:
                answer = requests.get(url + "/health", timeout=1)
            except requests.RequestException:
                return False
            return answer.status_code == 200 and (not wait_healthy or answer.json()["model_loaded"])

        wait_until(healthy, BACKEND_START_TIMEOUT_S, 0.5, "the backend's /health", log)
        yield Backend(url=url, log=log, model_dir=model_dir)
    finally:
        stop_process_group(process)


@pytest.fixture(scope="module")
def backend(
    label_studio: LabelStudio, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Backend]:
    """The backend with the small random-weight models, connected to the test Label Studio."""
    with running_backend(label_studio, tmp_path_factory.mktemp("backend")) as started:
        yield started


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """Attach the tails of the Label Studio and backend logs to a failing test's report."""
    outcome = yield
    report = outcome.get_result()
    if report.when not in ("setup", "call") or not report.failed:
        return
    for name in ("backend", "label_studio"):
        process = getattr(item, "funcargs", {}).get(name)
        if process is not None:
            report.sections.append((f"{name} log (tail)", tail(process.log, 80)))
