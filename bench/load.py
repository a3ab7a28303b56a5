"""The backend under load: gunicorn (several workers and threads) on tiny random models.

Starts, all on 127.0.0.1 and all stopped at the end:

* a tiny HTTP server playing Label Studio's ``/data/upload`` (token-checked PNG uploads);
* ``gunicorn _wsgi:app`` with ``ONESHOT_RANDOM_WEIGHTS=1`` and ``MODEL_DIR`` in a temporary
  directory;

then sets a project up (``/setup``, then an ``ANNOTATION_CREATED`` webhook with a brush mask),
waits for its reference, and measures:

* ``/predict`` (one task per request, a different image every request: download, encoder pass,
  matching, SAM decoding, RLE) at 1, 4 and 16 concurrent clients: throughput and p50/p95/p99;
* ``/health`` latency, polled while the 16 clients saturate the server (Label Studio gives it 1 s);
* peak resident memory (``VmHWM``) of every gunicorn worker.

It prints one markdown report. Every phase sends a bounded number of requests with timeouts, so
the run ends by itself (a few minutes on one CPU core).

    python bench/load.py
    python bench/load.py --workers 2 --threads 4 --requests 40,80,160 --image-size 256
"""

from __future__ import annotations

import argparse
import http.server
import io
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import requests
from label_studio_sdk.converter.brush import mask2rle
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PROJECT = 1
TOKEN = "bench-token-0123456789abcdef"
LABEL_CONFIG = """<View>
  <Image name="image" value="$image"/>
  <BrushLabels name="tag" toName="image"><Label value="Object"/></BrushLabels>
</View>"""
HEALTH_INTERVAL = 0.05
REQUEST_TIMEOUT = 120.0


# ---------------------------------------------------------------------------------------------
# Images and a stand-in for Label Studio's file server
# ---------------------------------------------------------------------------------------------


def scene(seed: int, size: int) -> tuple[bytes, np.ndarray]:
    """PNG bytes of a ``size x size`` noisy image with one bright square, and its ``(H, W)`` mask."""
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 90, (size, size, 3), dtype=np.uint8)
    side = size // 3
    y0, x0 = rng.integers(0, size - side, 2)
    mask = np.zeros((size, size), dtype=bool)
    mask[y0 : y0 + side, x0 : x0 + side] = True
    image[mask] = (230, 200, 40)
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue(), mask


class Uploads(http.server.ThreadingHTTPServer):
    """Serves ``/data/upload/<project>/<name>`` from memory to requests bearing the token."""

    daemon_threads = True

    def __init__(self) -> None:
        self.files: dict[str, bytes] = {}
        super().__init__(("127.0.0.1", 0), _UploadHandler)
        self.thread = threading.Thread(target=self.serve_forever, args=(0.1,), daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def add(self, name: str, data: bytes) -> str:
        path = f"/data/upload/{PROJECT}/{name}"
        self.files[path] = data
        return path

    def stop(self) -> None:
        self.shutdown()
        self.server_close()


class _UploadHandler(http.server.BaseHTTPRequestHandler):
    server: Uploads

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        data = self.server.files.get(self.path)
        if self.headers.get("Authorization") != f"Token {TOKEN}" or data is None:
            self.send_response(404 if data is None else 401)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args) -> None:  # quiet
        pass


# ---------------------------------------------------------------------------------------------
# Gunicorn
# ---------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_gunicorn(port: int, workers: int, threads: int, model_dir: str, log_path: Path):
    env = {
        **os.environ,
        "ONESHOT_RANDOM_WEIGHTS": "1",
        "DEVICE": "cpu",
        "MODEL_DIR": model_dir,
        "TRAIN_DEBOUNCE": "0.2",
        "PREDICT_TIME_BUDGET": "100",
        "LOG_LEVEL": "WARNING",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "MKL_NUM_THREADS": os.environ.get("MKL_NUM_THREADS", "1"),
    }
    for name in ("REDIS_URL", "JOBS", "BASIC_AUTH_USER", "BASIC_AUTH_PASS", "LABEL_STUDIO_URL"):
        env.pop(name, None)
    gunicorn = shutil.which("gunicorn", path=str(Path(sys.executable).parent)) or "gunicorn"
    command = [
        gunicorn,
        "_wsgi:app",
        "--bind",
        f"127.0.0.1:{port}",
        "--workers",
        str(workers),
        "--threads",
        str(threads),
        "--timeout",
        "300",
        "--graceful-timeout",
        "5",
    ]
    log = log_path.open("wb")
    process = subprocess.Popen(
        command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    return process, log


def stop_gunicorn(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(15)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(5)


def worker_pids(master: int) -> list[int]:
    children = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The parent pid is the second field after the parenthesised command name.
        if int(stat.rsplit(")", 1)[1].split()[1]) == master:
            children.append(int(entry.name))
    return sorted(children)


def memory_kib(pid: int) -> dict[str, int]:
    """``VmHWM`` (peak resident set) and ``VmRSS`` of a process, in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            values[key] = int(rest.split()[0])
    return values


def wait_for(condition, timeout: float, what: str, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"gunicorn exited (code {process.returncode}) while {what}")
        try:
            if condition():
                return
        except requests.RequestException:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"timed out while {what}")


# ---------------------------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) if values else float("nan")


def run_phase(base: str, bodies: list[dict], clients: int) -> dict:
    """Send ``bodies`` to ``/predict`` from ``clients`` concurrent clients (each with its own
    keep-alive session); latencies of successful requests, throughput, error count."""
    pending = list(reversed(bodies))
    lock = threading.Lock()
    latencies: list[float] = []
    errors: list[str] = []

    def client() -> None:
        with requests.Session() as session:
            while True:
                with lock:
                    if not pending:
                        return
                    body = pending.pop()
                started = time.perf_counter()
                try:
                    answer = session.post(f"{base}/predict", json=body, timeout=REQUEST_TIMEOUT)
                    ok = answer.status_code == 200 and not answer.json().get("errors")
                    problem = None if ok else f"{answer.status_code}: {answer.text[:200]}"
                except requests.RequestException as error:
                    problem = f"{type(error).__name__}: {error}"
                seconds = time.perf_counter() - started
                with lock:
                    if problem is None:
                        latencies.append(seconds)
                    else:
                        errors.append(problem)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        for future in [pool.submit(client) for _ in range(clients)]:
            future.result()
    wall = time.perf_counter() - started
    return {
        "clients": clients,
        "requests": len(bodies),
        "ok": len(latencies),
        "errors": errors,
        "throughput": len(latencies) / wall,
        "p50": percentile(latencies, 50),
        "p95": percentile(latencies, 95),
        "p99": percentile(latencies, 99),
        "wall": wall,
    }


class HealthProbe:
    """Polls ``/health`` every ``HEALTH_INTERVAL`` seconds on a fresh connection each time (as
    Label Studio does) until stopped; records each latency."""

    def __init__(self, base: str):
        self.base = base
        self.latencies: list[float] = []
        self.failures = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.perf_counter()
            try:
                answer = requests.get(f"{self.base}/health", timeout=10)
                if answer.status_code == 200:
                    self.latencies.append(time.perf_counter() - started)
                else:
                    self.failures += 1
            except requests.RequestException:
                self.failures += 1
            self._stop.wait(HEALTH_INTERVAL)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(15)


def predict_body(uploads: Uploads, index: int, size: int) -> dict:
    data, _ = scene(10_000 + index, size)
    url = uploads.add(f"target-{index}.png", data)
    return {
        "project": f"{PROJECT}.1700000000",
        "label_config": LABEL_CONFIG,
        "tasks": [{"id": 1000 + index, "data": {"image": url}}],
        "params": {"context": None},
    }


def set_up_project(base: str, uploads: Uploads, size: int, process) -> str:
    setup = {
        "project": f"{PROJECT}.1700000000",
        "schema": LABEL_CONFIG,
        "hostname": uploads.url,
        "access_token": TOKEN,
    }
    answer = requests.post(f"{base}/setup", json=setup, timeout=30)
    answer.raise_for_status()
    data, mask = scene(0, size)
    url = uploads.add("reference.png", data)
    result = {
        "id": "r1",
        "from_name": "tag",
        "to_name": "image",
        "type": "brushlabels",
        "original_width": size,
        "original_height": size,
        "image_rotation": 0,
        "value": {
            "format": "rle",
            "rle": mask2rle(mask.astype(np.uint8) * 255),
            "brushlabels": ["Object"],
        },
    }
    event = {
        "action": "ANNOTATION_CREATED",
        "annotation": {"id": 1, "task": 1, "result": [result], "was_cancelled": False},
        "task": {"id": 1, "data": {"image": url}},
        "project": {"id": PROJECT, "label_config": LABEL_CONFIG},
    }
    requests.post(f"{base}/webhook", json=event, timeout=30).raise_for_status()

    def has_reference() -> bool:
        answer = requests.get(f"{base}/versions", params={"project": PROJECT}, timeout=5)
        return answer.json().get("current", "oneshot-waiting") != "oneshot-waiting"

    wait_for(has_reference, 180, "waiting for the reference", process)
    return requests.get(f"{base}/versions", params={"project": PROJECT}, timeout=5).json()[
        "current"
    ]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=4)
    parser.add_argument(
        "--clients", default="1,4,16", help="concurrent clients of each phase (comma-separated)"
    )
    parser.add_argument(
        "--requests", default="40,80,160", help="requests of each phase (comma-separated)"
    )
    parser.add_argument("--image-size", type=int, default=256, help="square images, pixels")
    args = parser.parse_args(argv)
    clients = [int(c) for c in args.clients.split(",")]
    counts = [int(n) for n in args.requests.split(",")]
    if len(clients) != len(counts):
        parser.error("--clients and --requests need as many entries")

    scratch = Path(tempfile.mkdtemp(prefix="oneshot-load-"))
    uploads = Uploads()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    process, log = start_gunicorn(
        port, args.workers, args.threads, str(scratch / "model_dir"), scratch / "gunicorn.log"
    )
    try:
        wait_for(
            lambda: requests.get(f"{base}/health", timeout=2).status_code == 200,
            120,
            "starting gunicorn",
            process,
        )
        started = time.perf_counter()
        version = set_up_project(base, uploads, args.image_size, process)
        setup_seconds = time.perf_counter() - started
        index = 0

        def bodies(n: int) -> list[dict]:
            nonlocal index
            made = [predict_body(uploads, index + i, args.image_size) for i in range(n)]
            index += n
            return made

        # Warm-up (not measured): every worker loads its models on its first prediction.
        warm = run_phase(base, bodies(4 * args.workers), 2 * args.workers)
        phases = []
        health = None
        for n_clients, n_requests in zip(clients, counts, strict=True):
            if n_clients == max(clients):
                with HealthProbe(base) as health:
                    phases.append(run_phase(base, bodies(n_requests), n_clients))
            else:
                phases.append(run_phase(base, bodies(n_requests), n_clients))
        memory = {pid: memory_kib(pid) for pid in worker_pids(process.pid)}
        master_memory = memory_kib(process.pid)
    finally:
        stop_gunicorn(process)
        log.close()
        uploads.stop()

    report(args, version, setup_seconds, warm, phases, health, memory, master_memory)
    problems = [e for phase in [warm, *phases] for e in phase["errors"]]
    if problems:
        print("\nErrors (first 5):")
        for problem in problems[:5]:
            print(f"- {problem}")
        print(f"\ngunicorn log: {scratch / 'gunicorn.log'}")
    else:
        shutil.rmtree(scratch, ignore_errors=True)


def report(args, version, setup_seconds, warm, phases, health, memory, master_memory) -> None:
    cpus = len(os.sched_getaffinity(0))
    print(
        f"## /predict under load: gunicorn {args.workers} workers x {args.threads} threads, "
        f"tiny random models, {args.image_size}x{args.image_size} images\n"
    )
    print(
        f"{platform.processor() or platform.machine()}, {cpus} CPU core(s) available to this "
        f"process, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
        "one task per request, a new image each time (download, encoder, matching, decoding, RLE); "
        f"reference ready {setup_seconds:.1f} s after /setup (version `{version}`); "
        f"warm-up {warm['requests']} requests not counted.\n"
    )
    print("| clients | requests | ok | throughput (req/s) | p50 (s) | p95 (s) | p99 (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for phase in phases:
        print(
            f"| {phase['clients']} | {phase['requests']} | {phase['ok']} | "
            f"{phase['throughput']:.2f} | {phase['p50']:.3f} | {phase['p95']:.3f} | "
            f"{phase['p99']:.3f} |"
        )
    if health is not None:
        values = health.latencies
        verdict = "under" if values and percentile(values, 95) < 1.0 else "NOT under"
        print(
            f"\n`/health` while {max(p['clients'] for p in phases)} clients saturate the server: "
            f"{len(values)} probes, p50 {percentile(values, 50) * 1000:.1f} ms, "
            f"p95 {percentile(values, 95) * 1000:.1f} ms, max "
            f"{(max(values) if values else float('nan')) * 1000:.1f} ms, {health.failures} "
            f"failed ({verdict} Label Studio's 1 s).\n"
        )
    print("| process | peak RSS (VmHWM, MiB) | RSS at the end (MiB) |")
    print("|---|---:|---:|")
    print(
        f"| gunicorn master | {master_memory['VmHWM'] / 1024:.0f} | "
        f"{master_memory['VmRSS'] / 1024:.0f} |"
    )
    for number, (pid, values) in enumerate(sorted(memory.items()), 1):
        print(
            f"| worker {number} (pid {pid}) | {values['VmHWM'] / 1024:.0f} | "
            f"{values['VmRSS'] / 1024:.0f} |"
        )
    if memory:
        peaks = [v["VmHWM"] / 1024 for v in memory.values()]
        print(
            f"\nPeak RSS per worker: mean {statistics.mean(peaks):.0f} MiB, max {max(peaks):.0f}."
        )


if __name__ == "__main__":
    main()
