"""What the engine remembers of annotated examples: references, shots, learned weights.

A :class:`Reference` holds, per label, one or more :class:`Shot` (an annotated image reduced to
what matching needs), optional negative evidence, PerSAM-F mask weights and a tuned score
threshold. It serialises to bytes without pickle (a JSON header plus ``.npy`` arrays in an
``npz``), so a store can persist it and a hostile blob cannot execute code.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

FORMAT_VERSION = 1
OBJECT_CELL_COVERAGE = 0.5
"""The product's rule for a reference cell to be *object*: its mask covers at least half of it
(``SegmenterConfig.object_cell_coverage``; Matcher's rule, any coverage, is 0)."""

PriorKind = Literal["mean", "mean_max"]
"""PerSAM's location-prior embedding: the mean of the reference features (``persam.py``) or
``(mean + max) / 2`` (``persam_f.py``)."""
PRIOR_KINDS: tuple[str, ...] = ("mean", "mean_max")


@dataclass
class Example:
    """One annotated image: an ``(H, W, 3)`` uint8 RGB image and, per label, its instance masks
    (each ``(H, W)`` bool at the image's resolution)."""

    image: np.ndarray
    masks: dict[str, list[np.ndarray]]


@dataclass
class Instance:
    """One object found in a target image."""

    label: str
    mask: np.ndarray
    """``(H, W)`` bool at the target's original resolution."""
    score: float
    """Confidence in [0, 1]."""
    box: tuple[int, int, int, int]
    """``XYXY`` pixel box around the mask (inclusive min, exclusive max)."""

    @staticmethod
    def from_mask(label: str, mask: np.ndarray, score: float) -> Instance:
        ys, xs = np.nonzero(mask)
        box = (
            (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            if len(xs)
            else (0, 0, 0, 0)
        )
        return Instance(
            label=label, mask=mask.astype(bool), score=float(np.clip(score, 0.0, 1.0)), box=box
        )


@dataclass
class Shot:
    """One reference example of a label, reduced to the patch grid and SAM's feature space."""

    patch_features: np.ndarray
    """``(gh, gw, D)`` float16 L2-normalised encoder features of the whole reference image."""
    patch_mask: np.ndarray
    """``(gh, gw)`` float32: fraction of each patch cell covered by the label's masks."""
    sam_target_embedding: np.ndarray
    """``(C,)`` float32: mean of SAM image features under the mask (PerSAM's target embedding)."""
    instance_count: int = 1
    sam_target_max: np.ndarray | None = None
    """``(C,)`` float32: channel-wise max of SAM image features under the mask (PerSAM-F's
    location prior uses ``(mean + max) / 2``); ``None`` in references saved before it existed."""
    sam_background_cosine: np.ndarray | None = None
    """``(2,)`` float32: the highest cosine between a background cell of this reference image and
    (0) the mean embedding, (1) the ``(mean + max) / 2`` embedding: how alike the reference's own
    non-object cells look (PerSAM's per-reference baseline, :mod:`matcher_core.persam`)."""

    def object_cells(self, min_coverage: float = OBJECT_CELL_COVERAGE) -> np.ndarray:
        """``(gh * gw,)`` bool: the cells the mask covers at least ``min_coverage`` of (the most
        covered cells when none does); ``min_coverage <= 0``: every cell the mask touches at all
        (Matcher's rule, ``avg_pool > 0``)."""
        coverage = np.asarray(self.patch_mask, dtype=np.float32).reshape(-1)
        if min_coverage <= 0:
            return coverage > 0
        inside = coverage >= min_coverage
        if not inside.any() and coverage.max() > 0:
            inside = coverage >= coverage.max()
        return inside

    def masked_features(self, min_coverage: float = OBJECT_CELL_COVERAGE) -> np.ndarray:
        """``(N, D)`` float32 features of the :meth:`object_cells`."""
        flat_mask = self.object_cells(min_coverage)
        return self.patch_features.reshape(len(flat_mask), -1).astype(np.float32)[flat_mask]


@dataclass
class LabelReference:
    """Everything known about one label."""

    label: str
    shots: list[Shot] = field(default_factory=list)
    negatives: np.ndarray | None = None
    """``(N, D)`` float16 features of regions annotators rejected for this label."""
    mask_weights: np.ndarray | None = None
    """PerSAM-F blend of SAM's 3 multimask logits, ``(3,)`` float32 summing to 1."""
    score_threshold: float | None = None
    """Tuned per-label instance score threshold (None: the configuration's)."""
    base_shots: int | None = None
    """How many leading :attr:`shots` are the annotated reference itself; the rest were added by
    learning from corrections (:mod:`matcher_core.learning`), which rebuilds them from scratch.
    ``None``: every shot is a reference shot (nothing learned)."""

    def cap_shots(self, limit: int) -> int:
        """Keep at most ``limit`` shots: the base shots first (as many as fit), then the newest
        learned ones. The one home of the shot cap (``MAX_SHOTS_PER_LABEL``, few-shot adding).
        Returns how many shots were dropped."""
        if len(self.shots) <= limit:
            return 0
        dropped = len(self.shots) - limit
        base = min(self.base_shots or 0, limit)
        learned = self.shots[base:][-(limit - base) :] if limit > base else []
        self.shots = self.shots[:base] + learned
        if self.base_shots is not None:
            self.base_shots = base
        return dropped

    def sam_target_embedding(self) -> np.ndarray:
        """``(C,)`` mean of the shots' SAM target embeddings."""
        return np.mean([s.sam_target_embedding for s in self.shots], axis=0).astype(np.float32)

    def sam_prior_embedding(self, kind: PriorKind = "mean") -> np.ndarray:
        """``(C,)`` embedding of PerSAM's location prior: the mean (PerSAM) or, per shot,
        ``(mean + max) / 2`` of the features under the mask (PerSAM-F), averaged over the shots
        (a shot without a stored max contributes its mean)."""
        if kind == "mean":
            return self.sam_target_embedding()
        if kind != "mean_max":
            raise ValueError(f"unknown prior embedding {kind!r}")
        per_shot = [
            s.sam_target_embedding
            if s.sam_target_max is None
            else (s.sam_target_embedding + s.sam_target_max) / 2
            for s in self.shots
        ]
        return np.mean(per_shot, axis=0).astype(np.float32)

    def background_cosine(self, kind: PriorKind = "mean") -> float | None:
        """Mean over the shots of :attr:`Shot.sam_background_cosine` for the ``kind`` of prior
        embedding; ``None`` when no shot has it."""
        values = [
            float(s.sam_background_cosine[PRIOR_KINDS.index(kind)])
            for s in self.shots
            if s.sam_background_cosine is not None
        ]
        return float(np.mean(values)) if values else None


@dataclass
class Reference:
    """The engine's memory for one project: per-label references built with one pair of models."""

    labels: dict[str, LabelReference] = field(default_factory=dict)
    model_id: str = ""
    """Identity of the models that produced the features (a reference never mixes models)."""

    def to_bytes(self) -> bytes:
        arrays: dict[str, np.ndarray] = {}
        header: dict = {"format": FORMAT_VERSION, "model_id": self.model_id, "labels": []}
        for li, (name, ref) in enumerate(self.labels.items()):
            entry = {
                "label": name,
                "shots": [],
                "score_threshold": ref.score_threshold,
                "negatives": ref.negatives is not None,
                "mask_weights": ref.mask_weights is not None,
                "base_shots": ref.base_shots,
            }
            for si, shot in enumerate(ref.shots):
                arrays[f"l{li}s{si}f"] = shot.patch_features.astype(np.float16)
                arrays[f"l{li}s{si}m"] = shot.patch_mask.astype(np.float32)
                arrays[f"l{li}s{si}e"] = shot.sam_target_embedding.astype(np.float32)
                if shot.sam_target_max is not None:
                    arrays[f"l{li}s{si}x"] = shot.sam_target_max.astype(np.float32)
                if shot.sam_background_cosine is not None:
                    arrays[f"l{li}s{si}b"] = shot.sam_background_cosine.astype(np.float32)
                entry["shots"].append({"instance_count": shot.instance_count})
            if ref.negatives is not None:
                arrays[f"l{li}n"] = ref.negatives.astype(np.float16)
            if ref.mask_weights is not None:
                arrays[f"l{li}w"] = ref.mask_weights.astype(np.float32)
            header["labels"].append(entry)
        buffer = io.BytesIO()
        np.savez_compressed(
            buffer, header=np.frombuffer(json.dumps(header).encode(), dtype=np.uint8), **arrays
        )
        return buffer.getvalue()

    @staticmethod
    def from_bytes(blob: bytes) -> Reference:
        try:
            with np.load(io.BytesIO(blob), allow_pickle=False) as data:
                header = json.loads(data["header"].tobytes().decode())
                if header.get("format") != FORMAT_VERSION:
                    raise ValueError(f"unsupported reference format {header.get('format')!r}")
                labels: dict[str, LabelReference] = {}
                for li, entry in enumerate(header["labels"]):
                    shots = [
                        Shot(
                            patch_features=data[f"l{li}s{si}f"],
                            patch_mask=data[f"l{li}s{si}m"],
                            sam_target_embedding=data[f"l{li}s{si}e"],
                            instance_count=int(meta.get("instance_count", 1)),
                            sam_target_max=_optional(data, f"l{li}s{si}x"),
                            sam_background_cosine=_optional(data, f"l{li}s{si}b"),
                        )
                        for si, meta in enumerate(entry["shots"])
                    ]
                    labels[entry["label"]] = LabelReference(
                        label=entry["label"],
                        shots=shots,
                        negatives=data[f"l{li}n"] if entry["negatives"] else None,
                        mask_weights=data[f"l{li}w"] if entry["mask_weights"] else None,
                        score_threshold=entry.get("score_threshold"),
                        base_shots=entry.get("base_shots"),
                    )
        except (OSError, KeyError, ValueError, json.JSONDecodeError) as error:
            raise ValueError(f"not a serialised reference: {error}") from error
        return Reference(labels=labels, model_id=header.get("model_id", ""))


def _optional(data, key: str) -> np.ndarray | None:
    """An array of an ``npz`` that older references lack."""
    return data[key] if key in data.files else None
