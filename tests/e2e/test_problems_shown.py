"""End to end with a real Label Studio 1.23.2: what stops pre-labels is shown where the user looks.

Label Studio shows a backend's trouble only as the text of a failed ``/setup``: when connecting
(the "Connect Model" form refuses with it) and on the model card (state *Error*). Each case starts
its own backend with one thing wrong and checks Label Studio's answer and the backend's
``/health``. Runs only with ``ONESHOT_E2E=1``.
"""

from __future__ import annotations

import os

import pytest
import requests

from .conftest import running_backend
from .harness import Backend, LabelStudio, wait_until

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        not os.environ.get("ONESHOT_E2E"),
        reason="end-to-end test with a real Label Studio: set ONESHOT_E2E=1 to run it",
    ),
]

LABEL_CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Object"/></BrushLabels>
</View>
"""


def connect(label_studio: LabelStudio, backend: Backend, title: str) -> requests.Response:
    """Create a project and press "Connect Model" with the backend's URL; Label Studio's raw
    answer (201, or 400 with the reason it shows in the form)."""
    project = label_studio.post(
        "/api/projects/", json={"title": title, "label_config": LABEL_CONFIG}, expect=201
    )
    return label_studio.session.post(
        label_studio.url + "/api/ml",
        json={"url": backend.url, "project": project["id"], "title": title},
        timeout=60,
    )


def health(backend: Backend) -> dict:
    return requests.get(backend.url + "/health", timeout=5).json()


def test_a_token_label_studio_refuses_is_shown_when_connecting_and_in_health(
    label_studio: LabelStudio, tmp_path
) -> None:
    """The situation of a default Label Studio 1.23 (legacy tokens off): every download would
    get 401. Connecting says so, with the fix, before any task is opened."""
    with running_backend(
        label_studio, tmp_path, LABEL_STUDIO_API_KEY="a-token-this-label-studio-refuses"
    ) as backend:
        answer = connect(label_studio, backend, "refused token")

        assert answer.status_code == 400, answer.text
        assert "refused the backend's API token (HTTP 401)" in answer.text
        assert "LABEL_STUDIO_API_KEY" in answer.text  # the fix, in Label Studio's form
        state = health(backend)
        assert state["status"] == "ERROR"
        assert any("refused the backend's API token" in error for error in state["errors"])


def test_models_that_fail_to_load_are_shown_when_connecting_and_in_health(
    label_studio: LabelStudio, tmp_path
) -> None:
    """A backend whose models cannot load does not look connected: Label Studio refuses the
    connection with the cause, and ``/health`` says ERROR."""
    with running_backend(
        label_studio, tmp_path, wait_healthy=False, ENCODER="no_such_encoder_model"
    ) as backend:
        wait_until(
            lambda: health(backend)["status"] == "ERROR",
            60,
            0.5,
            "the failed model load to show in /health",
            backend.log,
        )
        answer = connect(label_studio, backend, "models failed")

        assert answer.status_code == 400, answer.text
        assert "the models failed to load" in answer.text
        assert "no_such_encoder_model" in answer.text
        assert health(backend)["model_loaded"] is False
