"""One-shot segmentation engine: Matcher and PerSAM(-F) on SAM, importable without any server."""

from .config import PRESETS, SegmenterConfig, tiny_config
from .reference import Example, Instance, LabelReference, Reference, Shot
from .segmenter import OneShotSegmenter

__all__ = [
    "PRESETS",
    "Example",
    "Instance",
    "LabelReference",
    "OneShotSegmenter",
    "Reference",
    "SegmenterConfig",
    "Shot",
    "tiny_config",
]
