"""Fuzzing the HTTP routes: whatever body arrives at /setup, /predict, /webhook or /train, the
server answers (never a 5xx), a refused request says why in a JSON ``error``, and a refused request
leaves every project's stored state exactly as it was.

Bodies are drawn by hypothesis: arbitrary JSON, the fields each route reads filled with values of
every type, and valid Label Studio bodies with parts replaced or deleted. A deterministic list of
hostile bodies (deep nesting, huge numbers, huge sizes, invalid bytes) runs as well.
"""

from __future__ import annotations

import copy
import json
import os

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from hypothesis.control import currently_in_test_context

from backend.jobs import ThreadJobs
from backend.server import create_app, nesting_exceeds
from backend.store import StateStore
from server_helpers import (
    API_TOKEN,
    LABEL_CONFIG,
    annotation_event,
    brush_result,
    png_bytes,
    scene,
    square_mask,
)

PROJECT = 12
LS_URL = "<fake label studio>"
"""Placeholder replaced by the fake Label Studio's URL when a body is sent."""
IMAGE_URL = "<reference image>"

SCALE = float(os.environ.get("FUZZ_SCALE", "1"))
"""``FUZZ_SCALE=20`` multiplies the number of examples (a longer hunt, outside CI)."""
FUZZ = settings(
    max_examples=int(80 * SCALE),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)

# ---------------------------------------------------------------------------------------------
# Strategies
# ---------------------------------------------------------------------------------------------

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()  # NaN and infinities included: Python's JSON accepts them
    # Surrogates included: JSON's "\ud800" escapes decode to lone surrogates, which no UTF-8
    # store key or log can hold (hypothesis leaves them out unless asked).
    | st.text(st.characters(exclude_categories=()), max_size=12)
)
json_values = st.recursive(
    scalars,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4)
    ),
    max_leaves=10,
)
project_ids = st.one_of(
    json_values,
    st.sampled_from([f"{PROJECT}.1735689600", PROJECT, {"id": PROJECT}, "13", "../x", "", " 7 "]),
)
label_configs = st.one_of(
    json_values,
    st.just(LABEL_CONFIG),
    st.sampled_from(
        [
            "<View/>",
            "<View><Image name='i' value='$i'/></View>",
            "<!DOCTYPE x [<!ENTITY a 'b'>]><View/>",
            LABEL_CONFIG[:-20],
            "not xml at all",
        ]
    ),
)
urls = st.one_of(
    json_values,
    st.sampled_from(
        [
            IMAGE_URL,
            "/data/upload/12/missing.png",
            "http://169.254.169.254/latest/meta-data/",
            "file:///etc/passwd",
            "/data/local-files/?d=../../etc/passwd",
            "data:image/png;base64,!!!",
            "s3://bucket/key.png",
            "",
        ]
    ),
)
tasks = st.fixed_dictionaries(
    {"id": st.one_of(st.integers(-5, 10**12), json_values)},
    optional={
        "data": st.one_of(json_values, st.fixed_dictionaries({"image": urls})),
        "project": project_ids,
    },
)
contexts = st.one_of(
    json_values,
    st.fixed_dictionaries(
        {
            "result": st.one_of(
                json_values,
                st.lists(
                    st.fixed_dictionaries(
                        {
                            "type": st.sampled_from(["keypointlabels", "rectanglelabels", "x"]),
                            "from_name": st.sampled_from(["kp", "box", "tag", "nope"]),
                            "to_name": st.just("image"),
                            "original_width": st.one_of(st.just(80), json_values),
                            "original_height": st.one_of(st.just(60), json_values),
                            "value": json_values,
                        }
                    ),
                    max_size=3,
                ),
            )
        }
    ),
)


@st.composite
def fields(draw, valid: dict, wild: dict) -> dict:
    """A body whose every key keeps its ``valid`` value (60 %; a strategy there is drawn from),
    takes a ``wild`` one (30 %) or is left out (10 %): most bodies get past the first check and
    reach deeper code."""
    body = {}
    for key, value in valid.items():
        choice = draw(st.sampled_from(["valid"] * 6 + ["wild"] * 3 + ["drop"]))
        if choice == "valid":
            body[key] = draw(value) if isinstance(value, st.SearchStrategy) else value
        elif choice == "wild":
            body[key] = draw(wild.get(key, json_values))
    return body


BAD_HOSTNAMES = [
    "http://a b",
    "http://ls\nevil:8080",
    "http://ls%00:8080",
    "http://ls:0",
    "http://1.2.3.4.5:8080",
    "http://1.2.3",
    "http://ls:8080 and more",
    "http://user:pass@ls:8080",
    "http://ls:8080/?next=x",
    "http://ls:99999",
    "http://-ls-:8080",
]
"""``/setup`` hostnames that no download could use: refused, never stored."""

setup_bodies = fields(
    {
        "project": f"{PROJECT}.1735689600",
        "schema": LABEL_CONFIG,
        "hostname": LS_URL,
        "access_token": API_TOKEN,
        "extra_params": None,
    },
    {
        "project": project_ids,
        "schema": label_configs,
        "hostname": st.one_of(
            json_values, st.sampled_from(["ftp://x", "http://", "http://[::1", *BAD_HOSTNAMES])
        ),
    },
)
predict_bodies = st.one_of(
    fields(
        {
            "project": f"{PROJECT}.1735689600",
            "label_config": LABEL_CONFIG,
            "tasks": [{"id": 3, "data": {"image": IMAGE_URL}}],
            "params": {"login": None, "password": None, "context": None},
        },
        {
            "project": project_ids,
            "label_config": label_configs,
            "tasks": st.one_of(json_values, st.lists(tasks, max_size=3)),
            "params": st.one_of(json_values, st.fixed_dictionaries({"context": contexts})),
        },
    ),
    fields(
        {
            "project": f"{PROJECT}.1735689600",
            "label_config": LABEL_CONFIG,
            "tasks": st.lists(tasks, min_size=1, max_size=3),
            "params": {"context": None},
        },
        {"params": st.fixed_dictionaries({"context": contexts})},
    ),
)


def valid_event(annotation_id: int = 500) -> dict:
    return annotation_event(PROJECT, annotation_id, 7, IMAGE_URL, [brush_result(square_mask())])


@st.composite
def mutated(draw, base: dict) -> dict:
    """``base`` with one to three values somewhere inside replaced by arbitrary JSON or
    deleted (hypothesis' simplest choices descend into the first non-empty container, so
    shrinking heads for deep, still plausible bodies)."""
    body = copy.deepcopy(base)
    for _ in range(draw(st.integers(1, 3))):
        node = body
        while True:
            keys = list(node) if isinstance(node, dict) else list(range(len(node)))
            if not keys:
                break
            keys.sort(key=lambda k: not (isinstance(node[k], (dict, list)) and node[k]))
            key = draw(st.sampled_from(keys))
            child = node[key]
            can_descend = isinstance(child, (dict, list)) and bool(child)
            action = draw(st.sampled_from(["descend", "replace", "delete"]))
            if action == "descend" and can_descend:
                node = child
                continue
            if action == "delete":
                del node[key]
            else:
                node[key] = draw(json_values)
            break
    return body


BULK_EVENT = {
    **valid_event(),
    "action": "ANNOTATIONS_CREATED",
    "annotation": [valid_event(501)["annotation"], valid_event(502)["annotation"]],
    "task": [valid_event()["task"]],
}
webhook_bodies = st.one_of(
    json_values,
    fields(
        {
            "action": "ANNOTATION_CREATED",
            "project": {"id": PROJECT, "label_config": LABEL_CONFIG},
            "annotation": valid_event()["annotation"],
            "task": valid_event()["task"],
            "annotations": [{"id": 100}],
        },
        {
            "action": st.one_of(
                json_values,
                st.sampled_from(
                    [
                        "ANNOTATION_UPDATED",
                        "ANNOTATIONS_CREATED",
                        "ANNOTATIONS_DELETED",
                        "START_TRAINING",
                        "PROJECT_UPDATED",
                    ]
                ),
            ),
            "project": st.one_of(
                project_ids,
                st.fixed_dictionaries({"id": project_ids, "label_config": label_configs}),
            ),
        },
    ),
    mutated(valid_event()),
    mutated(BULK_EVENT),
    # Only the drawn regions spoiled: exercises the annotation parsers themselves.
    st.lists(mutated(brush_result(square_mask())), min_size=1, max_size=2).map(
        lambda results: {
            **valid_event(),
            "annotation": {**valid_event()["annotation"], "result": results},
        }
    ),
    st.lists(mutated(brush_result(square_mask())), min_size=1, max_size=2).map(
        lambda results: {
            **valid_event(),
            "annotation": {**valid_event()["annotation"], "result": results},
        }
    ),
)

# ---------------------------------------------------------------------------------------------
# The backend under fuzz
# ---------------------------------------------------------------------------------------------


def snapshot(store: StateStore) -> str:
    """Everything the store holds, as comparable text (NaN == NaN here, unlike in floats)."""
    everything = {
        project: {
            "state": store.load(project).header(),
            "reference": store.load(project).reference,
            "versions": store.versions(project),
            "examples": store.examples(project),
        }
        for project in store.projects()
    }
    return json.dumps(everything, sort_keys=True, default=repr)


class Fuzzed:
    """The app on a project with a reference; background work only recorded, so the stored state
    changes only through the request being checked."""

    def __init__(self, runtime, ls):
        self.runtime, self.ls = runtime, ls
        self.client = create_app(runtime).test_client()
        self.image_url = ls.add_image(PROJECT, "ref.png", png_bytes(scene(0)))
        setup = {
            "project": f"{PROJECT}.1",
            "schema": LABEL_CONFIG,
            "hostname": ls.url,
            "access_token": ls.token,
        }
        assert self.client.post("/setup", json=setup).status_code == 200
        event = annotation_event(PROJECT, 100, 1, self.image_url, [brush_result(square_mask())])
        assert self.client.post("/webhook", json=event).status_code == 200
        assert runtime.jobs.wait_idle(60)
        assert runtime.store.load(str(PROJECT)).reference is not None
        self.background: list[tuple] = []
        runtime.jobs = ThreadJobs(
            runtime,
            debounce=0.0,
            train=lambda *args: self.background.append(("train", *args)),
            predict=lambda *args: self.background.append(("predict", *args)),
        )

    def fill(self, body):
        text = json.dumps(body)
        return text.replace(json.dumps(LS_URL)[1:-1], self.ls.url).replace(
            json.dumps(IMAGE_URL)[1:-1], self.image_url
        )

    def check(self, path: str, data: bytes | str) -> int:
        """Send ``data`` to ``path``; assert no 5xx, a message with every refusal, and a store
        untouched by every refusal. Returns the status."""
        before = snapshot(self.runtime.store)
        answer = self.client.post(path, data=data, content_type="application/json")
        assert answer.status_code < 500, answer.get_data(as_text=True)
        payload = answer.get_json()
        assert isinstance(payload, dict)
        if currently_in_test_context():  # statistics: --hypothesis-show-statistics
            event(f"{path} -> {answer.status_code}: {str(payload.get('error'))[:40]}")
        if answer.status_code >= 400:
            assert isinstance(payload.get("error"), str) and payload["error"].strip()
            assert payload["status"] == answer.status_code
            assert snapshot(self.runtime.store) == before, f"{path} refused but wrote: {data!r}"
        return answer.status_code


@pytest.fixture
def fuzzed(make_runtime, fake_ls) -> Fuzzed:
    runtime = make_runtime()
    return Fuzzed(runtime, fake_ls)


@FUZZ
@given(body=setup_bodies)
def test_setup_survives_any_body(fuzzed, body):
    fuzzed.check("/setup", fuzzed.fill(body))


@FUZZ
@given(body=predict_bodies)
def test_predict_survives_any_body(fuzzed, body):
    fuzzed.check("/predict", fuzzed.fill(body))


@settings(FUZZ, max_examples=int(150 * SCALE))
@given(body=webhook_bodies)
def test_webhook_survives_any_body(fuzzed, body):
    fuzzed.check("/webhook", fuzzed.fill(body))


@FUZZ
@given(body=st.one_of(json_values, predict_bodies))
def test_train_survives_any_body(fuzzed, body):
    fuzzed.check("/train", fuzzed.fill(body))


@settings(FUZZ, max_examples=int(40 * SCALE))
@given(data=st.binary(max_size=64))
def test_arbitrary_bytes_are_refused_cleanly(fuzzed, data):
    for path in ("/setup", "/predict", "/webhook"):
        fuzzed.check(path, data)


def _huge_sizes(event: dict) -> dict:
    for result in event["annotation"]["result"]:
        result["original_width"] = result["original_height"] = 10**12
    return event


def _polygon_on_a_huge_canvas(event: dict) -> dict:
    event["annotation"]["result"] = [
        {
            "type": "polygonlabels",
            "from_name": "poly",
            "to_name": "image",
            "original_width": 200_000,
            "original_height": 200_000,
            "value": {"points": [[0, 0], [100, 0], [100, 100]], "polygonlabels": ["Cat"]},
        }
    ]
    return event


HOSTILE = [
    ("/predict", b"[" * 200_000 + b"]" * 200_000, 400, "MAX_JSON_DEPTH"),
    ("/webhook", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, 400, "MAX_JSON_DEPTH"),
    ("/setup", json.dumps({"project": "12.1", "x": [[[[[[[[1]]]]]]]] * 10}), 200, ""),
    ("/predict", json.dumps({"project": "12.1", "tasks": json.loads("[" * 70 + "]" * 70)}), 400,
     "MAX_JSON_DEPTH"),
    ("/setup", b'{"project": ' + b"9" * 5000 + b"}", 400, "not valid JSON"),
    ("/setup", b'{"project": 1e999}', 400, "invalid project id"),
    ("/setup", b"\xff\xfe\x00{", 400, "not valid JSON"),
    ("/setup", json.dumps({"project": "12.1", "schema": ["<View/>"]}), 400, "'schema' must be"),
    ("/setup", json.dumps({"project": "12.1", "hostname": 5}), 400, "'hostname' must be"),
    ("/setup", json.dumps({"project": "12.1", "hostname": "file:///etc"}), 400, "http(s) URL"),
    ("/setup", json.dumps({"project": "x" * 100_000}), 400, "invalid project id"),
    ("/predict", json.dumps({"project": "12.1", "label_config": {"a": 1}, "tasks": []}), 400,
     "'label_config' must be"),
    ("/predict", json.dumps({"project": "12.1", "tasks": [{"id": 1}], "params": {"context": 3}}),
     400, "'params.context'"),
    ("/webhook", json.dumps(_huge_sizes(valid_event())), 413, "MAX_IMAGE_PIXELS"),
    ("/webhook", json.dumps(_polygon_on_a_huge_canvas(valid_event())), 413, "MAX_IMAGE_PIXELS"),
    ("/webhook", json.dumps({**valid_event(), "annotation": {**valid_event()["annotation"],
     "result": [{**brush_result(square_mask()), "original_width": [80]}]}}), 400,
     "original_height and original_width"),
    ("/webhook", json.dumps({**valid_event(), "annotation": {**valid_event()["annotation"],
     "id": [1]}}), 400, "is not an id"),
    ("/webhook", json.dumps({**BULK_EVENT, "annotation": [None, {**valid_event(502)["annotation"],
     "task": []}]}), 400, "not a task id"),
    ("/webhook", json.dumps({**BULK_EVENT, "task": 5}), 200, ""),
    ("/webhook", json.dumps({**BULK_EVENT, "task": [{"id": {"a": 1}}, 3, None]}), 200, ""),
]  # fmt: skip


@pytest.mark.parametrize(("path", "data", "status", "message"), HOSTILE)
def test_hostile_bodies_get_a_clear_answer_and_write_nothing(fuzzed, path, data, status, message):
    data = fuzzed.fill(json.loads(data)) if isinstance(data, str) else data
    assert fuzzed.check(path, data) == status
    if message:
        answer = fuzzed.client.post(path, data=data, content_type="application/json")
        assert message in answer.get_json()["error"]


def test_a_bad_annotation_in_a_bulk_event_stores_none_of_the_event(fuzzed):
    good, bad = valid_event(501)["annotation"], valid_event(502)["annotation"]
    bad["result"] = [{**bad["result"][0], "value": {"format": "rle", "rle": [1, 2, 3]}}]
    event = {**valid_event(), "action": "ANNOTATIONS_CREATED", "annotation": [good, bad]}

    assert fuzzed.check("/webhook", fuzzed.fill(event)) == 400

    assert "annotation:501" not in fuzzed.runtime.store.examples(str(PROJECT))


def test_an_unusable_label_config_in_a_webhook_is_not_stored(fuzzed):
    event = valid_event()
    event["project"] = {"id": 44, "label_config": "<View/>"}
    assert fuzzed.check("/webhook", fuzzed.fill(event)) == 400
    assert "44" not in fuzzed.runtime.store.projects()


def test_nesting_depth_is_measured_without_recursion():
    deep: list = []
    for _ in range(100_000):
        deep = [deep]
    assert nesting_exceeds(deep, 64)
    assert not nesting_exceeds({"a": [1, {"b": [2]}]}, 4)
    assert nesting_exceeds({"a": [1, {"b": [2]}]}, 3)


# ---------------------------------------------------------------------------------------------
# Text that is not Unicode, ids that cannot be keys, bodies streamed past the limit
# ---------------------------------------------------------------------------------------------


def string_paths(value, path=()):
    """The path of every string (value or key) inside ``value``."""
    if isinstance(value, str):
        yield path
    elif isinstance(value, dict):
        for key, child in value.items():
            yield (*path, ("key", key))
            yield from string_paths(child, (*path, key))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            yield from string_paths(child, (*path, index))


def with_text_at(body, path, text: str):
    """A copy of ``body`` whose string at ``path`` (see :func:`string_paths`) is ``text``."""
    body = copy.deepcopy(body)
    *parents, last = path
    node = body
    for step in parents:
        node = node[step]
    if isinstance(last, tuple):  # a key: renamed
        node[text] = node.pop(last[1])
    else:
        node[last] = text
    return body


VALID_BODIES = {
    "/setup": {"project": f"{PROJECT}.1", "schema": LABEL_CONFIG, "hostname": LS_URL,
               "access_token": API_TOKEN},
    "/predict": {"project": f"{PROJECT}.1", "label_config": LABEL_CONFIG,
                 "tasks": [{"id": 3, "data": {"image": IMAGE_URL}}], "params": {"context": None}},
    "/webhook": valid_event(),
    "/train": {"project": f"{PROJECT}.1", "label_config": LABEL_CONFIG},
}  # fmt: skip


@pytest.mark.parametrize("path", sorted(VALID_BODIES))
def test_a_lone_surrogate_in_any_string_field_is_refused_with_400(fuzzed, path):
    body = VALID_BODIES[path]
    places = list(string_paths(body))
    assert len(places) >= 4
    for place in places:
        answer = fuzzed.check(path, fuzzed.fill(with_text_at(body, place, "x\udfff")))
        assert answer == 400, place


SURROGATE_EVENTS = [
    {"action": "ANNOTATIONS_DELETED", "project": {"id": PROJECT}, "annotations": [{"id": "\ud800"}]},
    {**valid_event(), "annotation": {**valid_event()["annotation"], "id": "\ud800"}},
    {**valid_event(), "action": "ANNOTATION_UPDATED",
     "annotation": {**valid_event()["annotation"], "id": "\ud800"}},
    {**BULK_EVENT, "annotation": [{**valid_event(501)["annotation"], "id": "x\udfff"}]},
]  # fmt: skip


@pytest.mark.parametrize("body", SURROGATE_EVENTS, ids=lambda b: b["action"])
def test_a_surrogate_annotation_id_gets_400_naming_it_and_stores_nothing(fuzzed, body):
    assert fuzzed.check("/webhook", fuzzed.fill(body)) == 400
    answer = fuzzed.client.post("/webhook", data=json.dumps(body), content_type="application/json")
    assert "not valid Unicode" in answer.get_json()["error"]


@pytest.mark.parametrize(
    ("annotation_id", "message"),
    [("7\x00", "control character"), ("9" * 129, "1 to 128 characters"), ("", "1 to 128")],
)
def test_an_annotation_id_that_cannot_be_a_store_key_is_refused(fuzzed, annotation_id, message):
    for body in (
        {**valid_event(), "annotation": {**valid_event()["annotation"], "id": annotation_id}},
        {"action": "ANNOTATIONS_DELETED", "project": {"id": PROJECT},
         "annotations": [{"id": annotation_id}]},
    ):  # fmt: skip
        assert fuzzed.check("/webhook", fuzzed.fill(body)) == 400
        answer = fuzzed.client.post(
            "/webhook", data=fuzzed.fill(body), content_type="application/json"
        )
        assert message in answer.get_json()["error"]


def test_an_unknown_event_name_is_counted_as_other_not_as_a_metric_label(fuzzed):
    body = {"action": "EVENT_\ud7ff_" + "x" * 50, "project": {"id": PROJECT}}
    assert fuzzed.check("/webhook", json.dumps(body)) == 200
    assert fuzzed.runtime.metrics.webhooks.value("other") >= 1
    assert "EVENT_" not in fuzzed.client.get("/metrics").get_data(as_text=True)


LIMIT = 4096


@pytest.fixture
def limited_server(make_runtime, fake_ls):
    """The app behind a real HTTP/1.1 server (chunked bodies, keep-alive), ``MAX_REQUEST_BYTES``
    at 4 KiB; yields its port."""
    import threading

    from werkzeug.serving import make_server

    runtime = make_runtime(MAX_REQUEST_BYTES=str(LIMIT))
    server = make_server("127.0.0.1", 0, create_app(runtime), threaded=True)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server.server_port
    server.shutdown()
    thread.join(5)


def chunked_post(connection, path: str, data: bytes, piece: int = 1000):
    """POST ``data`` with ``Transfer-Encoding: chunked`` on ``connection``; the answer and
    its JSON."""
    pieces = (data[i : i + piece] for i in range(0, len(data), piece))
    connection.request(
        "POST", path, body=pieces, headers={"Content-Type": "application/json"},
        encode_chunked=True,
    )  # fmt: skip
    answer = connection.getresponse()
    return answer, json.loads(answer.read())


@pytest.mark.parametrize(
    "data",
    [
        json.dumps({"project": f"{PROJECT}.1", "pad": "x" * (2 * LIMIT)}).encode(),
        # Valid JSON within the limit, whitespace past it: cut at the limit it would parse.
        json.dumps({"project": f"{PROJECT}.1"}).encode() + b" " * (2 * LIMIT),
    ],
    ids=["json-over-the-limit", "json-then-whitespace-past-the-limit"],
)
def test_a_chunked_body_over_the_limit_gets_413_and_the_connection_stays_usable(
    limited_server, data
):
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", limited_server, timeout=10)
    answer, payload = chunked_post(connection, "/setup", data)
    assert answer.status == 413
    assert "MAX_REQUEST_BYTES" in payload["error"]
    # The next request on the same client gets its answer (the server closed the connection
    # rather than reading the rest of the refused body as a request).
    answer, payload = chunked_post(connection, "/setup", json.dumps({"project": "12.1"}).encode())
    assert answer.status == 200, payload
    connection.close()


def test_a_chunked_body_within_the_limit_is_read_whole(limited_server):
    import http.client

    connection = http.client.HTTPConnection("127.0.0.1", limited_server, timeout=10)
    data = json.dumps({"project": f"{PROJECT}.1", "pad": "x" * (LIMIT - 200)}).encode()
    answer, payload = chunked_post(connection, "/setup", data, piece=7)
    assert answer.status == 200, payload
    connection.close()


@pytest.mark.parametrize("hostname", BAD_HOSTNAMES)
def test_a_hostname_that_is_not_a_usable_url_is_refused_and_not_stored(fuzzed, hostname):
    body = {"project": f"{PROJECT}.1", "schema": LABEL_CONFIG, "hostname": hostname}
    assert fuzzed.check("/setup", json.dumps(body)) == 400
    answer = fuzzed.client.post("/setup", json=body)
    assert "must be an http(s) URL of a host" in answer.get_json()["error"]


@pytest.mark.parametrize(
    "hostname",
    ["http://localhost:8080", "https://ls.example.com", "http://[::1]:8080",
     "http://label_studio:8080/", "http://10.0.0.5/label-studio"],
)  # fmt: skip
def test_a_usable_hostname_is_stored(fuzzed, hostname):
    body = {"project": "77.1", "schema": LABEL_CONFIG, "hostname": hostname}
    assert fuzzed.check("/setup", json.dumps(body)) == 200
    assert fuzzed.runtime.store.load("77").connection["hostname"] == hostname


def _sizeless(result: dict) -> dict:
    return {k: v for k, v in result.items() if k not in ("original_width", "original_height")}


SIZELESS_RESULTS = {
    "corrupt RLE": [_sizeless({**brush_result(square_mask()),
                               "value": {"format": "rle", "rle": [1, 2, 3], "brushlabels": ["Cat"]}})],
    "NaN polygon": [{"type": "polygonlabels", "from_name": "poly", "to_name": "image",
                     "value": {"points": [[float("nan"), 0], [1, 1], [2, 0]],
                               "polygonlabels": ["Cat"]}}],
    "unknown label": [_sizeless(brush_result(square_mask(), label="Unicorn"))],
    "valid brush, sizes dropped": [_sizeless(brush_result(square_mask()))],
    "a string for a result": ["x"],
    "only a classification": [{"type": "choices", "from_name": "c", "to_name": "image",
                               "value": {"choices": ["a"]}}],
    "a region without sizes next to one with": [brush_result(square_mask()),
                                                _sizeless(brush_result(square_mask(), "Dog"))],
}  # fmt: skip
"""Result lists Label Studio never sends (its image regions always carry their canvas size):
refused before anything is stored, whatever their shape."""


@pytest.mark.parametrize("results", SIZELESS_RESULTS.values(), ids=SIZELESS_RESULTS.keys())
@pytest.mark.parametrize("action", ["ANNOTATION_CREATED", "ANNOTATIONS_CREATED"])
def test_results_without_sizes_are_refused_before_anything_is_stored(fuzzed, results, action):
    annotation = {**valid_event(600)["annotation"], "result": results}
    body = {**valid_event(600), "annotation": annotation}
    if action == "ANNOTATIONS_CREATED":
        body = {**BULK_EVENT, "annotation": [annotation]}
    assert fuzzed.check("/webhook", fuzzed.fill(body)) == 400
    assert "annotation:600" not in fuzzed.runtime.store.examples(str(PROJECT))
    assert fuzzed.background == []  # no training requested either


def test_predict_for_a_project_never_set_up_writes_nothing(fuzzed):
    body = {"project": "55.1", "label_config": LABEL_CONFIG, "tasks": [{"id": 1, "data": {}}]}
    assert fuzzed.check("/predict", json.dumps(body)) == 200
    assert "55" not in fuzzed.runtime.store.projects()
