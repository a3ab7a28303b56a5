"""Fetching task images (labelstudio/download.py, labelstudio/guard.py) against a local stand-in for Label Studio.

The stand-in is a real HTTP server on 127.0.0.1 (a thread); it serves uploads with legacy-token
or Bearer auth, the personal-token exchange, Label Studio's 400 on /storage-data/, a presign
redirect, redirects to forbidden addresses, a large and a slow image.
"""

from __future__ import annotations

import base64
import io
import ipaddress
import json
import os
import socket
import threading
import time
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import jwt
import numpy as np
import pytest
from PIL import Image

from labelstudio import auth, guard
from labelstudio.download import BlockedURLError, FetchError, fetch_image_bytes

LEGACY_KEY = "0123456789abcdef0123456789abcdef01234567"
SIGNING_KEY = "test-signing-key-that-is-long-enough-for-hs256"


def make_jwt(token_type: str, lifetime_s: float = 300) -> str:
    claims = {"token_type": token_type, "exp": int(time.time() + lifetime_s), "user_id": 1}
    return jwt.encode(claims, SIGNING_KEY, algorithm="HS256")


PERSONAL_TOKEN = make_jwt("refresh", 3600)
# Minted at import: a lifetime of a day, not Label Studio's 5 minutes, so a slow run reaching
# these tests minutes after collection still finds it valid (the cache keeps it only until
# 30 s before its expiry).
ACCESS_TOKEN = make_jwt("access", 24 * 3600)


def png_bytes(height: int = 6, width: int = 9) -> bytes:
    buffer = io.BytesIO()
    pixels = np.arange(height * width * 3, dtype=np.uint8).reshape(height, width, 3)
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


IMAGE = png_bytes()
BIG = b"\x89PNG" + bytes(300_000)


class FakeLabelStudio(BaseHTTPRequestHandler):
    """Routes of Label Studio that the backend uses, plus hostile ones."""

    hits: list[tuple[str, str, str | None]] = []  # (method, path, Authorization)
    redirect_targets: dict[str, str] = {}

    def log_message(self, *args):  # keep test output clean
        pass

    def _authorised(self) -> bool:
        return self.headers.get("Authorization") in (
            f"Token {LEGACY_KEY}",
            f"Bearer {ACCESS_TOKEN}",
        )

    def _send(self, status: int, body: bytes = b"", headers: dict | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if "Transfer-Encoding" not in (headers or {}):
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if body:
            self.wfile.write(body)

    def do_POST(self):
        self.hits.append(("POST", self.path, self.headers.get("Authorization")))
        length = int(self.headers.get("Content-Length") or 0)
        body = json.loads(self.rfile.read(length) or b"{}")
        if self.path == "/api/token/refresh/" and body.get("refresh") == PERSONAL_TOKEN:
            self._send(200, json.dumps({"access": ACCESS_TOKEN}).encode())
        else:
            self._send(401, b'{"detail": "Token is invalid"}')

    def do_GET(self):
        self.hits.append(("GET", self.path, self.headers.get("Authorization")))
        path, _, query = self.path.partition("?")
        params = urllib.parse.parse_qs(query)
        if path in self.redirect_targets:
            self._send(302, headers={"Location": self.redirect_targets[path]})
        elif path.startswith("/storage-data/uploaded/"):
            self._send(400, b"local storage")  # as Label Studio 1.23 answers on local storage
        elif path.startswith("/tasks/5/presign/"):
            uri = base64.urlsafe_b64decode(params["fileuri"][0]).decode()
            if uri == "s3://bucket/cat.png" and self._authorised():
                self._send(
                    303, headers={"Location": "/data/upload/1/cat.png?X-Amz-Signature=s3cr3t"}
                )
            else:
                self._send(403)
        elif path == "/data/upload/1/forbidden.png":
            self._send(403 if self._authorised() else 401)
        elif path == "/data/upload/1/big.png":
            self._send(200, BIG)
        elif path == "/data/upload/1/big-chunked.png":
            self.send_response(200)
            self.end_headers()  # no Content-Length: the size is only known by reading
            self.wfile.write(BIG)
            self.close_connection = True
        elif path == "/data/upload/1/slow.png":
            time.sleep(1.5)
            self._send(200, IMAGE)
        elif path.startswith("/data/upload/1/cat.png") or path == "/data/local-files/":
            self._send(200, IMAGE) if self._authorised() else self._send(401)
        elif path == "/public/cat.png":
            self._send(200, IMAGE)
        else:
            self._send(404 if self._authorised() else 401)


class QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address):
        pass  # clients hanging up early (byte and time caps) are expected here


@pytest.fixture(scope="module")
def servers():
    """Two servers: Label Studio, and another host on another port."""
    started = []
    for _ in range(2):
        server = QuietServer(("127.0.0.1", 0), FakeLabelStudio)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        started.append(server)
    yield [f"http://127.0.0.1:{server.server_address[1]}" for server in started]
    for server in started:
        server.shutdown()
        server.server_close()


@pytest.fixture
def label_studio(servers, monkeypatch, tmp_path):
    FakeLabelStudio.hits.clear()
    FakeLabelStudio.redirect_targets.clear()
    auth.forget_access_tokens()
    for name in ("LABEL_STUDIO_URL", "LABEL_STUDIO_API_KEY", "LOCAL_FILES_DOCUMENT_ROOT"):
        monkeypatch.delenv(name, raising=False)
    return servers[0]


@pytest.fixture
def connections(monkeypatch):
    """Every address a socket connects to during the test (the real connect still runs)."""
    seen: list = []
    real_connect = socket.socket.connect

    def recording_connect(sock, address):
        seen.append(address)
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", recording_connect)
    return seen


def get(url, hostname, tmp_path, token=LEGACY_KEY, **overrides):
    options = dict(
        hostname=hostname,
        access_token=token,
        cache_dir=str(tmp_path / "cache"),
        max_bytes=100_000,
        timeout=5.0,
    )
    options.update(overrides)
    return fetch_image_bytes(url, **options)


# ------------------------------------------------------------------------------------------
# Label Studio URLs and auth


def test_uploads_are_fetched_relative_to_label_studio_with_the_legacy_token(label_studio, tmp_path):
    assert get("/data/upload/1/cat.png", label_studio, tmp_path) == IMAGE
    auths = [auth for _, path, auth in FakeLabelStudio.hits if path == "/data/upload/1/cat.png"]
    assert auths == [f"Token {LEGACY_KEY}"]


def test_downloads_are_cached_and_served_again_without_a_request(label_studio, tmp_path):
    get("/data/upload/1/cat.png", label_studio, tmp_path)
    requests_made = len(FakeLabelStudio.hits)
    assert get("/data/upload/1/cat.png", label_studio, tmp_path) == IMAGE
    assert len(FakeLabelStudio.hits) == requests_made
    assert not [name for name in os.listdir(tmp_path / "cache") if name.startswith("fetch-")]


@pytest.mark.parametrize(
    "path, token, status",
    [
        ("/data/upload/1/cat.png", "wrong-key", 401),
        ("/data/upload/1/forbidden.png", LEGACY_KEY, 403),
        ("/data/upload/1/missing.png", LEGACY_KEY, 404),
    ],
)
def test_refusals_carry_the_status_and_never_the_token(label_studio, tmp_path, path, token, status):
    with pytest.raises(FetchError) as caught:
        get(path, label_studio, tmp_path, token=token)
    assert caught.value.status == status
    assert f"HTTP {status}" in str(caught.value)
    assert token not in str(caught.value)


def test_personal_access_token_is_exchanged_once_and_sent_as_bearer(label_studio, tmp_path):
    assert get("/data/upload/1/cat.png", label_studio, tmp_path, token=PERSONAL_TOKEN) == IMAGE
    assert get("/data/upload/1/cat.png?v=2", label_studio, tmp_path, token=PERSONAL_TOKEN) == IMAGE
    exchanges = [hit for hit in FakeLabelStudio.hits if hit[1] == "/api/token/refresh/"]
    assert len(exchanges) == 1  # the access token is reused for the second image
    image_auths = {auth for _, path, auth in FakeLabelStudio.hits if path.startswith("/data/")}
    assert image_auths == {f"Bearer {ACCESS_TOKEN}"}


def test_a_rejected_personal_token_is_a_401_without_the_token(label_studio, tmp_path):
    stale = make_jwt("refresh", 60) + "x"
    with pytest.raises(FetchError) as caught:
        get("/data/upload/1/cat.png", label_studio, tmp_path, token=stale)
    assert caught.value.status == 401
    assert "personal access token" in str(caught.value)
    assert stale not in str(caught.value)


def test_cloud_storage_uris_are_presigned_by_label_studio(label_studio, tmp_path):
    data = get("s3://bucket/cat.png", label_studio, tmp_path, task_id=5)
    assert data == IMAGE
    with pytest.raises(FetchError, match="Task ID is required"):
        get("s3://bucket/cat.png", label_studio, tmp_path / "other")


def test_presigned_signatures_stay_out_of_messages(label_studio, tmp_path):
    FakeLabelStudio.redirect_targets["/r"] = "/data/upload/1/missing.png?X-Amz-Signature=s3cr3t"
    with pytest.raises(FetchError) as caught:
        get(f"{label_studio}/r", label_studio, tmp_path)
    assert caught.value.status == 404
    assert "s3cr3t" not in str(caught.value)


# ------------------------------------------------------------------------------------------
# SSRF guard


@pytest.mark.parametrize(
    "host, port, address, allowed",
    [
        ("ls.internal", 8080, "10.1.2.3", True),  # Label Studio on a private network
        ("ls.internal", 8080, "127.0.0.1", True),
        ("ls.internal", 9999, "10.1.2.3", False),  # same host, another port: not Label Studio
        ("ls.internal", 8080, "169.254.169.254", False),  # metadata, even for Label Studio
        ("ls.internal", 8080, "fe80::1", False),
        ("minio.lan", 9000, "192.168.1.5", True),  # explicitly allowed
        ("bucket.s3.example", 443, "52.1.2.3", True),  # a public host Label Studio redirects to
        ("bucket.s3.example", 443, "10.0.0.1", False),
        ("bucket.s3.example", 443, "::ffff:10.0.0.1", False),  # IPv4-mapped private
        ("bucket.s3.example", 443, "100.64.0.1", False),  # carrier-grade NAT
        ("bucket.s3.example", 443, "0.0.0.0", False),
        ("bucket.s3.example", 443, "fd00:ec2::254", False),
    ],
)
def test_address_rules(host, port, address, allowed):
    policy = guard.HostPolicy.build("http://ls.internal:8080", ["minio.lan:9000", "*"])
    problem = policy.address_problem(host, port, ipaddress.ip_address(address))
    assert (problem is None) == allowed, problem


@pytest.mark.parametrize(
    "target", ["http://169.254.169.254/latest/meta-data/", "http://10.0.0.1/x.png"]
)
def test_redirects_to_forbidden_addresses_are_refused_without_connecting(
    label_studio, tmp_path, connections, target
):
    FakeLabelStudio.redirect_targets["/hop"] = target
    with pytest.raises(BlockedURLError, match="refused redirect"):
        get(f"{label_studio}/hop", label_studio, tmp_path, allowed_hosts=["*"])
    forbidden_host = urllib.parse.urlsplit(target).hostname
    assert [address for address in connections if address[0] == forbidden_host] == []
    assert any(path == "/hop" for _, path, _ in FakeLabelStudio.hits)  # the first hop did run


def test_a_redirect_to_a_name_resolving_to_loopback_is_refused_when_connecting(
    label_studio, servers, tmp_path, connections
):
    other_port = urllib.parse.urlsplit(servers[1]).port
    FakeLabelStudio.redirect_targets["/hop"] = f"http://localhost:{other_port}/public/cat.png"
    with pytest.raises(BlockedURLError, match="loopback address"):
        get(f"{label_studio}/hop", label_studio, tmp_path)
    assert [address for address in connections if address[1] == other_port] == []


def test_hosts_other_than_label_studio_need_the_allow_list(label_studio, servers, tmp_path):
    public = f"{servers[1]}/public/cat.png"
    with pytest.raises(BlockedURLError, match="neither the Label Studio host nor in the allowed"):
        get(public, label_studio, tmp_path)
    with pytest.raises(BlockedURLError, match="neither the Label Studio host nor in the allowed"):
        get("http://example.com/cat.png", label_studio, tmp_path)
    # "*" opens public hosts only: this one is on loopback.
    with pytest.raises(BlockedURLError, match="loopback"):
        get(public, label_studio, tmp_path, allowed_hosts=["*"])
    other = urllib.parse.urlsplit(servers[1]).netloc
    assert get(public, label_studio, tmp_path, allowed_hosts=[other]) == IMAGE


def test_the_token_is_not_forwarded_when_a_redirect_leaves_label_studio(
    label_studio, servers, tmp_path
):
    FakeLabelStudio.redirect_targets["/hop"] = f"{servers[1]}/public/cat.png"
    other = urllib.parse.urlsplit(servers[1]).netloc
    assert get(f"{label_studio}/hop", label_studio, tmp_path, allowed_hosts=[other]) == IMAGE
    first, second = FakeLabelStudio.hits[-2:]
    assert first[1:] == ("/hop", f"Token {LEGACY_KEY}")
    assert second[1:] == ("/public/cat.png", None)


def test_redirect_loops_stop(label_studio, tmp_path):
    FakeLabelStudio.redirect_targets["/loop"] = "/loop"
    with pytest.raises(FetchError, match="redirects"):
        get(f"{label_studio}/loop", label_studio, tmp_path)


@pytest.mark.parametrize("path", ["/data/upload/1/big.png", "/data/upload/1/big-chunked.png"])
def test_downloads_stop_at_the_byte_cap(label_studio, tmp_path, path):
    with pytest.raises(FetchError, match="exceeds the cap of 100000 bytes"):
        get(path, label_studio, tmp_path)


def test_downloads_stop_at_the_time_cap(label_studio, tmp_path):
    started = time.monotonic()
    with pytest.raises(FetchError, match="timed out"):
        get("/data/upload/1/slow.png", label_studio, tmp_path, timeout=0.4)
    assert time.monotonic() - started < 1.4


def test_data_uris_are_decoded_within_the_cap(label_studio, tmp_path):
    uri = "data:image/png;base64," + base64.b64encode(IMAGE).decode()
    assert get(uri, label_studio, tmp_path) == IMAGE
    with pytest.raises(FetchError, match="exceeds the cap"):
        get(uri, label_studio, tmp_path, max_bytes=10)


# ------------------------------------------------------------------------------------------
# Local files


@pytest.fixture
def document_root(tmp_path, monkeypatch):
    root = tmp_path / "root"
    (root / "images").mkdir(parents=True)
    (root / "images" / "cat.png").write_bytes(IMAGE)
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret.png").write_bytes(b"secret")
    (root / "images" / "escape.png").symlink_to(outside / "secret.png")
    (root / "images" / "inside-link.png").symlink_to(root / "images" / "cat.png")
    return root


def test_local_files_are_read_under_the_document_root(label_studio, tmp_path, document_root):
    root = str(document_root)
    assert (
        get("/data/local-files/?d=images/cat.png", label_studio, tmp_path, local_files_root=root)
        == IMAGE
    )
    assert (
        get(
            "/data/local-files/?d=images/inside-link.png",
            label_studio,
            tmp_path,
            local_files_root=root,
        )
        == IMAGE
    )
    assert FakeLabelStudio.hits == []  # read from disk, not downloaded


@pytest.mark.parametrize(
    "path, error, message",
    [
        ("images/../../outside/secret.png", BlockedURLError, r"contains '\.\.'"),
        ("images/escape.png", BlockedURLError, "outside LOCAL_FILES_DOCUMENT_ROOT"),
        (None, FetchError, "not found"),  # an absolute path is relative to the root
        ("images/nope.png", FetchError, "not found"),
    ],
)
def test_local_files_cannot_escape_the_document_root(
    label_studio, tmp_path, document_root, path, error, message
):
    path = path or str(tmp_path / "outside" / "secret.png")
    with pytest.raises(error, match=message):
        get(
            f"/data/local-files/?d={urllib.parse.quote(path)}",
            label_studio,
            tmp_path,
            local_files_root=str(document_root),
        )
    assert FakeLabelStudio.hits == []  # refused outright, not retried through Label Studio


def test_local_files_without_a_document_root_come_from_label_studio(label_studio, tmp_path):
    assert get("/data/local-files/?d=images/cat.png", label_studio, tmp_path) == IMAGE
    assert FakeLabelStudio.hits[-1][1:] == (
        "/data/local-files/?d=images/cat.png",
        f"Token {LEGACY_KEY}",
    )
