"""The model adapter and its runtime: settings from the environment, model versions, the lazy
engine singleton, the training path with its learning hook, and RQ jobs on a real Redis."""

from __future__ import annotations

import threading

import numpy as np
import pytest

from backend.jobs import RQJobs, ThreadJobs
from backend.runtime import Runtime
from backend.settings import CPU_DEFAULTS, GPU_DEFAULTS, Settings, SettingsError
from backend.store import WAITING_VERSION, RedisStore
from backend.telemetry import Metrics
from backend.training import served_version
from labelstudio.auth import jwt_token_type
from matcher_core import Reference
from model import BadRequest, OneShotModel, model_version_of, project_id_of
from server_helpers import (
    LABEL_CONFIG,
    annotation_event,
    brush_result,
    make_settings,
    png_bytes,
    scene,
    square_mask,
)

PROJECT = 21


# ---------------------------------------------------------------------------------------------
# Settings
# ---------------------------------------------------------------------------------------------


def test_defaults_fit_the_hardware():
    cpu = Settings.from_env({"DEVICE": "cpu"})
    gpu = Settings.from_env({"DEVICE": "cuda"})
    tiny = Settings.from_env({"DEVICE": "cpu", "ONESHOT_RANDOM_WEIGHTS": "1"})
    assert (cpu.sam_model_type, cpu.encoder) == (CPU_DEFAULTS["sam_type"], CPU_DEFAULTS["encoder"])
    assert (gpu.sam_model_type, gpu.encoder) == (GPU_DEFAULTS["sam_type"], GPU_DEFAULTS["encoder"])
    assert (cpu.sam_model_type, gpu.sam_model_type) == ("vit_b", "vit_h")
    assert (tiny.sam_model_type, tiny.encoder) == ("tiny", "tiny")
    assert tiny.segmenter_config().random_weights is True


def test_the_service_and_the_command_line_share_the_engines_model_dir_default():
    from matcher_core.config import SegmenterConfig

    settings = Settings.from_env({"DEVICE": "cpu"})
    assert settings.model_dir == SegmenterConfig().model_dir == "~/.cache/oneshot-labeler"
    assert settings.segmenter_config().model_dir == SegmenterConfig().model_dir
    assert Settings.from_env({"DEVICE": "cpu", "MODEL_DIR": "/data/m"}).model_dir == "/data/m"


def test_explicit_settings_reach_the_engine_configuration():
    settings = Settings.from_env(
        {
            "DEVICE": "cpu",
            "SAM_MODEL_TYPE": "vit_l",
            "SAM_CHECKPOINT": "/models/sam.pth",
            "ENCODER": "efficientnet_lite0",
            "MODE": "persam",
            "PRESET": "coco",
            "MAX_IMAGE_PIXELS": "1000000",
            "MODEL_DIR": "/data/models",
        }
    )
    config = settings.segmenter_config()
    assert (config.sam_type, config.sam_checkpoint, config.encoder) == (
        "vit_l",
        "/models/sam.pth",
        "efficientnet_lite0",
    )
    assert (config.mode, config.max_image_pixels, config.model_dir) == (
        "persam",
        1_000_000,
        "/data/models",
    )
    assert (config.prompt_sampler, config.dense_grid) == ("subsets", 64)  # the coco preset


@pytest.mark.parametrize(
    ("env", "variable"),
    [
        ({"MODE": "magic"}, "MODE"),
        ({"PREDICT_TIME_BUDGET": "soon"}, "PREDICT_TIME_BUDGET"),
        ({"MAX_REQUEST_BYTES": "-5"}, "MAX_REQUEST_BYTES"),
        ({"ONESHOT_RANDOM_WEIGHTS": "maybe"}, "ONESHOT_RANDOM_WEIGHTS"),
        ({"BASIC_AUTH_USER": "only-user"}, "BASIC_AUTH_PASS"),
        ({"JOBS": "rq"}, "REDIS_URL"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
    ],
)
def test_unusable_environment_values_name_their_variable(env, variable):
    with pytest.raises(SettingsError, match=variable):
        Settings.from_env({"DEVICE": "cpu", **env})


def test_described_settings_hide_secrets():
    settings = Settings.from_env(
        {
            "DEVICE": "cpu",
            "LABEL_STUDIO_API_KEY": "key-123",
            "BASIC_AUTH_USER": "u",
            "BASIC_AUTH_PASS": "pass-456",
            "REDIS_URL": "redis://:redis-789@cache:6379/0",
        }
    )
    shown = str(settings.describe()) + repr(settings)
    for secret in ("key-123", "pass-456", "redis-789"):
        assert secret not in shown
    assert settings.jobs == "rq"


def test_personal_access_tokens_are_told_from_legacy_keys():
    import base64
    import json

    def jwt(claims: dict) -> str:
        body = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
        return f"eyJhbGciOiJIUzI1NiJ9.{body}.signature"

    assert jwt_token_type("0123456789abcdef0123456789abcdef01234567") is None
    assert jwt_token_type(jwt({"token_type": "refresh"})) == "refresh"
    assert jwt_token_type(jwt({"token_type": "access"})) == "access"


# ---------------------------------------------------------------------------------------------
# Project ids and model versions
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("given", "expected"),
    [("12.1735689600", "12"), (12, "12"), ({"id": 7, "title": "x"}, "7"), ("3", "3")],
)
def test_project_ids_come_from_setup_strings_webhook_objects_and_ids(given, expected):
    assert project_id_of(given) == expected


@pytest.mark.parametrize("given", [None, True, "", "../etc.1", {"title": "no id"}, 1.5])
def test_invalid_project_ids_are_refused(given):
    with pytest.raises(BadRequest):
        project_id_of(given)


def test_the_model_version_is_a_stable_function_of_the_learned_state(segmenter):
    from matcher_core import Example

    reference = segmenter.build_reference([Example(image=scene(0), masks={"Cat": [square_mask()]})])
    version = model_version_of(reference, {}, "matcher")

    assert version.startswith("oneshot-") and version != WAITING_VERSION
    assert model_version_of(None, {}, "matcher") == WAITING_VERSION
    # Serialising (npz with timestamps inside) and rebuilding change nothing...
    assert model_version_of(Reference.from_bytes(reference.to_bytes()), {}, "matcher") == version
    rebuilt = segmenter.build_reference([Example(image=scene(0), masks={"Cat": [square_mask()]})])
    assert model_version_of(rebuilt, {}, "matcher") == version
    # ...while anything that changes predictions changes the version.
    assert model_version_of(reference, {}, "persam") != version
    assert model_version_of(reference, {"thresholds": {"Cat": 0.4}}, "matcher") != version
    reference.labels["Cat"].score_threshold = 0.3
    assert model_version_of(reference, {}, "matcher") != version
    # Wall-clock figures of a training are not what was learned: they change nothing.
    timed = {"labels": {"Cat": {"shots": 1, "weights_seconds": 1.5}}}
    retimed = {"labels": {"Cat": {"shots": 1, "weights_seconds": 9.0}}}
    assert model_version_of(reference, timed, "matcher") == model_version_of(
        reference, retimed, "matcher"
    )


def test_served_versions_count_generations_and_keep_unchanged_content():
    """What Label Studio shows: ``g<n>-<6 hex>`` (``rnd-`` first for random weights), whole in
    its prediction tabs (at most 15 characters), a new generation only when the learned content
    changes."""
    first = served_version(WAITING_VERSION, "oneshot-random-5a7baf1c2d3e")
    assert first == "rnd-g1-5a7baf"
    assert served_version(first, "oneshot-random-5a7baf1c2d3e") == first  # unchanged data
    assert served_version(first, "oneshot-random-0123456789ab") == "rnd-g2-012345"
    assert served_version("g7-5a7baf", "oneshot-ffffffffffff") == "g8-ffffff"
    assert served_version("g7-5a7baf", WAITING_VERSION) == WAITING_VERSION
    assert len(served_version("rnd-g998-5a7baf", "oneshot-random-0123456789ab")) <= 15


# ---------------------------------------------------------------------------------------------
# The engine loads once per process
# ---------------------------------------------------------------------------------------------


def test_the_engine_loads_lazily_once_for_all_threads(tmp_path, model_dir):
    settings = make_settings(model_dir, tmp_path)
    runtime = Runtime(settings, metrics=Metrics())
    assert runtime.model_loaded is False

    engines = []
    threads = [
        threading.Thread(target=lambda: engines.append(runtime.segmenter())) for _ in range(4)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert len(engines) == 4
    assert all(engine is engines[0] for engine in engines)
    assert runtime.segmenter() is engines[0]
    assert runtime.model_loaded is True
    runtime.close()


# ---------------------------------------------------------------------------------------------
# Training and the learning hook
# ---------------------------------------------------------------------------------------------


class ThresholdLearner(OneShotModel):
    """A stand-in for issue 4's learning: lowers each label's threshold per example seen."""

    calls: list[list[int]] = []

    def learn(self, project, reference, examples):
        ThresholdLearner.calls.append([e.annotation_id for e in examples])
        for example in examples:
            for label in example.load().masks:
                current = reference.labels[label].score_threshold or 0.5
                reference.labels[label].score_threshold = current - 0.1
        return reference


class BrokenLearner(OneShotModel):
    def learn(self, project, reference, examples):
        raise RuntimeError("learning exploded")


def connected_runtime(make_runtime, fake_ls, model_class=OneShotModel):
    """A runtime whose background trainings run ``model_class``, set up for project 21."""
    runtime = make_runtime()
    runtime.jobs = ThreadJobs(
        runtime,
        debounce=0.05,
        train=lambda pid, full: model_class(pid, runtime=runtime).train(full),
    )
    OneShotModel(f"{PROJECT}.1", LABEL_CONFIG, runtime=runtime).setup(fake_ls.url, fake_ls.token)
    return runtime


def submit(runtime, fake_ls, annotation_id: int, seed: int):
    url = fake_ls.add_image(PROJECT, f"{annotation_id}.png", png_bytes(scene(seed)))
    event = annotation_event(
        PROJECT, annotation_id, annotation_id, url, [brush_result(square_mask())]
    )
    OneShotModel(runtime=runtime).fit(event["action"], event)
    assert runtime.jobs.wait_idle(60)


def test_later_annotations_go_to_the_learning_hook_and_change_the_version(make_runtime, fake_ls):
    ThresholdLearner.calls = []
    runtime = connected_runtime(make_runtime, fake_ls, ThresholdLearner)

    submit(runtime, fake_ls, 100, seed=0)
    first = runtime.store.load(str(PROJECT))
    submit(runtime, fake_ls, 101, seed=1)
    second = runtime.store.load(str(PROJECT))

    # The hook sees every stored annotation (learning rebuilds from the reference each time).
    assert ThresholdLearner.calls == [[100, 101]]
    assert first.model_version != second.model_version != WAITING_VERSION
    assert second.applied_examples == ["annotation:100", "annotation:101"]
    learned = Reference.from_bytes(second.reference)
    assert learned.labels["Cat"].score_threshold == pytest.approx(0.3)
    assert [v["model_version"] for v in runtime.store.versions(str(PROJECT))] == [
        first.model_version,
        second.model_version,
    ]


def test_a_correction_is_learned_and_changes_the_model_version(make_runtime, fake_ls):
    runtime = connected_runtime(make_runtime, fake_ls)
    submit(runtime, fake_ls, 100, seed=0)
    first = runtime.store.load(str(PROJECT))
    submit(runtime, fake_ls, 101, seed=1)

    second = runtime.store.load(str(PROJECT))
    assert second.model_version not in (first.model_version, WAITING_VERSION)
    assert second.applied_examples == ["annotation:100", "annotation:101"]
    assert second.learned["examples"] == 2
    cat = Reference.from_bytes(second.reference).labels["Cat"]
    assert len(cat.shots) == 2 and cat.base_shots == 1  # the correction joined the references
    assert cat.mask_weights is not None  # PerSAM-F weights trained on the examples
    metrics = runtime.metrics.render()
    assert (
        # prometheus_client writes label pairs sorted by name
        f'oneshot_last_training{{label="Cat",project="{PROJECT}",quantity="examples"}} 2.0'
        in metrics
    )


def test_a_failing_training_keeps_the_previous_version_serving(make_runtime, fake_ls):
    runtime = connected_runtime(make_runtime, fake_ls, BrokenLearner)
    submit(runtime, fake_ls, 100, seed=0)
    before = runtime.store.load(str(PROJECT))
    assert before.model_version != WAITING_VERSION

    submit(runtime, fake_ls, 101, seed=1)

    after = runtime.store.load(str(PROJECT))
    assert (after.model_version, after.reference) == (before.model_version, before.reference)
    assert "learning exploded" in after.last_error
    assert runtime.metrics.trainings.value("failed") == 1


def test_start_training_with_label_studio_down_keeps_the_previous_version(make_runtime, fake_ls):
    runtime = connected_runtime(make_runtime, fake_ls)
    submit(runtime, fake_ls, 100, seed=0)
    before = runtime.store.load(str(PROJECT))
    fake_ls.token = "revoked"  # the export now answers 401

    OneShotModel(runtime=runtime).fit("START_TRAINING", {"project": {"id": PROJECT}})
    assert runtime.jobs.wait_idle(60)

    after = runtime.store.load(str(PROJECT))
    assert after.model_version == before.model_version
    assert "401" in after.last_error
    assert list(runtime.store.examples(str(PROJECT))) == ["annotation:100"]


def test_fit_ignores_skipped_tasks_and_events_it_does_not_learn_from(make_runtime, fake_ls):
    runtime = connected_runtime(make_runtime, fake_ls)
    event = annotation_event(
        PROJECT, 100, 1, "/data/upload/21/x.png", [brush_result(square_mask())]
    )
    event["annotation"]["was_cancelled"] = True

    answer = OneShotModel(runtime=runtime).fit(event["action"], event)

    assert answer["status"] == "ignored" and answer["stored"] == []
    assert runtime.store.examples(str(PROJECT)) == {}
    assert OneShotModel(runtime=runtime).fit("PROJECT_UPDATED", {"project": {"id": PROJECT}}) == {
        "status": "ignored",
        "action": "PROJECT_UPDATED",
    }


# ---------------------------------------------------------------------------------------------
# RQ on a real Redis
# ---------------------------------------------------------------------------------------------


def test_rq_jobs_coalesce_a_burst_into_one_training_run_by_a_worker(
    redis_server, make_runtime, fake_ls
):
    from rq import SimpleWorker

    runtime = make_runtime(store=RedisStore(redis_server.url), REDIS_URL=redis_server.url)
    assert isinstance(runtime.jobs, RQJobs)
    OneShotModel(f"{PROJECT}.1", LABEL_CONFIG, runtime=runtime).setup(fake_ls.url, fake_ls.token)
    for annotation_id in (100, 101, 102):
        url = fake_ls.add_image(PROJECT, f"{annotation_id}.png", png_bytes(scene(annotation_id)))
        event = annotation_event(
            PROJECT, annotation_id, annotation_id, url, [brush_result(square_mask())]
        )
        OneShotModel(runtime=runtime).fit(event["action"], event)

    assert runtime.jobs.queue.count == 1  # three events, one queued training

    SimpleWorker([runtime.jobs.queue], connection=runtime.jobs.connection).work(burst=True)

    state = runtime.store.load(str(PROJECT))
    assert state.reference_source["annotation_id"] == 100
    assert state.model_version != WAITING_VERSION
    assert runtime.jobs.queue.count == 0
    # A new event after the training enqueues a new one.
    url = fake_ls.add_image(PROJECT, "103.png", png_bytes(scene(103)))
    event = annotation_event(PROJECT, 103, 103, url, [brush_result(square_mask())])
    OneShotModel(runtime=runtime).fit(event["action"], event)
    assert runtime.jobs.queue.count == 1
    SimpleWorker([runtime.jobs.queue], connection=runtime.jobs.connection).work(burst=True)


def test_rq_background_predictions_are_posted_to_label_studio(redis_server, make_runtime, fake_ls):
    from rq import SimpleWorker

    runtime = make_runtime(
        store=RedisStore(redis_server.url), REDIS_URL=redis_server.url, PREDICT_TIME_BUDGET="0"
    )
    model = OneShotModel(f"{PROJECT}.1", LABEL_CONFIG, runtime=runtime)
    model.setup(fake_ls.url, fake_ls.token)
    url = fake_ls.add_image(PROJECT, "ref.png", png_bytes(scene(0)))
    event = annotation_event(PROJECT, 100, 1, url, [brush_result(square_mask())])
    model.fit(event["action"], event)
    worker = SimpleWorker([runtime.jobs.queue], connection=runtime.jobs.connection)
    worker.work(burst=True)
    tasks = [
        {
            "id": 2 + i,
            "data": {"image": fake_ls.add_image(PROJECT, f"{i}.png", png_bytes(scene(i)))},
        }
        for i in range(3)
    ]

    answer = model.predict(tasks)
    worker.work(burst=True)

    assert answer["results"][1:] == [[], []]
    assert sorted(p["task"] for p in fake_ls.posted) == [3, 4]
    assert {p["model_version"] for p in fake_ls.posted} == {answer["model_version"]}
    assert np.all([p["result"] for p in fake_ls.posted])


def test_absence_test_margin_and_encoder_runtime_reach_the_engine_and_a_preset_names_its_mode():
    settings = Settings.from_env(
        {"ABSENCE_TEST": "0", "ABSENCE_MARGIN": "0.1", "ENCODER_RUNTIME": "ONNX", "DEVICE": "cpu"}
    )
    config = settings.segmenter_config()
    assert (config.absence_test, config.absence_margin, config.encoder_runtime) == (
        False,
        0.1,
        "onnx",
    )
    assert Settings.from_env({"DEVICE": "cpu"}).segmenter_config().absence_test  # the default
    persam = Settings.from_env({"PRESET": "persam", "DEVICE": "cpu"}).segmenter_config()
    assert persam.mode == "persam" and not persam.absence_test
    with pytest.raises(SettingsError, match="ENCODER_RUNTIME"):
        Settings.from_env({"ENCODER_RUNTIME": "tensorrt", "DEVICE": "cpu"})


def test_decoder_precision_and_openvino_runtime_reach_the_engine():
    config = Settings.from_env(
        {"DECODER_PRECISION": "bfloat16", "ENCODER_RUNTIME": "openvino_bf16", "DEVICE": "cpu"}
    ).segmenter_config()
    assert (config.decoder_precision, config.encoder_runtime) == ("bfloat16", "openvino_bf16")
    assert Settings.from_env({"DEVICE": "cpu"}).segmenter_config().decoder_precision == "float32"
    with pytest.raises(SettingsError, match="DECODER_PRECISION"):
        Settings.from_env({"DECODER_PRECISION": "int4", "DEVICE": "cpu"})
