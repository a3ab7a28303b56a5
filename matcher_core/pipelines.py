"""Pipelines by mode: ``PIPELINES[config.mode]`` segments one label on one image.

Like segment-anything's ``sam_model_registry``: a mode name maps to a function, so the segmenter
and the learning code pick a pipeline without if/else, and a new mode is one entry. Pipelines get
a narrow :class:`PipelineContext` (configuration, SAM decoder, stage timer), not the segmenter.
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Protocol

from . import matcher, persam
from .config import SegmenterConfig
from .features import ImageFeatures
from .proposals import PromptableSegmenter
from .reference import Instance, LabelReference


class PipelineContext(Protocol):
    """What a pipeline may use (:class:`~matcher_core.segmenter.OneShotSegmenter` is one).

    PerSAM needs SAM's own decoder (:class:`~matcher_core.sam_decoder.SamDecoder`, for its hooks);
    Matcher any :class:`~matcher_core.proposals.PromptableSegmenter` (``bench/oracle.py`` plugs in
    a ground-truth oracle)."""

    config: SegmenterConfig
    decoder: PromptableSegmenter

    def timed(self, stage: str) -> AbstractContextManager[None]:
        """Accumulate the wall time of ``stage`` (read by ``bench/``)."""
        ...


SegmentLabel = Callable[[PipelineContext, ImageFeatures, LabelReference], list[Instance]]
"""``(context, target features, label reference) -> instances`` in original pixels, before any
score threshold."""

PIPELINES: dict[str, SegmentLabel] = {
    "matcher": matcher.segment_label,
    "persam": persam.segment_label,
}


def pipeline_for(mode: str) -> SegmentLabel:
    """The pipeline of ``mode`` (a :data:`PIPELINES` key)."""
    try:
        return PIPELINES[mode]
    except KeyError:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(PIPELINES)}") from None
