"""Helpers of the end-to-end test: processes, polling, and a small Label Studio REST client."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests

REPO_ROOT = Path(__file__).resolve().parents[2]
LABEL_STUDIO_SCRIPT = REPO_ROOT / "scripts" / "label_studio.sh"
# Fixed legacy token of the test Label Studio (sent as "Authorization: Token <key>").
LABEL_STUDIO_TOKEN = "oneshot-e2e-legacy-token-0123456789"
# First start on an empty data directory runs the migrations (26-37 s measured); installing the
# virtual environment first adds about 75 s. Leave room for a slow, shared CI machine.
LABEL_STUDIO_START_TIMEOUT_S = 600.0
BACKEND_START_TIMEOUT_S = 180.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def tail(path: Path, lines: int = 60) -> str:
    """The last ``lines`` distinct lines of a log file (empty when it does not exist).

    Runs of identical lines collapse to one: Label Studio logs each request twice, and polling
    repeats the same line many times.
    """
    if not path.exists():
        return ""
    kept: list[str] = []
    for line in path.read_text(errors="replace").splitlines():
        if not kept or line != kept[-1]:
            kept.append(line)
    return "\n".join(kept[-lines:])


def stop_process_group(process: subprocess.Popen[bytes], grace_s: float = 30.0) -> None:
    """SIGTERM the process group started for ``process``, SIGKILL it after ``grace_s``."""
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def wait_until(
    condition: Callable[[], Any], timeout_s: float, interval_s: float, what: str, log: Path
) -> Any:
    """Poll ``condition`` until it returns a truthy value; fail with the log's tail on timeout."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    pytest.fail(f"timed out after {timeout_s:.0f} s waiting for {what}; log {log}:\n{tail(log)}")


@dataclass
class LabelStudio:
    """A running Label Studio and a REST client for it (``Authorization: Token ...``)."""

    url: str
    token: str
    log: Path
    session: requests.Session = field(default_factory=requests.Session)

    def __post_init__(self) -> None:
        self.session.headers["Authorization"] = f"Token {self.token}"

    def request(self, method: str, path: str, expect: int | tuple[int, ...] = 200, **kwargs: Any):
        """Send a request to ``url + path``; fail with the response body unless the status is
        one of ``expect``. Returns the decoded JSON body (``None`` when it is empty)."""
        expected = (expect,) if isinstance(expect, int) else expect
        kwargs.setdefault("timeout", 180)
        response = self.session.request(method, self.url + path, **kwargs)
        if response.status_code not in expected:
            pytest.fail(
                f"{method} {path} answered {response.status_code} (expected {expected}): "
                f"{response.text[:2000]}\nLabel Studio log:\n{tail(self.log, 30)}"
            )
        return response.json() if response.content else None

    def get(self, path: str, **kwargs: Any):
        return self.request("GET", path, **kwargs)

    def post(self, path: str, **kwargs: Any):
        return self.request("POST", path, **kwargs)


@dataclass
class Backend:
    """The running ML backend (``python _wsgi.py``)."""

    url: str
    log: Path
    model_dir: Path


def prometheus_value(metrics_text: str, name: str, labels: dict[str, str] | None = None) -> float:
    """The value of one sample in a Prometheus text exposition (0 when it is absent, as an
    unincremented counter is)."""
    wanted = name
    if labels:
        wanted += "{" + ",".join(f'{key}="{value}"' for key, value in labels.items()) + "}"
    for line in metrics_text.splitlines():
        if line.startswith("#"):
            continue
        sample, _, value = line.rpartition(" ")
        if sample == wanted:
            return float(value)
    return 0.0
