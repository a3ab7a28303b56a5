"""Capture pre-labels in Label Studio's real UI with headless Chromium (for the README).

Run by ``scripts/screenshot.sh``, which starts Label Studio and the backend first. This script
creates a BrushLabels project, uploads a few images, connects the backend, submits the ground-truth
mask of the first image as the one annotation, presses "Retrieve Predictions", then logs in to the
UI with Chromium (driven over the DevTools protocol) and saves the labeling page of a pre-labeled
task as a PNG.

Runs with the Label Studio virtual environment's Python (it has requests, numpy, Pillow and
label-studio-sdk) plus ``websocket-client``.
"""

from __future__ import annotations

import argparse
import base64
import json
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import requests
import websocket
from label_studio_sdk.converter.brush import mask2rle
from PIL import Image

LABEL_CONFIG = """
<View>
  <Image name="image" value="$image" zoom="true"/>
  <BrushLabels name="tag" toName="image">
    <Label value="Object" background="#ff6a00"/>
  </BrushLabels>
</View>
"""
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--hide-scrollbars",
]


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def brush_region(mask_path: Path) -> dict[str, Any]:
    """The Label Studio brush region of a ground-truth mask PNG (``(H, W)``, 0 / 255)."""
    mask = np.where(np.asarray(Image.open(mask_path).convert("L")) > 127, 255, 0).astype(np.uint8)
    height, width = mask.shape
    return {
        "id": "reference",
        "from_name": "tag",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": width,
        "original_height": height,
        "image_rotation": 0,
        "value": {"format": "rle", "rle": mask2rle(mask), "brushlabels": ["Object"]},
    }


def prepare_project(
    url: str, token: str, backend_url: str, images: list[Path], timeout_s: float = 180.0
) -> tuple[int, int]:
    """Create, fill and pre-label a project; returns (project id, id of a pre-labeled task)."""
    api = requests.Session()
    api.headers["Authorization"] = f"Token {token}"

    def call(method: str, path: str, **kwargs: Any) -> Any:
        response = api.request(method, url + path, timeout=180, **kwargs)
        response.raise_for_status()
        return response.json() if response.content else None

    project = call(
        "POST", "/api/projects/", json={"title": "One-shot demo", "label_config": LABEL_CONFIG}
    )
    files = {f"file{i}": (p.name, p.read_bytes(), "image/jpeg") for i, p in enumerate(images)}
    call("POST", f"/api/projects/{project['id']}/import", files=files)
    tasks = call("GET", "/api/tasks", params={"project": project["id"], "page_size": 100})["tasks"]
    call(
        "POST", "/api/ml", json={"url": backend_url, "project": project["id"], "title": "one-shot"}
    )

    reference, *others = tasks
    stem = reference["data"]["image"].rsplit("-", 1)[1].removesuffix(".jpg")
    mask_path = next(p.with_suffix(".png") for p in images if p.stem == stem)
    call(
        "POST",
        f"/api/tasks/{reference['id']}/annotations/",
        json={"result": [brush_region(mask_path)], "lead_time": 3.0},
    )
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        call(
            "POST",
            f"/api/dm/actions/?id=retrieve_tasks_predictions&project={project['id']}",
            json={"selectedItems": {"all": True, "excluded": []}},
        )
        predictions = call("GET", "/api/predictions/", params={"project": project["id"]})
        labeled = {p["task"] for p in predictions if p["result"]}
        for task in others:
            if task["id"] in labeled:
                return project["id"], task["id"]
        time.sleep(2.0)
    raise SystemExit(f"no task got a pre-label within {timeout_s:.0f} s")


class DevTools:
    """A minimal Chrome DevTools Protocol session on one page."""

    def __init__(self, websocket_url: str) -> None:
        self.socket = websocket.create_connection(websocket_url, timeout=60, suppress_origin=True)
        self.last_id = 0

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self.last_id += 1
        self.socket.send(json.dumps({"id": self.last_id, "method": method, "params": params}))
        while True:
            message = json.loads(self.socket.recv())
            if message.get("id") == self.last_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message.get("result", {})

    def evaluate(self, expression: str) -> Any:
        reply = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return reply.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.evaluate(expression):
                return
            time.sleep(0.5)
        raise SystemExit(f"timed out waiting for {what}")


def capture(
    url: str, username: str, password: str, page_path: str, output: Path, settle_s: float
) -> None:
    """Log in to Label Studio with headless Chromium and save ``page_path`` as a PNG."""
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile:
        browser = subprocess.Popen(
            [
                "chromium",
                *CHROMIUM_FLAGS,
                f"--remote-debugging-port={port}",
                f"--user-data-dir={profile}",
                "--window-size=1440,900",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    targets = requests.get(f"http://127.0.0.1:{port}/json/list", timeout=2).json()
                    page = next(t for t in targets if t["type"] == "page")
                    break
                except (requests.RequestException, StopIteration):
                    if time.monotonic() > deadline:
                        raise SystemExit("Chromium's DevTools endpoint did not come up") from None
                    time.sleep(0.5)
            tools = DevTools(page["webSocketDebuggerUrl"])
            tools.call("Page.enable")
            tools.call(
                "Emulation.setDeviceMetricsOverride",
                width=1440,
                height=900,
                deviceScaleFactor=1,
                mobile=False,
            )

            tools.call("Page.navigate", url=f"{url}/user/login/")
            tools.wait_for("!!document.querySelector('input[name=email]')", 60, "the login form")
            tools.evaluate(
                "(() => {"
                f"document.querySelector('input[name=email]').value = {json.dumps(username)};"
                f"document.querySelector('input[name=password]').value = {json.dumps(password)};"
                "document.querySelector('input[name=email]').form.submit(); })()"
            )
            tools.wait_for("!location.pathname.startsWith('/user/login')", 60, "the login")

            tools.call("Page.navigate", url=url + page_path)
            # The labeling editor draws the image and the masks on canvases once both loaded.
            tools.wait_for(
                "document.querySelectorAll('canvas').length >= 2", 90, "the labeling editor"
            )
            time.sleep(settle_s)
            shot = tools.call("Page.captureScreenshot", format="png")
            output.parent.mkdir(parents=True, exist_ok=True)
            output.write_bytes(base64.b64decode(shot["data"]))
        finally:
            browser.terminate()
            browser.wait(timeout=20)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True, help="Label Studio URL")
    parser.add_argument("--token", required=True, help="Label Studio legacy API token")
    parser.add_argument("--username", required=True)
    parser.add_argument("--password", required=True)
    parser.add_argument("--backend-url", required=True)
    parser.add_argument(
        "--images", type=Path, nargs="+", required=True, help="JPEGs with PNG masks"
    )
    parser.add_argument("--output", type=Path, default=Path("docs/prelabels.png"))
    parser.add_argument("--settle", type=float, default=8.0, help="seconds to let the UI draw")
    args = parser.parse_args()

    project_id, task_id = prepare_project(args.url, args.token, args.backend_url, args.images)
    capture(
        args.url,
        args.username,
        args.password,
        f"/projects/{project_id}/data?task={task_id}",
        args.output,
        args.settle,
    )
    print(f"saved {args.output} (project {project_id}, task {task_id})")


if __name__ == "__main__":
    main()
