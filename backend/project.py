"""One project as a request or a background job sees it: its id, label config, stored state,
Label Studio connection and images. :class:`ProjectContext` is what the training, prediction and
webhook use cases work on; :class:`backend.model.OneShotModel` holds one.
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from labelstudio import ConfigError, LabelingSchema, parse_label_config, task_image_url
from labelstudio.api import LabelStudioAPI
from labelstudio.download import fetch_image_bytes
from matcher_core.imageio import ImageError, load_image

from .errors import BadRequest, ServiceUnavailable, store_failure
from .leases import resume_stalled_training
from .store import ProjectState, StoreError

if TYPE_CHECKING:
    from .runtime import Runtime

# The backend's model-side log lines keep one logger name, whichever module writes them.
log = logging.getLogger("oneshot.model")

PROJECT_ID_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def project_id_of(value: Any) -> str:
    """Label Studio's project id from ``/setup``'s ``"<id>.<timestamp>"``, a webhook's project
    object, or a bare id.

    Raises:
        BadRequest: none of these, or an id with characters other than letters, digits, ``-_``.
    """
    if isinstance(value, dict):
        value = value.get("id")
    if isinstance(value, bool) or value is None:
        raise BadRequest("missing project id")
    if isinstance(value, int):
        return str(value)
    if isinstance(value, str):
        project_id = value.strip().split(".", 1)[0]
        if PROJECT_ID_PATTERN.match(project_id):
            return project_id
    raise BadRequest(f"invalid project id {str(value)[:80]!r}")


@lru_cache(maxsize=64)
def _parse_config_cached(label_config: str) -> LabelingSchema:
    return parse_label_config(label_config)


def schema_of(label_config: str | None) -> LabelingSchema:
    """The parsed label config (cached by text).

    Raises:
        BadRequest: no config, or one this backend cannot use (the message says why).
    """
    if not label_config:
        raise BadRequest(
            "no label config: Label Studio sends it at /setup and with /predict; connect the "
            "backend to the project first"
        )
    if not isinstance(label_config, str):
        raise BadRequest(f"the label config must be a string, not {type(label_config).__name__}")
    try:
        return _parse_config_cached(label_config)
    except ConfigError as error:
        raise BadRequest(f"unusable label config: {error}") from error


def config_hash(label_config: str) -> str:
    return hashlib.blake2b(label_config.encode(), digest_size=8).hexdigest()


class ProjectContext:
    """A project's id and label config (either may arrive later, with a webhook) plus the
    process runtime: the state store, settings, metrics, jobs and the engine."""

    def __init__(
        self,
        project_id: Any = None,
        label_config: str | None = None,
        *,
        runtime: Runtime,
    ):
        self.runtime = runtime
        self.settings = self.runtime.settings
        self.store = self.runtime.store
        self.metrics = self.runtime.metrics
        self.project_id = project_id_of(project_id) if project_id is not None else None
        self.label_config = label_config

    def require_project_id(self) -> str:
        """The project id.

        Raises:
            BadRequest: the request named no project.
        """
        if self.project_id is None:
            raise BadRequest("missing 'project' (Label Studio sends '<id>.<timestamp>')")
        return self.project_id

    def load_state(self) -> ProjectState:
        """The project's stored state (raises the HTTP error of a store failure)."""
        try:
            return self.store.load(self.require_project_id())
        except StoreError as error:
            raise store_failure(error) from error

    def update_state(
        self, change: Callable[[ProjectState], ProjectState | None], reason: str = ""
    ) -> ProjectState:
        """Apply ``change`` to the stored state (``None`` from it: nothing to write)."""
        try:
            return self.store.update(self.require_project_id(), change, reason)
        except StoreError as error:
            raise store_failure(error) from error

    def schema(self, state: ProjectState | None = None) -> LabelingSchema:
        """The label config of this request, else the stored one, parsed."""
        label_config = self.label_config or (state.label_config if state else None)
        if label_config is None and state is None:
            label_config = self.load_state().label_config
        return schema_of(label_config)

    def connection(self, state: ProjectState) -> tuple[str | None, str | None]:
        """Label Studio URL and key: the environment's when set (an operator's explicit choice,
        e.g. a personal access token where ``/setup`` sends a legacy key), else ``/setup``'s."""
        hostname = self.settings.label_studio_url or state.connection.get("hostname")
        token = self.settings.label_studio_api_key or state.connection.get("access_token")
        return hostname, token

    def api(self, state: ProjectState) -> LabelStudioAPI:
        """A Label Studio API client on this project's connection."""
        hostname, token = self.connection(state)
        return LabelStudioAPI(
            hostname or "",
            token or "",
            timeout=self.settings.fetch_timeout,
            retries=self.settings.post_retries,
            backoff=self.settings.post_retry_backoff,
        )

    def load_task_image(self, task: dict, schema: LabelingSchema, state: ProjectState):
        """``(H, W, 3)`` uint8 RGB image of a task (downloaded, EXIF-rotated, pixel-capped)."""
        hostname, token = self.connection(state)
        url = task_image_url(task, schema)
        data = fetch_image_bytes(
            url,
            hostname=hostname,
            access_token=token,
            task_id=task.get("id"),
            cache_dir=str(Path(self.settings.model_dir).expanduser() / "image-cache"),
            max_bytes=self.settings.max_image_bytes,
            timeout=self.settings.fetch_timeout,
            allowed_hosts=self.settings.allowed_hosts,
            local_files_root=self.settings.local_files_root,
        )
        try:
            return load_image(data, self.settings.max_image_pixels)
        except ImageError as error:
            if "exceeds the cap" in str(error):  # name the setting that decides it
                raise ImageError(f"{error} (MAX_IMAGE_PIXELS)") from error
            raise

    def record_label_config(self) -> ProjectState:
        """Store this request's label config when it differs from the stored one (background
        jobs read it from the store).

        Raises:
            BadRequest: the config is unusable (it is never stored then).
        """
        label_config = self.label_config
        if label_config:
            schema_of(label_config)  # an unusable config is refused (400), never stored

        def change(state: ProjectState) -> ProjectState | None:
            if not label_config or state.label_config == label_config:
                return None
            state.label_config = label_config
            state.label_config_hash = config_hash(label_config)
            return state

        return self.update_state(change, reason="label config")


def set_up(
    project: ProjectContext, hostname: str | None = None, access_token: str | None = None
) -> str:
    """``/setup``: record the connection details and label config, resume a stalled training,
    start loading the models; returns the model version.

    Raises:
        BadRequest: the label config cannot be used (Label Studio shows the message).
    """
    schema = project.schema() if project.label_config else None
    settings = project.settings
    # What the environment pins is never taken from /setup, nor stored (a token the
    # operator configured needs no copy in the state store).
    if settings.label_studio_url:
        hostname = None
    if settings.label_studio_api_key:
        access_token = None
    connection = {k: v for k, v in (("hostname", hostname), ("access_token", access_token)) if v}
    label_config = project.label_config

    def change(state: ProjectState) -> ProjectState | None:
        changed = False
        if label_config and state.label_config != label_config:
            if state.label_config_hash and state.reference is not None:
                log.warning(
                    "project %s: the label config changed; predictions keep the reference "
                    "labels that the new config still has",
                    state.project_id,
                )
            state.label_config = label_config
            state.label_config_hash = config_hash(label_config)
            changed = True
        if connection and connection != state.connection:
            state.connection = connection
            changed = True
        return state if changed else None

    state = project.update_state(change, reason="setup")
    resume_stalled_training(project.runtime, state)
    project.runtime.warm_up()
    problems = blocking_problems(project, state)
    if problems:
        # Label Studio marks the model card "Error" with this text and stops asking for
        # predictions until a /setup succeeds again (it calls /setup whenever it shows the card).
        raise ServiceUnavailable("; ".join(problems))
    log.info(
        "project %s set up (%s; labels %s); model version %s",
        state.project_id,
        f"output {schema.output.type} {schema.output.from_name!r}" if schema else "no config",
        ", ".join(schema.labels) if schema else "-",
        state.model_version,
    )
    return state.model_version


MODEL_WAIT_S = 0.5
"""How long ``/setup`` waits for a model load in progress (Label Studio gives it 3 s in all)."""


def blocking_problems(project: ProjectContext, state: ProjectState) -> list[str]:
    """What stops pre-labels of this project now, each with its fix: models that failed to load,
    a Label Studio that refuses the token or cannot be reached (one cached call), no reference
    because its training failed. Empty when pre-labels can flow."""
    runtime = project.runtime
    problems = []
    runtime.wait_for_models(MODEL_WAIT_S)
    if runtime.model_problem:
        problems.append(runtime.model_problem)
    hostname, token = project.connection(state)
    connection = runtime.connections.problem(hostname, token)
    if connection:
        problems.append(connection)
    if state.reference is None and state.last_error and not connection:
        problems.append(f"no reference yet: its training failed: {state.last_error}")
    return problems
