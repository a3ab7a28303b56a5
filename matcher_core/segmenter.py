"""The one entry point of the engine: :class:`OneShotSegmenter`.

>>> segmenter = OneShotSegmenter(SegmenterConfig())
>>> reference = segmenter.build_reference([Example(image, {"cat": [cat_mask]})])
>>> instances = segmenter.segment(reference, other_image)
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from collections.abc import Iterable
from contextlib import contextmanager

import numpy as np
import torch

from .cache import EmbeddingCache, image_key
from .config import SegmenterConfig
from .decode_memo import MemoSamDecoder
from .features import (
    ImageFeatures,
    PatchEncoder,
    SamImageEncoder,
    pool_mask_to_grid,
    sam_patch_grid,
)
from .models import load_encoder, load_sam, select_device
from .persam import valid_cells
from .pipelines import pipeline_for
from .prior import reference_statistics
from .reference import Example, Instance, LabelReference, Reference, Shot

log = logging.getLogger(__name__)


def _timm_version() -> str:
    import timm

    return timm.__version__


class OneShotSegmenter:
    """Segments, in target images, the objects shown by a reference (Matcher or PerSAM mode).

    Models load once, at construction. Image features are cached by content, so segmenting an
    image again (new reference, new weights) runs no encoder.
    """

    def __init__(self, config: SegmenterConfig | None = None):
        self.config = config = config or SegmenterConfig()
        self.device = select_device(config.device)
        if config.random_weights:
            log.warning(
                "RANDOM WEIGHTS: SAM %s and encoder %s are randomly initialised; "
                "outputs are meaningless (smoke runs and tests only)",
                config.sam_type,
                config.encoder,
            )
        self.sam = load_sam(config, self.device)
        self.sam_encoder = SamImageEncoder(self.sam)
        # PerSAM needs SAM's features only: its patch grid is SAM's own embedding, and no
        # matching encoder is loaded or run.
        self.patch_encoder = (
            None
            if config.mode == "persam"
            else PatchEncoder(load_encoder(config, self.device), config.encoder_input_size)
        )
        if config.encoder_runtime != "torch" and self.device.type == "cpu":
            self._accelerate_encoders()
        self.decoder = MemoSamDecoder(
            self.sam, config.decoder_memo_bytes, precision=config.decoder_precision
        )
        self.cache = EmbeddingCache(config.cache_bytes)
        encoder_id = (
            "sam"
            if self.patch_encoder is None
            else f"{config.encoder}@{config.encoder_input_size}:"
            f"{config.encoder_checkpoint or 'pretrained'}"
        )
        self.model_id = (
            f"sam={config.sam_type}:{config.sam_checkpoint or 'official'};"
            f"encoder={encoder_id};random={config.random_weights}"
        )
        self.encoder_calls = 0
        self.timings: dict[str, float] = defaultdict(float)

    def _accelerate_encoders(self) -> None:
        """Run both image encoders through ``config.encoder_runtime`` (ONNX Runtime)."""
        from . import runtime
        from .models import model_dir, resolve_sam_checkpoint

        config, directory = self.config, model_dir(self.config)
        sam_id = runtime.checkpoint_identity(resolve_sam_checkpoint(config), config.sam_type)
        runtime.accelerate_sam(
            self.sam, directory, f"{config.sam_type}:{sam_id}", config.encoder_runtime
        )
        if self.patch_encoder is not None:
            checkpoint = config.encoder_checkpoint
            if checkpoint is None and config.random_weights:
                name = f"random-encoder-{config.encoder}-{config.encoder_input_size}"
                checkpoint = directory / f"{name}-seed{config.seed}.pth"
            encoder_id = runtime.checkpoint_identity(
                checkpoint, f"timm{_timm_version()}:{config.encoder}"
            )
            runtime.accelerate_patch_encoder(
                self.patch_encoder,
                directory,
                f"{config.encoder}:{encoder_id}",
                config.encoder_runtime,
            )

    # ---------------------------------------------------------------------------------------
    @contextmanager
    def timed(self, stage: str):
        """Accumulate wall time of ``stage`` into :attr:`timings` (read by ``bench/``)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.timings[stage] += time.perf_counter() - start

    def features(self, image: np.ndarray) -> ImageFeatures:
        """SAM embedding and patch features of an ``(H, W, 3)`` uint8 image (cached by content)."""
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}"
            )
        key = image_key(image, self.model_id)
        cached = self.cache.get(key)
        if cached is not None:
            return cached
        self.encoder_calls += 1
        with self.timed("encoder_sam"):
            embedding, input_size = self.sam_encoder(image)
        if self.patch_encoder is None:
            patches = sam_patch_grid(embedding, input_size, self.decoder.img_size)
        else:
            with self.timed("encoder_patch"):
                patches = self.patch_encoder(image)
        features = ImageFeatures(
            original_size=image.shape[:2],
            input_size=input_size,
            sam_embedding=embedding,
            patch_features=patches,
        )
        self.cache.put(key, features)
        return features

    def features_many(self, images: list[np.ndarray], batch_size: int = 4) -> list[ImageFeatures]:
        """:meth:`features` of several images, the uncached ones through each encoder in
        batches of ``batch_size`` (pays on a GPU; on a CPU it saves little). Duplicates (same
        content) are encoded once."""
        for image in images:
            if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(
                    f"expected an (H, W, 3) uint8 RGB image, got {image.shape} {image.dtype}"
                )
        keys = [image_key(image, self.model_id) for image in images]
        todo: dict[str, np.ndarray] = {}
        for key, image in zip(keys, images, strict=True):
            if key not in todo and self.cache.get(key) is None:
                todo[key] = image
        pending = list(todo.items())
        done: dict[str, ImageFeatures] = {}
        for start in range(0, len(pending), max(1, batch_size)):
            chunk = pending[start : start + max(1, batch_size)]
            chunk_images = [image for _, image in chunk]
            self.encoder_calls += len(chunk)
            with self.timed("encoder_sam"):
                sam_out = self.sam_encoder.many(chunk_images)
            if self.patch_encoder is None:
                grids = [sam_patch_grid(e, size, self.decoder.img_size) for e, size in sam_out]
            else:
                with self.timed("encoder_patch"):
                    grids = self.patch_encoder.many(chunk_images)
            for (key, image), (embedding, size), grid in zip(chunk, sam_out, grids, strict=True):
                features = ImageFeatures(
                    original_size=image.shape[:2],
                    input_size=size,
                    sam_embedding=embedding.clone(),
                    patch_features=grid.clone(),
                )
                self.cache.put(key, features)
                done[key] = features
        return [
            done.get(key) or self.features(image) for key, image in zip(keys, images, strict=True)
        ]

    # ---------------------------------------------------------------------------------------
    def make_shot(self, features: ImageFeatures, masks: list[np.ndarray]) -> Shot:
        """Reduce one labelled image to a :class:`Shot` (masks are ``(H, W)`` bool, same size)."""
        union = np.zeros(features.original_size, dtype=bool)
        for mask in masks:
            if mask.shape != union.shape:
                raise ValueError(f"mask of shape {mask.shape} does not fit image {union.shape}")
            union |= mask.astype(bool)
        if not union.any():
            raise ValueError("empty mask: a reference needs at least one object pixel")
        grid = tuple(features.patch_features.shape[:2])
        patch_mask = pool_mask_to_grid(union, grid).numpy()
        mean, maximum, background = reference_statistics(
            features.sam_embedding.cpu(),
            self._embedding_cells(features, union),
            valid_cells(self.decoder, features.input_size),
        )
        return Shot(
            patch_features=features.patch_features.cpu().numpy().astype(np.float16),
            patch_mask=patch_mask.astype(np.float32),
            sam_target_embedding=mean.numpy().astype(np.float32),
            instance_count=len(masks),
            sam_target_max=maximum.numpy().astype(np.float32),
            sam_background_cosine=background.numpy().astype(np.float32),
        )

    def sam_target_embedding(self, features: ImageFeatures, mask: np.ndarray) -> np.ndarray:
        """``(C,)`` mean SAM feature under ``mask`` (PerSAM's target embedding), over the cells
        of :meth:`_embedding_cells`."""
        embedding = features.sam_embedding
        weights = self._embedding_cells(features, mask).float()
        flat = embedding.float().cpu().reshape(embedding.shape[0], -1)
        return (flat @ weights.reshape(-1) / weights.sum()).numpy().astype(np.float32)

    def _embedding_cells(self, features: ImageFeatures, mask: np.ndarray) -> torch.Tensor:
        """``(He, We)`` bool: embedding cells under an ``(H, W)`` mask.

        The mask is mapped into the embedding's frame (resized like the image, padded); a cell
        is under it when covered at least half (the best cell if none is).
        """
        _, he, we = features.sam_embedding.shape
        h, w = features.input_size
        mask_t = torch.as_tensor(mask, dtype=torch.float32)[None, None]
        resized = torch.nn.functional.interpolate(
            mask_t, (h, w), mode="bilinear", align_corners=False
        )
        padded = torch.zeros(1, 1, self.decoder.img_size, self.decoder.img_size)
        padded[..., :h, :w] = resized
        cells = torch.nn.functional.adaptive_avg_pool2d(padded, (he, we))[0, 0]
        inside = cells >= 0.5
        return inside if inside.any() else cells >= cells.max()

    def build_reference(self, examples: Iterable[Example]) -> Reference:
        """A new :class:`Reference` from annotated examples (one shot per example and label).

        With ``config.persam_f_train_on_reference`` (the ``persam_f`` preset) the PerSAM-F
        weights are then trained on these examples, as ``persam_f.py`` does on its reference.
        """
        examples = list(examples)
        reference = self.add_examples(Reference(model_id=self.model_id), examples)
        if self.config.persam_f_train_on_reference:
            self.train_mask_weights(reference, examples)
        return reference

    def add_examples(
        self, reference: Reference, examples: Iterable[Example], max_shots: int = 8
    ) -> Reference:
        """Add examples as further shots (few-shot); keeps at most ``max_shots`` per label,
        the newest, so the reference stays bounded."""
        self.check_model(reference)
        for example in examples:
            features = self.features(example.image)
            for label, masks in example.masks.items():
                masks = [m for m in masks if m.any()]
                if not masks:
                    continue
                ref = reference.labels.setdefault(label, LabelReference(label=label))
                ref.shots.append(self.make_shot(features, masks))
                ref.cap_shots(max_shots)
        return reference

    def check_model(self, reference: Reference) -> None:
        """Raises ValueError when ``reference`` was built with other models than this one's."""
        if reference.model_id and reference.model_id != self.model_id:
            raise ValueError(
                f"reference was built with other models ({reference.model_id}); "
                f"this segmenter runs {self.model_id}"
            )

    # ---------------------------------------------------------------------------------------
    def segment(
        self, reference: Reference, image: np.ndarray, labels: Iterable[str] | None = None
    ) -> list[Instance]:
        """Instances of every reference label (or of ``labels``) found in ``image``."""
        self.check_model(reference)
        target = self.features(image)
        wanted = list(labels) if labels is not None else list(reference.labels)
        instances: list[Instance] = []
        for label in wanted:
            label_ref = reference.labels.get(label)
            if label_ref is None or not label_ref.shots:
                continue
            found = self.segment_label(target, label_ref)
            threshold = (
                label_ref.score_threshold
                if label_ref.score_threshold is not None
                else self.config.score_threshold
            )
            instances.extend(i for i in found if i.score >= threshold)
        return instances

    def segment_from_prompts(
        self,
        image: np.ndarray,
        points: np.ndarray | None = None,
        point_labels: np.ndarray | None = None,
        box: np.ndarray | None = None,
    ) -> tuple[np.ndarray, float]:
        """SAM's mask for explicit prompts (interactive smart tools; boxes turned into masks).

        Args:
            image: ``(H, W, 3)`` uint8 RGB (its embedding is cached).
            points: ``(N, 2)`` XY original pixels; ``point_labels``: ``(N,)`` 1 positive, 0 negative.
            box: ``(4,)`` XYXY original pixels.

        Returns:
            ``(H, W)`` bool mask and SAM's predicted IoU of it: for a lone point the best of SAM's
            3 masks by predicted IoU, for several points or a box its single-mask output (the
            output SAM trains for such prompts).
        """
        if points is None and box is None:
            raise ValueError("give at least one point or a box")
        features = self.features(image)
        size = features.original_size
        coords = labels = boxes = None
        if points is not None and len(points):
            coords = torch.from_numpy(self.decoder.to_input_coords(np.asarray(points), size))[None]
            labels = torch.as_tensor(np.asarray(point_labels), dtype=torch.int64)[None]
        if box is not None:
            corners = self.decoder.to_input_coords(np.asarray(box, np.float32).reshape(2, 2), size)
            boxes = torch.from_numpy(corners.reshape(1, 4))
        lone_point = boxes is None and labels is not None and labels.shape[1] == 1
        with self.timed("decoding"):
            out = self.decoder.decode(
                features.sam_embedding, coords, labels, boxes, multimask=lone_point
            )
        best = int(out.iou_predictions[0].argmax())
        logits = self.decoder.upscale(
            out.low_res_logits[:, best : best + 1], features.input_size, size
        )
        mask = (logits[0, 0] > self.decoder.mask_threshold).cpu().numpy()
        return mask, float(out.iou_predictions[0, best].clamp(0, 1))

    def segment_label(self, target: ImageFeatures, label_ref: LabelReference) -> list[Instance]:
        """Every instance the configured pipeline (:data:`~matcher_core.pipelines.PIPELINES`)
        finds of one label on ``target``, in original pixels, before any score threshold."""
        return pipeline_for(self.config.mode)(self, target, label_ref)

    def train_mask_weights(self, reference: Reference, examples: Iterable[Example]) -> dict:
        """PerSAM-F: learn each label's 3-way mask blend on ``examples``; returns a report per label."""
        self.check_model(reference)
        per_label: dict[str, list[tuple[ImageFeatures, np.ndarray]]] = defaultdict(list)
        for example in examples:
            features = self.features(example.image)
            for label, masks in example.masks.items():
                union = np.any([m.astype(bool) for m in masks], axis=0) if masks else None
                if union is not None and union.any() and label in reference.labels:
                    per_label[label].append((features, union))
        from . import persam_f

        reports = {}
        for label, pairs in per_label.items():
            with self.timed("persam_f"):
                report = persam_f.train_mask_weights(self, reference.labels[label], pairs)
            reference.labels[label].mask_weights = report.weights
            reports[label] = report
        return reports
