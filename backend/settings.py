"""Every setting of the backend, read once from the environment into one dataclass.

Model defaults fit the hardware: on a CPU SAM ``vit_b`` and DINOv2 ViT-S/14 (about 0.4 GB of
weights), on a GPU SAM ``vit_h`` and DINOv2 ViT-L/14 (about 3.7 GB). ``ONESHOT_RANDOM_WEIGHTS=1``
replaces both by tiny randomly initialised models for smoke runs and tests.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit

from labelstudio.redaction import redact_url
from matcher_core.config import (
    DECODER_PRECISIONS,
    ENCODER_RUNTIMES,
    PRESETS,
    TINY_MODELS,
    SegmenterConfig,
    tiny_config,
)

log = logging.getLogger(__name__)

CPU_DEFAULTS = {"sam_type": "vit_b", "encoder": "vit_small_patch14_dinov2.lvd142m"}
GPU_DEFAULTS = {"sam_type": "vit_h", "encoder": "vit_large_patch14_dinov2.lvd142m"}
MODES = ("matcher", "persam")
TRUE_WORDS = {"1", "true", "yes", "on"}
FALSE_WORDS = {"0", "false", "no", "off", ""}


class SettingsError(ValueError):
    """An environment variable holds a value the backend cannot use."""


def _text(env: Mapping[str, str], name: str, default: str | None = None) -> str | None:
    value = env.get(name)
    if value is None or not value.strip():
        return default
    return value.strip()


def _flag(env: Mapping[str, str], name: str, default: bool = False) -> bool:
    value = env.get(name)
    if value is None:
        return default
    word = value.strip().lower()
    if word in TRUE_WORDS:
        return True
    if word in FALSE_WORDS:
        return False
    raise SettingsError(f"{name}={value!r}: expected one of 1/0, true/false, yes/no, on/off")


def _number(env: Mapping[str, str], name: str, default: float, kind: type = float, minimum=0):
    value = env.get(name)
    if value is None or not value.strip():
        return default
    try:
        number = kind(value.strip())
    except ValueError:
        raise SettingsError(f"{name}={value!r}: expected a {kind.__name__}") from None
    if number < minimum:
        raise SettingsError(f"{name}={value!r}: must be at least {minimum}")
    return number


def _choice(env: Mapping[str, str], name: str, default: str, choices: tuple[str, ...]) -> str:
    value = (_text(env, name, default) or default).lower()
    if value not in choices:
        raise SettingsError(f"{name}={value!r}: choose one of {', '.join(choices)}")
    return value


def gpu_available() -> bool:
    """Whether torch sees a CUDA device (imported lazily: reading settings stays cheap)."""
    import torch

    return torch.cuda.is_available()


DNS_LABEL = re.compile(r"^(?!-)[A-Za-z0-9_-]{1,63}(?<!-)$")
"""A DNS label; `_` too, as Docker service names (`label_studio`) resolve with it."""
URL_PATH = re.compile(r"^[A-Za-z0-9._~!$&'()*+,;=:@/%-]*$")


def _check_host(host: str) -> None:
    """Raise ValueError unless ``host`` is a DNS name, a dotted-quad IPv4 or an IPv6 address."""
    if host.startswith("[") and host.endswith("]"):
        ipaddress.IPv6Address(host[1:-1])  # raises ValueError
        return
    labels = host.rstrip(".").split(".")
    if len(host) > 253 or not all(DNS_LABEL.match(label) for label in labels):
        raise ValueError(f"{host!r} is not a host name")
    if labels[-1].isdigit():
        # All-digit last label: only a full dotted quad (resolvers read "1.2.3" or a 5-part
        # address in ways that differ; refuse rather than guess).
        ipaddress.IPv4Address(host)


def check_base_url(url: str) -> str:
    """``url`` as a usable base URL of Label Studio: ``http(s)://host[:port][/path]``.

    The one parser of the Label Studio address, for ``LABEL_STUDIO_URL`` and ``/setup``'s
    ``hostname``: what it passes, every download and API call can use (so a bad one is refused
    at once, not stored to fail every later download).

    Raises:
        ValueError: another scheme; a host that is not a DNS name, a dotted-quad IPv4 or a
            bracketed IPv6 address (spaces, control characters, ``%``-escapes); a port outside
            1-65535; user info, a query or a fragment; a path with characters URLs escape.
    """
    if any(char.isspace() or ord(char) < 32 or ord(char) == 127 for char in url):
        raise ValueError("it holds a space or a control character")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise ValueError("the scheme must be http or https")
    netloc = parts.netloc
    if not netloc or "@" in netloc:
        raise ValueError("it needs a host, without user info")
    if parts.query or parts.fragment or "?" in url or "#" in url:
        raise ValueError("a base URL takes no query or fragment")
    host, port = netloc, None
    if netloc.startswith("["):
        end = netloc.find("]")
        if end < 0:
            raise ValueError("an unclosed [IPv6] address")
        host, rest = netloc[: end + 1], netloc[end + 1 :]
        if rest:
            if not rest.startswith(":"):
                raise ValueError(f"text after the address: {rest!r}")
            port = rest[1:]
    elif ":" in netloc:
        host, port = netloc.rsplit(":", 1)
    _check_host(host)
    if port is not None and not (port.isdigit() and 1 <= int(port) <= 65535):
        raise ValueError(f"port {port!r} is not 1-65535")
    if not URL_PATH.match(parts.path) or re.search(r"%(?![0-9A-Fa-f]{2})|%00", parts.path):
        raise ValueError("the path holds characters a URL must escape")
    return url


@dataclass(frozen=True)
class Settings:
    """The backend's configuration (see the README for what each choice costs)."""

    # --- models -------------------------------------------------------------------------
    sam_model_type: str = "vit_b"
    sam_checkpoint: str | None = None
    encoder: str = CPU_DEFAULTS["encoder"]
    encoder_checkpoint: str | None = None
    device: str = "auto"
    model_dir: str = SegmenterConfig.model_dir
    """Checkpoints, the SQLite state store and the image download cache live here (default: the
    engine's, as for the command line)."""
    random_weights: bool = False
    mode: str = "matcher"
    preset: str | None = None
    # --- services -----------------------------------------------------------------------
    redis_url: str | None = field(default=None, repr=False)
    jobs: str = "thread"
    """Where background work runs: ``thread`` (in the web process) or ``rq`` (Redis queue, run by
    ``rq worker``); default ``rq`` when ``REDIS_URL`` is set."""
    label_studio_url: str | None = None
    label_studio_api_key: str | None = field(default=None, repr=False)
    basic_auth_user: str | None = None
    basic_auth_pass: str | None = field(default=None, repr=False)
    log_level: str = "INFO"
    log_format: str = "text"
    """``text`` or ``json`` (one JSON object per line, for log collectors)."""
    # --- limits -------------------------------------------------------------------------
    max_request_bytes: int = 64 * 1024 * 1024
    """Largest accepted request body (brush RLE of big images runs to megabytes); 413 above."""
    max_json_depth: int = 64
    """Deepest nesting of arrays/objects accepted in a request body (Label Studio sends < 10);
    400 above, before anything recursive touches the body."""
    max_tasks_per_request: int = 1000
    """Most tasks one ``/predict`` call may carry; 413 above."""
    max_image_bytes: int = 100 * 1024 * 1024
    max_image_pixels: int = 64_000_000
    """Images with more pixels are refused (decompression bombs), and so are annotations drawn
    on a larger ``original_width x original_height``."""
    max_instances_per_label: int = 100
    """Most regions of one label in one annotation (each becomes a mask); 413 above."""
    max_shots_per_label: int = 8
    """Most reference shots a label keeps; learning beyond it keeps the newest (logged)."""
    max_project_state_bytes: int = 512 * 1024 * 1024
    """Most bytes stored per project (state, reference and stored annotations together); a write
    beyond it is refused with 507 and nothing is written."""
    fetch_timeout: float = 30.0
    allowed_hosts: tuple[str, ...] = ()
    """Extra hosts images may be downloaded from, besides Label Studio's own."""
    local_files_root: str | None = None
    """``LOCAL_FILES_DOCUMENT_ROOT``: ``/data/local-files/?d=...`` images are read from under it
    (as Label Studio's own setting); unset, they are downloaded from Label Studio."""
    predict_time_budget: float = 60.0
    """Seconds one ``/predict`` call may spend; the rest of a batch finishes in the background
    (Label Studio gives up after 100 s)."""
    train_debounce: float = 2.0
    """Seconds a training waits for further events, so a burst of corrections trains once."""
    train_retry_delay: float = 60.0
    """Seconds after a training that could not load some annotations (their image could not be
    downloaded) before it runs again for them; repeated until every one is learned."""
    max_concurrent_inference: int = 1
    """Images segmented at the same time by one process (bounds GPU / CPU memory)."""
    train_lock_ttl: float = 60.0
    """Lease of a project's training lock, in seconds; the training renews it every third of
    that, so a killed trainer frees the project within one lease and its training is rerun."""
    post_retries: int = 5
    """Retries of a background prediction post when Label Studio is unreachable or answers
    408/429/5xx (exponential backoff; never posted twice, see ``labelstudio/api.py``)."""
    post_retry_backoff: float = 1.0
    """First retry delay in seconds (doubled each retry, at most 60 s)."""
    cache_bytes: int = 512 * 1024 * 1024
    """``CACHE_BYTES``: memory for cached image embeddings per process (LRU; 0 turns it off)."""
    absence_test: bool | None = None
    """``ABSENCE_TEST``: return nothing for a target that looks no more like the reference object
    than its own background (``None``: the engine's default, on; the presets' value)."""
    absence_margin: float | None = None
    """``ABSENCE_MARGIN``: the absence test's scale-free margin (``None``: the engine's, 0)."""
    encoder_runtime: str = "torch"
    """``ENCODER_RUNTIME``: ``torch``, ``onnx``, ``onnx_int8``, ``openvino`` or ``openvino_bf16``
    (CPU; exported once, cached)."""
    decoder_precision: str = "float32"
    """``DECODER_PRECISION``: SAM's decoder in ``float32`` or under ``bfloat16`` autocast."""
    encoder_batch: int = 0
    """``ENCODER_BATCH``: tasks of one ``/predict`` (or background chunk) whose images go through
    the encoders together; 0: 8 on a GPU, 1 on a CPU."""

    @classmethod
    def from_env(
        cls, env: Mapping[str, str] | None = None, overrides: Mapping[str, str] | None = None
    ) -> Settings:
        """Read the settings from ``env`` (``os.environ`` by default), ``overrides`` (e.g. command
        line flags, by variable name) winning. The one reader of the environment.

        Raises:
            SettingsError: a variable holds an unusable value (the message names it).
        """
        env = os.environ if env is None else env
        if overrides:
            env = {**env, **overrides}
        return cls(**_model_settings(env), **_service_settings(env), **_number_settings(env))

    # ----------------------------------------------------------------------------------
    @property
    def auth_enabled(self) -> bool:
        return self.basic_auth_user is not None

    def segmenter_config(self) -> SegmenterConfig:
        """The engine configuration these settings describe."""
        if self.random_weights:
            # The same decisions as with real weights (every rule is relative to the reference
            # or the best proposal); only tiny masks are let through, since the tiny models'
            # masks are small.
            config = tiny_config(model_dir=self.model_dir).replace(min_instance_area=1)
            if (self.sam_model_type, self.encoder) != tuple(TINY_MODELS.values()):
                # Random weights of a real-size architecture: allowed, but slow; say so.
                config = config.replace(
                    sam_type=self.sam_model_type,
                    encoder=self.encoder,
                    encoder_input_size=SegmenterConfig.encoder_input_size,
                )
        else:
            config = SegmenterConfig(
                sam_type=self.sam_model_type,
                encoder=self.encoder,
                model_dir=self.model_dir,
            )
        # MODE first: a preset that names its mode (persam, persam_f) wins over it.
        config = config.replace(mode=self.mode)
        if self.preset:
            config = config.with_preset(self.preset)
        if self.absence_test is not None:
            config = config.replace(absence_test=self.absence_test)
        if self.absence_margin is not None:
            config = config.replace(absence_margin=self.absence_margin)
        return config.replace(
            encoder_runtime=self.encoder_runtime,
            decoder_precision=self.decoder_precision,
            sam_checkpoint=self.sam_checkpoint,
            encoder_checkpoint=self.encoder_checkpoint,
            device=self.device,
            cache_bytes=self.cache_bytes,
            max_image_pixels=self.max_image_pixels,
        )

    def describe(self) -> dict:
        """The settings without secrets (for the startup log and ``/health``)."""
        shown = asdict(self)
        for secret in ("label_studio_api_key", "basic_auth_pass"):
            shown[secret] = "***" if shown[secret] else None
        shown["redis_url"] = redact_url(self.redis_url)
        shown["allowed_hosts"] = list(self.allowed_hosts)
        return shown


NUMBER_SETTINGS: tuple[tuple[str, str, type, float], ...] = (
    ("max_request_bytes", "MAX_REQUEST_BYTES", int, 1024),
    ("max_json_depth", "MAX_JSON_DEPTH", int, 8),
    ("max_tasks_per_request", "MAX_TASKS_PER_REQUEST", int, 1),
    ("max_image_bytes", "MAX_IMAGE_BYTES", int, 1),
    ("max_image_pixels", "MAX_IMAGE_PIXELS", int, 1),
    ("max_instances_per_label", "MAX_INSTANCES_PER_LABEL", int, 1),
    ("max_shots_per_label", "MAX_SHOTS_PER_LABEL", int, 1),
    ("max_project_state_bytes", "MAX_PROJECT_STATE_BYTES", int, 1024),
    ("fetch_timeout", "FETCH_TIMEOUT", float, 0.1),
    ("predict_time_budget", "PREDICT_TIME_BUDGET", float, 0.0),
    ("train_debounce", "TRAIN_DEBOUNCE", float, 0.0),
    ("train_retry_delay", "TRAIN_RETRY_DELAY", float, 0.1),
    ("max_concurrent_inference", "MAX_CONCURRENT_INFERENCE", int, 1),
    ("cache_bytes", "CACHE_BYTES", int, 0),
    ("train_lock_ttl", "TRAIN_LOCK_TTL", float, 0.5),
    ("post_retries", "POST_RETRIES", int, 0),
    ("post_retry_backoff", "POST_RETRY_BACKOFF", float, 0.0),
    ("encoder_batch", "ENCODER_BATCH", int, 0),
)
"""The numeric settings: ``(field, variable, type, smallest value)``; the default is the field's."""


def _model_settings(env: Mapping[str, str]) -> dict:
    """The model fields of :class:`Settings`: which models, where, in which mode."""
    random_weights = _flag(env, "ONESHOT_RANDOM_WEIGHTS")
    device = _text(env, "DEVICE", "auto")
    on_gpu = device.startswith("cuda") or (device == "auto" and gpu_available())
    defaults = GPU_DEFAULTS if on_gpu else CPU_DEFAULTS
    if random_weights:
        defaults = {"sam_type": TINY_MODELS["sam_type"], "encoder": TINY_MODELS["encoder"]}
    mode = _choice(env, "MODE", "matcher", MODES)
    preset = _text(env, "PRESET")
    if preset is not None and preset not in PRESETS:
        raise SettingsError(f"PRESET={preset!r}: choose one of {', '.join(sorted(PRESETS))}")
    return {
        "sam_model_type": _text(env, "SAM_MODEL_TYPE", defaults["sam_type"]),
        "sam_checkpoint": _text(env, "SAM_CHECKPOINT"),
        "encoder": _text(env, "ENCODER", defaults["encoder"]),
        "encoder_checkpoint": _text(env, "ENCODER_CHECKPOINT"),
        "device": device,
        "model_dir": _text(env, "MODEL_DIR", Settings.model_dir),
        "random_weights": random_weights,
        "mode": mode,
        "preset": preset,
        "absence_test": _flag(env, "ABSENCE_TEST") if _text(env, "ABSENCE_TEST") else None,
        "absence_margin": (
            _number(env, "ABSENCE_MARGIN", 0.0, float, 0.0)
            if _text(env, "ABSENCE_MARGIN")
            else None
        ),
        "encoder_runtime": _choice(env, "ENCODER_RUNTIME", "torch", ENCODER_RUNTIMES),
        "decoder_precision": _choice(env, "DECODER_PRECISION", "float32", DECODER_PRECISIONS),
    }


def _service_settings(env: Mapping[str, str]) -> dict:
    """The service fields of :class:`Settings`: Redis and jobs, Label Studio, auth, logging,
    where images may come from."""
    user, password = _text(env, "BASIC_AUTH_USER"), _text(env, "BASIC_AUTH_PASS")
    if (user is None) != (password is None):
        raise SettingsError("set both BASIC_AUTH_USER and BASIC_AUTH_PASS, or neither")
    level = _text(env, "LOG_LEVEL", "INFO").upper()
    if not isinstance(logging.getLevelName(level), int):
        raise SettingsError(f"LOG_LEVEL={level!r}: use DEBUG, INFO, WARNING or ERROR")
    redis_url = _text(env, "REDIS_URL")
    jobs = (_text(env, "JOBS") or ("rq" if redis_url else "thread")).lower()
    if jobs not in ("thread", "rq"):
        raise SettingsError(f"JOBS={jobs!r}: use 'thread' or 'rq'")
    if jobs == "rq" and not redis_url:
        raise SettingsError("JOBS=rq needs REDIS_URL")
    log_format = (_text(env, "LOG_FORMAT", "text") or "text").lower()
    if log_format not in ("text", "json"):
        raise SettingsError(f"LOG_FORMAT={log_format!r}: use 'text' or 'json'")
    hosts = tuple(h.strip() for h in (_text(env, "ALLOWED_HOSTS", "") or "").split(",") if h)
    label_studio_url = _text(env, "LABEL_STUDIO_URL")
    if label_studio_url is not None:
        try:
            check_base_url(label_studio_url)
        except ValueError as error:
            raise SettingsError(f"LABEL_STUDIO_URL={label_studio_url!r}: {error}") from None
    return {
        "redis_url": redis_url,
        "jobs": jobs,
        "label_studio_url": label_studio_url,
        "label_studio_api_key": _text(env, "LABEL_STUDIO_API_KEY"),
        "basic_auth_user": user,
        "basic_auth_pass": password,
        "log_level": level,
        "log_format": log_format,
        "allowed_hosts": hosts,
        "local_files_root": _text(env, "LOCAL_FILES_DOCUMENT_ROOT"),
    }


def _number_settings(env: Mapping[str, str]) -> dict:
    """The numeric fields of :class:`Settings` (:data:`NUMBER_SETTINGS`)."""
    return {
        name: _number(env, variable, getattr(Settings, name), kind, minimum)
        for name, variable, kind, minimum in NUMBER_SETTINGS
    }
