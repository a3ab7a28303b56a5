"""Label Studio ML backend entry point: ``model.py`` with :class:`OneShotModel`, as Label
Studio's ML backends lay it out. The class lives in :mod:`backend.model`; this module only names
it and the few backend names scripts and tests import from here.
"""

from backend.errors import (
    TASK_INPUT_ERRORS,
    BackendError,
    BadRequest,
    LimitExceeded,
    ServiceUnavailable,
    store_failure,
)
from backend.model import OneShotModel
from backend.project import PROJECT_ID_PATTERN, config_hash, project_id_of, schema_of
from backend.training import TrainingExample, model_version_of
from backend.webhooks import ANNOTATION_EVENTS, TRAINING_EVENTS

__all__ = [
    "ANNOTATION_EVENTS",
    "PROJECT_ID_PATTERN",
    "TASK_INPUT_ERRORS",
    "TRAINING_EVENTS",
    "BackendError",
    "BadRequest",
    "LimitExceeded",
    "OneShotModel",
    "ServiceUnavailable",
    "TrainingExample",
    "config_hash",
    "model_version_of",
    "project_id_of",
    "schema_of",
    "store_failure",
]
