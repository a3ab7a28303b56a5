"""The state store: atomic per-project state, versions, examples and locks, on SQLite and on a
real redis-server; crashes and a disappearing Redis never corrupt what was committed."""

from __future__ import annotations

import multiprocessing
import os
import threading
import time

import pytest

from backend.store import (
    WAITING_VERSION,
    ProjectState,
    RedisStore,
    SQLiteStore,
    StateStore,
    StoreUnavailable,
)
from server_helpers import free_port


@pytest.fixture(params=["sqlite", "redis"])
def store(request, tmp_path) -> StateStore:
    if request.param == "sqlite":
        built: StateStore = SQLiteStore(tmp_path / "state.sqlite3")
    else:
        server = request.getfixturevalue("redis_server")
        built = RedisStore(server.url)
    yield built
    built.close()


def set_reference(blob: bytes, version: str):
    def change(state: ProjectState) -> ProjectState:
        state.reference = blob
        state.model_version = version
        return state

    return change


def increment(state: ProjectState) -> ProjectState:
    state.learned["count"] = state.learned.get("count", 0) + 1
    return state


def test_a_new_project_waits_for_its_reference(store):
    state = store.load("7")
    assert state.project_id == "7"
    assert state.reference is None
    assert state.model_version == WAITING_VERSION
    assert store.versions("7") == []


def test_update_persists_state_and_records_each_new_version_once(store):
    store.update("7", set_reference(b"\x00ref-1", "oneshot-aaa"), reason="reference built")
    store.update("7", increment)  # same version: no history entry
    store.update("7", set_reference(b"\x00ref-2", "oneshot-bbb"), reason="learned")

    state = store.load("7")
    assert state.reference == b"\x00ref-2"
    assert state.model_version == "oneshot-bbb"
    assert state.learned == {"count": 1}
    assert state.revision == 3
    assert [(v["model_version"], v["reason"]) for v in store.versions("7")] == [
        ("oneshot-aaa", "reference built"),
        ("oneshot-bbb", "learned"),
    ]


def test_projects_never_share_state(store):
    store.update("1", set_reference(b"one", "oneshot-111"))
    store.update("2", set_reference(b"two", "oneshot-222"))
    store.put_example("1", "annotation:5", {"n": 5})

    assert store.load("1").reference == b"one"
    assert store.load("2").reference == b"two"
    assert store.examples("2") == {}
    assert [v["model_version"] for v in store.versions("2")] == ["oneshot-222"]
    assert store.projects() == ["1", "2"]


def test_a_change_that_fails_writes_nothing(store):
    store.update("7", set_reference(b"good", "oneshot-good"))

    def broken(state: ProjectState) -> ProjectState:
        state.reference = b"half-written"
        raise RuntimeError("crash in the middle of a change")

    with pytest.raises(RuntimeError):
        store.update("7", broken)
    state = store.load("7")
    assert state.reference == b"good"
    assert state.revision == 1


def test_returning_none_writes_nothing(store):
    store.update("7", increment)
    assert store.update("7", lambda state: None).revision == 1
    assert store.load("7").revision == 1


def test_concurrent_read_modify_writes_lose_no_update(store):
    threads = [
        threading.Thread(target=lambda: [store.update("7", increment) for _ in range(10)])
        for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert store.load("7").learned["count"] == 40
    assert store.load("7").revision == 40


def test_examples_keep_first_arrival_order_and_can_be_deleted(store):
    store.put_example("7", "annotation:1", {"v": 1})
    store.put_example("7", "annotation:2", {"v": 2})
    store.put_example("7", "annotation:1", {"v": "1-updated"})

    assert store.examples("7") == {"annotation:1": {"v": "1-updated"}, "annotation:2": {"v": 2}}
    assert store.delete_examples("7", ["annotation:1", "annotation:404"]) == 1
    assert list(store.examples("7")) == ["annotation:2"]


def test_a_lock_has_one_holder_until_released_or_expired(store):
    token = store.acquire_lock("train:7", ttl=30)
    assert token is not None
    assert store.acquire_lock("train:7", ttl=30) is None
    store.release_lock("train:7", "not-the-holder")
    assert store.acquire_lock("train:7", ttl=30) is None
    store.release_lock("train:7", token)
    short = store.acquire_lock("train:7", ttl=0.2)
    assert short is not None
    time.sleep(0.3)
    assert store.acquire_lock("train:7", ttl=30) is not None


def test_sqlite_state_survives_reopening(tmp_path):
    first = SQLiteStore(tmp_path / "state.sqlite3")
    first.update("3", set_reference(b"kept", "oneshot-kept"))
    first.close()
    second = SQLiteStore(tmp_path / "state.sqlite3")
    assert second.load("3").reference == b"kept"
    assert [v["model_version"] for v in second.versions()] == ["oneshot-kept"]
    second.close()


def _die_in_the_middle_of_a_write(path: str) -> None:
    store = SQLiteStore(path)

    def change(state: ProjectState) -> ProjectState:
        state.reference = b"never committed"
        state.model_version = "oneshot-never"
        os._exit(3)  # the process dies inside the transaction

    store.update("3", change)


def test_sqlite_process_crash_mid_write_loses_nothing(tmp_path):
    path = str(tmp_path / "state.sqlite3")
    store = SQLiteStore(path)
    store.update("3", set_reference(b"committed", "oneshot-committed"))

    process = multiprocessing.get_context("fork").Process(
        target=_die_in_the_middle_of_a_write, args=(path,)
    )
    process.start()
    process.join(30)
    assert process.exitcode == 3

    state = store.load("3")
    assert state.reference == b"committed"
    assert state.model_version == "oneshot-committed"
    # The dead writer's lock is gone: writing works again at once.
    store.update("3", increment)
    assert store.load("3").learned == {"count": 1}
    store.close()


def test_redis_going_away_fails_loudly_and_keeps_committed_state(redis_server):
    store = RedisStore(redis_server.url)
    store.update("9", set_reference(b"committed", "oneshot-committed"))

    redis_server.kill()
    with pytest.raises(
        StoreUnavailable, match=r"Redis at redis://127\.0\.0\.1:\d+/0 is unreachable"
    ):
        store.update("9", set_reference(b"lost", "oneshot-lost"))
    with pytest.raises(StoreUnavailable):
        store.load("9")

    redis_server.start()  # same data directory: the append-only file is replayed
    state = store.load("9")
    assert state.reference == b"committed"
    assert state.model_version == "oneshot-committed"
    assert [v["model_version"] for v in store.versions("9")] == ["oneshot-committed"]
    store.close()


def test_unreachable_redis_is_reported_with_its_address_and_no_password():
    store = RedisStore(f"redis://:s3cret@127.0.0.1:{free_port()}/0")
    with pytest.raises(StoreUnavailable) as caught:
        store.load("1")
    assert "s3cret" not in str(caught.value)
    assert "***" in str(caught.value)
