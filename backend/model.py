"""The Label Studio ML backend model (:class:`OneShotModel`): the adapter requests go through.

It reads like any ``LabelStudioMLBase`` backend (``setup``, ``predict``, ``fit``) and hands each
request to the use case that does the work: :mod:`.project` (``/setup``), :mod:`.prediction`,
:mod:`.webhooks`, :mod:`.training`. See ``docs/architecture.md`` for the layers.

Lifecycle of a project:

1. ``/setup``: the connection details and the label config are recorded; the model version is
   ``oneshot-waiting`` and ``/predict`` answers ``[]`` per task, quickly (Label Studio stores
   nothing, and asks again once there is a reference).
2. The first submitted annotation with masks (brush, polygon, or rectangle / keypoint turned into
   masks by SAM) arrives by webhook: it is validated at once, stored, and a background training
   builds the reference from it (every label, every instance). The model version becomes
   ``g1-<hash of the learned state>`` (``rnd-g1-...`` with random weights), so Label Studio asks
   again for every task; each later change of what is learned counts the generation up.
3. Later annotations are stored as examples and handed to :meth:`OneShotModel.learn` (learning
   from corrections). ``START_TRAINING`` refetches every annotation from Label Studio and rebuilds.
"""

from __future__ import annotations

from typing import Any

from matcher_core import Reference

from . import prediction, training, webhooks
from .project import ProjectContext, set_up
from .runtime import Runtime, get_runtime
from .settings import Settings
from .store import ProjectState
from .training import TrainingExample


class OneShotModel:
    """Label Studio ML backend in the ``LabelStudioMLBase`` style.

    Built per request with the project id, the label config when the request carries one, and
    the process :class:`~backend.runtime.Runtime`. It holds that :class:`ProjectContext` and hands
    it to the use cases (:mod:`.prediction`, :mod:`.training`, :mod:`.webhooks`), which never call
    back. Subclasses may override :meth:`learn`; the training then calls it.
    """

    def __init__(
        self,
        project_id: Any = None,
        label_config: str | None = None,
        runtime: Runtime | None = None,
    ):
        self.context = ProjectContext(project_id, label_config, runtime=runtime or get_runtime())

    @property
    def runtime(self) -> Runtime:
        return self.context.runtime

    @property
    def project_id(self) -> str | None:
        return self.context.project_id

    @property
    def settings(self) -> Settings:
        return self.context.settings

    @property
    def model_version(self) -> str:
        """The project's current model version (what ``/setup`` and ``/predict`` report)."""
        return self.context.load_state().model_version

    def setup(self, hostname: str | None = None, access_token: str | None = None) -> str:
        """Record Label Studio's connection details and label config; returns the model
        version. Starts loading the models in the background so the first prediction is fast.

        Raises:
            BadRequest: the label config cannot be used (Label Studio shows the message).
        """
        return set_up(self.context, hostname, access_token)

    def predict(self, tasks: list[dict], context: dict | None = None, **kwargs: Any) -> dict:
        """Predictions for ``tasks``, one ``results`` entry per task, in order.

        An entry is ``{"result": [...], "score": s, "model_version": v}``; a task that could not
        be predicted in this call (its image failed, or the time budget ran out and it is being
        predicted in the background) gets an empty list, which Label Studio stores nothing for,
        so it is asked for again later. ``errors`` lists what went wrong, per task. With a
        smart-tool ``context``, the one task's SAM mask for the prompts just drawn.

        Raises:
            BadRequest: malformed tasks or an unusable label config.
            LimitExceeded: more than ``MAX_TASKS_PER_REQUEST`` tasks.
            BackendError: the state store is unreachable.
        """
        return prediction.predict(self.context, tasks, context)

    def fit(self, event: str | None, data: dict, **kwargs: Any) -> dict:
        """Handle a webhook event quickly (Label Studio waits 1 s); work runs in the background.

        ``ANNOTATION_CREATED`` / ``ANNOTATION_UPDATED`` (and bulk ``ANNOTATIONS_CREATED``): the
        annotation is validated, stored, and a training is requested (the first one builds the
        reference). ``ANNOTATIONS_DELETED``: the examples are dropped (deleting the reference's
        annotation promotes the next one). ``START_TRAINING``: full rebuild from Label Studio.
        Other events are acknowledged and ignored.

        Raises:
            BadRequest: a malformed payload or an unusable annotation (nothing is stored).
        """
        return webhooks.handle_webhook(self.context, event, data)

    def train(self, full: bool = False, fence: tuple[str, str] | None = None) -> ProjectState:
        """Bring the project's reference and learned state up to date (background job).

        Builds the reference from the first usable annotation when there is none (or when its
        annotation changed or was deleted, or ``full``), then hands later annotations to
        :meth:`learn`. A failure leaves the previous state and version serving.

        Args:
            fence: ``(lock, token)`` of the training lease: the result is written only while
                that lease is held (see ``backend.jobs``).
        """
        # The default hook runs inside the training; an override is handed in.
        overridden = type(self).learn is not OneShotModel.learn
        hook = self.learn if overridden else None
        return training.train(self.context, hook, full=full, fence=fence)

    def learn(
        self, project: ProjectState, reference: Reference, examples: list[TrainingExample]
    ) -> Reference | None:
        """Learn from every stored annotation (:func:`matcher_core.learning.learn`).

        ``learn`` rebuilds the learned state from the reference's own shots each time (few-shot
        references, negative evidence, PerSAM-F weights, calibrated thresholds), so the
        incremental path and a START_TRAINING rebuild end in the same state.

        Args:
            project: a private copy of the project's state; ``project.learned`` (JSON) gets a
                summary of what was learned and goes into the model version.
            reference: a private copy of the project's current reference.
            examples: every usable stored annotation, oldest first (the reference's own
                included); ``load()`` downloads an image and decodes its masks.

        Returns:
            The learned reference, or ``None`` when no annotation could be loaded.
        """
        return training.default_learn_hook(self.context)(project, reference, examples)

    def predict_and_post(self, tasks: list[dict]) -> int:
        """Background: predict ``tasks`` and store each prediction in Label Studio
        (``POST /api/predictions/``). Returns how many were posted."""
        return prediction.predict_and_post(self.context, tasks)
