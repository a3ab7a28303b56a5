"""Measure the "Three main paths" of docs/architecture.md: how many frames of this project's code
are on the stack when a path reaches its work (the download, the pipeline, the learning, the
results), counted from the first one, the work's own frame included.

Runs the tiny random-weight engine, in process, with no network: ``POST /predict`` through the
Flask test client (task images as data URIs), an annotation webhook and the training it
requests (thread jobs), and ``python -m matcher_core segment`` (its ``main``).

    .venv/bin/python bench/architecture_frames.py          # prints one line per path and target

A frame counts when its file is under the repository and not under ``tests/`` or ``bench/``
(Flask, werkzeug and the standard library are not counted).
"""

from __future__ import annotations

import base64
import functools
import io
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

LABEL_CONFIG = """
<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Cat"/></BrushLabels>
</View>
"""
PROJECT = 7


OUTSIDE = tuple(ROOT / name for name in ("tests", "bench", ".venv", ".venv-ls"))
"""Folders under the repository that are not this project's code (virtual environments too)."""


def own_frames() -> list[str]:
    """This project's frames on the caller's stack, outermost first (this module's left out)."""
    names = []
    frame = sys._getframe(2)  # the measured function's caller
    while frame is not None:
        path = Path(frame.f_code.co_filename).resolve()
        if path.is_relative_to(ROOT) and not any(path.is_relative_to(o) for o in OUTSIDE):
            code = frame.f_code
            name = getattr(code, "co_qualname", code.co_name).replace(".<locals>", "")
            names.append(f"{path.relative_to(ROOT).with_suffix('')}:{name}")
        frame = frame.f_back
    return names[::-1]


SEEN: dict[str, list[str]] = {}


def recorded(name: str, function: Callable) -> Callable:
    """``function``, recording the project's frames above it at its first call."""

    @functools.wraps(function)
    def wrapper(*args, **kwargs):
        SEEN.setdefault(name, own_frames() + [name])
        return function(*args, **kwargs)

    return wrapper


def scene(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 90, (60, 80, 3), dtype=np.uint8)
    image[15:40, 20:50] = (230, 200, 40)
    return image


def data_uri(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def instrument() -> None:
    """Wrap each path's work where the code that reaches it looks it up."""
    import backend.prediction
    import backend.project
    import backend.training
    from matcher_core import pipelines

    backend.project.fetch_image_bytes = recorded(
        "labelstudio.download.fetch_image_bytes", backend.project.fetch_image_bytes
    )
    backend.prediction.instances_to_results = recorded(
        "labelstudio.instances_to_results", backend.prediction.instances_to_results
    )
    backend.training.learn_from_corrections = recorded(
        "matcher_core.learning.learn", backend.training.learn_from_corrections
    )
    for mode, pipeline in list(pipelines.PIPELINES.items()):
        pipelines.PIPELINES[mode] = recorded(f"PIPELINES[{mode!r}]", pipeline)


def report(path: str, names: list[str] | None = None) -> None:
    """Print what was recorded (``names`` only, when given) and forget it."""
    for name, frames in list(SEEN.items()):
        if names is None or name in names:
            print(f"{path}: {len(frames)} frames to {name}: {' -> '.join(frames)}")
            del SEEN[name]
    if names is None:
        SEEN.clear()


def service_paths(work: Path) -> None:
    from backend.runtime import Runtime
    from backend.server import create_app
    from backend.settings import Settings
    from labelstudio import instances_to_results, parse_label_config
    from matcher_core import Instance

    settings = Settings.from_env(
        {
            "ONESHOT_RANDOM_WEIGHTS": "1",
            "DEVICE": "cpu",
            "MODEL_DIR": str(work),
            "TRAIN_DEBOUNCE": "0",
            # Label Studio's address, so a long batch may be deferred (never reached here).
            "LABEL_STUDIO_URL": "http://127.0.0.1:9",
            "LABEL_STUDIO_API_KEY": "0123456789abcdef0123456789abcdef01234567",
        }
    )
    runtime = Runtime(settings)
    runtime.jobs.request_training = recorded("Jobs.request_training", runtime.jobs.request_training)
    client = create_app(runtime).test_client()
    mask = np.zeros((60, 80), bool)
    mask[15:40, 20:50] = True
    results = instances_to_results(
        [Instance.from_mask("Cat", mask, 1.0)], parse_label_config(LABEL_CONFIG), (60, 80)
    )
    SEEN.clear()
    event = {
        "action": "ANNOTATION_CREATED",
        "annotation": {"id": 1, "result": results, "task": 1, "project": PROJECT},
        "task": {"id": 1, "data": {"image": data_uri(scene(0))}, "project": PROJECT},
        "project": {"id": PROJECT, "label_config": LABEL_CONFIG},
    }
    answer = client.post("/webhook", json=event)
    assert answer.status_code == 200, answer.get_json()
    report("annotation webhook (request)", ["Jobs.request_training"])
    runtime.jobs.wait_idle(600)
    # A second annotation: the training then learns from corrections (learning.learn).
    event["annotation"] = {**event["annotation"], "id": 2, "task": 2}
    event["task"] = {**event["task"], "id": 2, "data": {"image": data_uri(scene(1))}}
    SEEN.clear()
    client.post("/webhook", json=event)
    SEEN.pop("Jobs.request_training", None)
    runtime.jobs.wait_idle(600)
    report("training (thread)")
    deadline = time.monotonic() + 60
    while runtime.store.load(str(PROJECT)).reference is None and time.monotonic() < deadline:
        time.sleep(0.1)
    tasks = [{"id": 10, "data": {"image": data_uri(scene(2))}}]
    answer = client.post(
        "/predict", json={"tasks": tasks, "project": f"{PROJECT}.1", "label_config": LABEL_CONFIG}
    )
    assert answer.status_code == 200, answer.get_json()
    report("POST /predict")
    runtime.close()


def cli_path(work: Path) -> None:
    from matcher_core.__main__ import main

    image, mask = work / "ref.png", work / "ref_mask.png"
    Image.fromarray(scene(0)).save(image)
    truth = np.zeros((60, 80), np.uint8)
    truth[15:40, 20:50] = 255
    Image.fromarray(truth).save(mask)
    Image.fromarray(scene(3)).save(work / "target.jpg")
    main(
        [
            "segment",
            "--random-weights",
            "--device",
            "cpu",
            "--model-dir",
            str(work / "models"),
            "--ref-image",
            str(image),
            "--ref-mask",
            str(mask),
            "--out",
            str(work / "out"),
            str(work / "target.jpg"),
        ]
    )
    report("python -m matcher_core segment")


def main() -> None:
    instrument()
    with tempfile.TemporaryDirectory() as folder:
        service_paths(Path(folder))
        cli_path(Path(folder))


if __name__ == "__main__":
    main()
