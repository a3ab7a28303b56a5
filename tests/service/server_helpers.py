"""Helpers of the backend tests: images, annotations, webhook bodies, a fake Label Studio's
state and a redis-server process (the fixtures using them are in ``server_fixtures.py``)."""

from __future__ import annotations

import io
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from backend.settings import Settings
from builders import brush_result  # noqa: F401  (re-exported to the service tests)

LABEL_CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Cat"/>
    <Label value="Dog"/>
  </BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true">
    <Label value="Cat"/>
    <Label value="Dog"/>
  </KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true">
    <Label value="Cat"/>
    <Label value="Dog"/>
  </RectangleLabels>
</View>
"""
API_TOKEN = "0123456789abcdef0123456789abcdef01234567"
IMAGE_SIZE = (60, 80)  # (H, W)


# ---------------------------------------------------------------------------------------------
# Images and annotations
# ---------------------------------------------------------------------------------------------


def scene(seed: int, size: tuple[int, int] = IMAGE_SIZE, box=(15, 20, 40, 50)) -> np.ndarray:
    """``(H, W, 3)`` uint8: a noisy background with a bright square at ``box`` (y0, x0, y1, x1)."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 90, (*size, 3), dtype=np.uint8)
    y0, x0, y1, x1 = box
    image[y0:y1, x0:x1] = (230, 200, 40)
    return image


def square_mask(size: tuple[int, int] = IMAGE_SIZE, box=(15, 20, 40, 50)) -> np.ndarray:
    mask = np.zeros(size, dtype=bool)
    y0, x0, y1, x1 = box
    mask[y0:y1, x0:x1] = True
    return mask


def png_bytes(image: np.ndarray, mode: str | None = None) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(image, mode=mode).save(buffer, format="PNG")
    return buffer.getvalue()


def annotation_event(
    project: int,
    annotation_id: int,
    task_id: int,
    image_url: str,
    results: list[dict],
    action: str = "ANNOTATION_CREATED",
    label_config: str = LABEL_CONFIG,
) -> dict:
    """The body Label Studio posts to ``/webhook`` when an annotation is submitted."""
    return {
        "action": action,
        "annotation": {
            "id": annotation_id,
            "result": results,
            "task": task_id,
            "project": project,
            "was_cancelled": False,
            "created_at": "2025-01-01T00:00:00Z",
        },
        "task": {"id": task_id, "data": {"image": image_url}, "project": project},
        "project": {"id": project, "label_config": label_config, "title": f"p{project}"},
    }


@dataclass
class FakeLabelStudio:
    url: str
    token: str
    files: dict[str, bytes] = field(default_factory=dict)
    """path (``/data/upload/1/x.png``) -> bytes; ``/status/<code>`` paths answer that code."""
    exported: dict[int, list[dict]] = field(default_factory=dict)
    """project id -> tasks with annotations (what ``/api/projects/<id>/export`` returns)."""
    posted: list[dict] = field(default_factory=list)
    downloads: int = 0
    annotations: dict[int, list[dict]] = field(default_factory=dict)
    """task id -> its annotations (``/api/tasks/<id>/annotations/``)."""
    deleted: list[int] = field(default_factory=list)
    """Ids (1-based positions in ``posted``) of predictions deleted through the API."""

    def add_image(self, project: int, name: str, data: bytes) -> str:
        path = f"/data/upload/{project}/{name}"
        self.files[path] = data
        return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def make_settings(model_dir: Path, state_dir: Path, **env: str) -> Settings:
    base = {
        "ONESHOT_RANDOM_WEIGHTS": "1",
        "MODEL_DIR": str(state_dir),
        "DEVICE": "cpu",
        "TRAIN_DEBOUNCE": "0.05",
        "FETCH_TIMEOUT": "5",
    }
    base.update(env)
    return Settings.from_env(base)


@dataclass
class RedisServer:
    binary: str
    directory: Path
    port: int
    process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        # appendfsync always: every acknowledged write is on disk, so a kill -9 loses nothing.
        self.process = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.directory),
                "--appendonly",
                "yes",
                "--appendfsync",
                "always",
                "--save",
                "",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                    return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not start")

    def kill(self) -> None:
        if self.process is not None:
            self.process.kill()
            self.process.wait(10)
            self.process = None
