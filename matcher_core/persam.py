"""PerSAM and PerSAM-F (Zhang et al., ICLR 2024): one-shot segmentation with SAM features only.

Published rules (the released code, ``ZrrSkywalker/Personalize-SAM``) and where this engine
departs from them: each departure is a named :class:`~matcher_core.config.SegmenterConfig`
option; the ``persam`` / ``persam_f`` presets switch every departure off (table with the tests
that pin each rule: ``docs/faithfulness-persam.md``).

1. **Target embedding** (``persam.py``): the mean SAM feature under the reference mask; it feeds
   the location prior and target-semantic prompting. PerSAM-F's prior instead uses
   ``(mean + max) / 2`` of those features (``persam_f.py``). Option: ``persam_f_first_pass``.
2. **Location prior**: cosine similarity of that embedding to every cell of the target's SAM
   embedding, upsampled to the original image (x4, then SAM's ``postprocess_masks``). PerSAM
   prompts a positive point at its highest pixel and a negative one at its lowest; PerSAM-F the
   positive point only. Option: ``persam_prior_frame="grid"`` picks cell centres on the
   embedding grid instead, SAM's padding cells excluded.
3. **Target-guided attention** (PerSAM only): ``sigmoid`` of the image-resolution prior,
   standardised over its pixels and resized to the embedding grid (the whole image onto the whole
   grid, padding included, as released), added to the softmax-normalised token-to-image
   attention of every two-way block, normalised again.
   **Target-semantic prompting** (PerSAM only): the target embedding added to the tokens with the
   released in-place arithmetic (:mod:`matcher_core.sam_decoder`). Option:
   ``persam_semantic_prompt="queries_only"``.
4. **PerSAM cascade** (``persam.py``): pass 1 = points + both hooks, SAM's *single-mask*
   output; pass 2 = points + pass-1 logits as mask prompt, *multimask*, best predicted IoU;
   pass 3 = points + box of pass 2's mask + its logits, multimask, best predicted IoU.
5. **PerSAM-F cascade** (``persam_f.py``): pass 1 = the positive point, no hooks, multimask,
   the 3 logits blended with the learned weights; pass 2 = point + box of the blended mask +
   the blended logits, multimask, best; pass 3 = point + box of pass 2's mask + its logits,
   multimask, best. The weights are learned on that same first pass of the reference
   (:mod:`matcher_core.persam_f`) and apply only there: never to passes 2-3, never to
   Matcher's prompt sets.
6. **Output heads**: the published passes 2-3 (several prompts) take SAM's multimask outputs,
   although SAM trains those for a single ambiguous prompt. Option:
   ``persam_refine_multimask=False`` takes the single-mask output there.
7. **One mask per target, always**. Options (both on by default, the product's behaviour):
   ``persam_multi_instance`` and ``absence_test``, below.

Known remaining differences (not options): the reference mask selects the embedding cells it
covers at least half, where the released code thresholds at 0 a bilinear sample of the
pixel-normalised mask (about 0.49 coverage at the sample point); an empty blended PerSAM-F mask
gives no box (the released code fails there) and pass 2 runs without one.

**Absence test and further instances** (departures; scale-free, no absolute cosine):
the baseline ``b`` is the reference's own: the highest cosine between a background cell of the
reference image and the prior embedding (:func:`matcher_core.prior.reference_statistics`;
references saved without it fall back to the target prior's median). With ``p1`` the first
instance's prior peak (cosine), the object is absent when ``p1 <= b`` (no cell of the target looks
more like it than the reference's own background did), and the search goes on to a further
instance with peak ``pk`` only while ``pk - b >= persam_instance_ratio * (p1 - b)``.
After an instance is found, its region, dilated by ``persam_suppress_dilation`` cells, is removed
from the prior and the search repeats on the same embedding (no re-encoding). Since the
target-guided attention favours every look-alike region at once, SAM may answer a prompt on one
instance with a mask over several; with several instances allowed, an instance is the connected
part of SAM's mask that holds its positive point. A mask mostly inside an earlier instance (or
containing one) is a duplicate and is dropped.

**Instance score**: ``sqrt(iou * lift)``, the geometric mean of SAM's predicted IoU of the final
mask (clipped to [0, 1]: is this a clean object mask?) and the peak's lift over the baseline,
``(peak - b) / (1 - b)`` clipped to [0, 1] (does the prompted place look like the reference,
more than its background did?). The per-label ``score_threshold`` (calibrated by
:mod:`matcher_core.learning`) then filters the instances.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

from .features import ImageFeatures
from .prior import location_prior
from .reference import Instance, LabelReference, PriorKind
from .sam_decoder import DecoderOutput, SamDecoder, SemanticPrompt, blend

if TYPE_CHECKING:  # pragma: no cover
    from .config import SegmenterConfig
    from .pipelines import PipelineContext

#: Most decoding rounds per label and target, as a multiple of ``max_instances`` (rounds that find
#: a duplicate or an empty mask still suppress a region, so the loop always ends; this bounds it).
MAX_ROUNDS_PER_INSTANCE = 2
#: A new mask sharing at least this fraction of the smaller mask's area with a found instance is
#: the same object found again (SAM prompted on a part returns the whole), not a new instance.
DUPLICATE_OVERLAP = 0.5


@dataclass
class FirstPassPrompt:
    """PerSAM's prompts for one decoding round (first pass), all in the SAM input frame."""

    point_coords: torch.Tensor
    """``(1, N, 2)`` XY: the positive point (prior maximum), then, for PerSAM, the negative
    (prior minimum)."""
    point_labels: torch.Tensor
    """``(1, N)``: ``[[1, 0]]`` (PerSAM) or ``[[1]]`` (published PerSAM-F)."""
    attn_sim: torch.Tensor | None
    """``(He, We)`` target-guided attention prior (0 on padding cells); ``None``: no hooks."""
    peak: float
    """The prior's maximum over the available cells, a cosine in [-1, 1]."""
    peak_cell: tuple[int, int]
    """``(row, col)`` of the positive point on the embedding grid."""

    @property
    def guided(self) -> bool:
        """Whether the first pass runs PerSAM's two decoder hooks."""
        return self.attn_sim is not None


def valid_cells(decoder: SamDecoder, input_size: tuple[int, int]) -> torch.Tensor:
    """``(He, We)`` bool: embedding cells whose centre lies on the image, not on SAM's padding."""
    he, we = decoder.embedding_size
    cell_h, cell_w = decoder.img_size / he, decoder.img_size / we
    rows = (torch.arange(he) + 0.5) * cell_h < input_size[0]
    cols = (torch.arange(we) + 0.5) * cell_w < input_size[1]
    rows[0] = cols[0] = True  # an image thinner than half a cell still lies on the first ones
    return rows[:, None] & cols[None, :]


def cell_centre(decoder: SamDecoder, cell: tuple[int, int]) -> tuple[float, float]:
    """XY centre (SAM input frame) of embedding cell ``(row, col)``."""
    he, we = decoder.embedding_size
    return (cell[1] + 0.5) * decoder.img_size / we, (cell[0] + 0.5) * decoder.img_size / he


def attention_prior(prior: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """PerSAM's target-guided attention bias: ``sigmoid((prior - mean) / std)`` over the image's
    cells, ``(He, We)``; padding cells get 0, the weakest bias, so they draw no extra attention."""
    values = prior[valid]
    std = values.std() if values.numel() > 1 else values.new_tensor(0.0)
    standardised = (prior - values.mean()) / std.clamp_min(1e-6)
    return torch.where(valid, torch.sigmoid(standardised), torch.zeros_like(prior))


def first_pass_prompt(
    decoder: SamDecoder,
    prior: torch.Tensor,
    valid: torch.Tensor,
    available: torch.Tensor | None = None,
    guided: bool = True,
) -> FirstPassPrompt:
    """Prompts from a location prior.

    Args:
        decoder: gives the embedding grid and the SAM input frame.
        prior: ``(He, We)`` cosine similarity to the target embedding.
        valid: ``(He, We)`` bool, cells on the image (:func:`valid_cells`).
        available: ``(He, We)`` bool, cells not yet taken by a found instance (default: all
            valid cells). Taken cells can hold neither the positive point nor attention weight.
        guided: PerSAM's prompts (positive and negative point, attention prior); ``False``:
            published PerSAM-F's (the positive point only, no hooks).
    """
    available = valid if available is None else available & valid
    if not available.any():
        raise ValueError("no available cell in the prior")
    positive = divmod(int(torch.where(available, prior, -torch.inf).argmax()), prior.shape[1])
    cells, labels, attn_sim = [positive], [1], None
    if guided:
        cells.append(divmod(int(torch.where(valid, prior, torch.inf).argmin()), prior.shape[1]))
        labels.append(0)
        floor = prior[valid].min()
        current = torch.where(available, prior, floor)  # taken cells look like the least alike
        attn_sim = attention_prior(current, valid)
    coords = torch.tensor([[cell_centre(decoder, cell) for cell in cells]])
    return FirstPassPrompt(
        point_coords=coords.float(),
        point_labels=torch.tensor([labels]),
        attn_sim=attn_sim,
        peak=float(prior[positive]),
        peak_cell=positive,
    )


def image_prior(decoder: SamDecoder, prior: torch.Tensor, features: ImageFeatures) -> torch.Tensor:
    """``(H, W)`` the ``(He, We)`` prior at the original resolution, as ``persam.py`` makes it:
    bilinear x4 (to the low-res mask size), then SAM's ``postprocess_masks`` (to the padded
    input square, crop, resize to the original size)."""
    x = F.interpolate(prior[None, None].float(), scale_factor=4, mode="bilinear")
    return decoder.upscale(x, features.input_size, features.original_size)[0, 0]


def _cells_to_image(
    decoder: SamDecoder, cells: torch.Tensor, features: ImageFeatures
) -> torch.Tensor:
    """``(H, W)`` bool: the ``(He, We)`` bool value of the embedding cell under each pixel."""
    h, w = features.input_size
    square = F.interpolate(cells[None, None].float(), (decoder.img_size,) * 2, mode="nearest")
    crop = square[..., :h, :w]
    return F.interpolate(crop, tuple(features.original_size), mode="nearest")[0, 0] > 0.5


def first_pass_prompt_image(
    decoder: SamDecoder,
    prior: torch.Tensor,
    features: ImageFeatures,
    available: torch.Tensor | None = None,
    guided: bool = True,
) -> FirstPassPrompt:
    """Prompts as the released code picks them, from the prior at the original resolution
    (:func:`image_prior`; ``persam.py``: ``point_selection`` and the ``attn_sim`` lines).

    The positive point is the pixel of the highest prior (among ``available`` cells), the
    negative one the pixel of the lowest (``persam.py`` only), both mapped to the SAM input frame
    like the released predictor's ``apply_coords``. ``attn_sim`` is ``sigmoid`` of the
    image-resolution prior standardised over all its pixels (unbiased std) and resized
    bilinearly to ``(He, We)``: the whole image onto the whole grid, padding included, as
    released. Taken cells (``available`` False) count as the prior's minimum there.
    """
    full = image_prior(decoder, prior, features)
    width = full.shape[1]
    free = (
        torch.ones_like(full, dtype=torch.bool)
        if available is None
        else _cells_to_image(decoder, available, features)
    )
    if not free.any():
        raise ValueError("no available cell in the prior")
    positive = divmod(int(torch.where(free, full, -torch.inf).argmax()), width)
    pixels, labels, attn_sim = [positive], [1], None
    if guided:
        pixels.append(divmod(int(full.argmin()), width))
        labels.append(0)
        current = torch.where(free, full, full.min())
        spread = torch.std(current) if current.numel() > 1 else torch.zeros(())
        # A constant prior (a 1-pixel image, say) has no spread: a uniform attention bias, where
        # the released code would divide by zero.
        standardised = (current - current.mean()) / spread if spread > 0 else current * 0
        grid = F.interpolate(standardised[None, None], decoder.embedding_size, mode="bilinear")
        attn_sim = torch.sigmoid(grid[0, 0])
    xy = np.array([[col, row] for row, col in pixels], np.float32)
    coords = decoder.to_input_coords(xy, tuple(features.original_size))
    he, we = decoder.embedding_size
    x_in, y_in = coords[0]
    cell = (
        min(int(y_in * he / decoder.img_size), he - 1),
        min(int(x_in * we / decoder.img_size), we - 1),
    )
    return FirstPassPrompt(
        point_coords=torch.from_numpy(coords)[None],
        point_labels=torch.tensor([labels]),
        attn_sim=attn_sim,
        peak=float(full[positive]),
        peak_cell=cell,
    )


def make_prompt(
    config: SegmenterConfig,
    decoder: SamDecoder,
    prior: torch.Tensor,
    features: ImageFeatures,
    available: torch.Tensor | None = None,
    guided: bool = True,
) -> FirstPassPrompt:
    """The first pass's prompts in the frame ``config.persam_prior_frame`` chooses."""
    if config.persam_prior_frame == "image":
        return first_pass_prompt_image(decoder, prior, features, available, guided)
    valid = valid_cells(decoder, features.input_size)
    return first_pass_prompt(decoder, prior, valid, available, guided)


def sam_location_prior(features: ImageFeatures, target_embedding: np.ndarray) -> torch.Tensor:
    """``(He, We)`` cosine similarity of the target embedding to each SAM embedding cell."""
    embedding = features.sam_embedding.float().cpu()
    return location_prior(torch.as_tensor(target_embedding), embedding.permute(1, 2, 0))


def persam_f_published(config: SegmenterConfig, label_ref: LabelReference) -> bool | None:
    """``None``: plain PerSAM; else PerSAM-F, ``True`` with ``persam_f.py``'s first pass."""
    if label_ref.mask_weights is None or not config.persam_use_mask_weights:
        return None
    return config.persam_f_first_pass == "published"


def prior_kind(config: SegmenterConfig, label_ref: LabelReference) -> PriorKind:
    """The location prior's embedding: ``(mean + max) / 2`` for published PerSAM-F, else mean."""
    return "mean_max" if persam_f_published(config, label_ref) else "mean"


def _mask_box(
    decoder: SamDecoder, logits: torch.Tensor, features: ImageFeatures
) -> torch.Tensor | None:
    """The released code's box prompt: ``(1, 4)`` XYXY around the mask of ``(1, 1, h, w)``
    low-res logits *at the original resolution* (pixel indices, inclusive), mapped to the SAM
    input frame like a point; ``None`` if the mask is empty."""
    mask = decoder.upscale(logits, features.input_size, features.original_size)[0, 0]
    ys, xs = torch.nonzero(mask > decoder.mask_threshold, as_tuple=True)
    if len(xs) == 0:
        return None
    corners = np.array([[xs.min(), ys.min()], [xs.max(), ys.max()]], np.float32)
    return torch.from_numpy(decoder.to_input_coords(corners, features.original_size).reshape(1, 4))


def _best(output: DecoderOutput) -> tuple[torch.Tensor, float]:
    """``(1, 1, h, w)`` logits and predicted IoU of the output with the best predicted IoU."""
    best = int(output.iou_predictions[0].argmax())
    return output.low_res_logits[:, best : best + 1], float(output.iou_predictions[0, best])


def first_pass(
    decoder: SamDecoder,
    embedding: torch.Tensor,
    prompt: FirstPassPrompt,
    target_embedding: np.ndarray | None,
    multimask: bool,
    semantic_prompt: SemanticPrompt = "published",
) -> DecoderOutput:
    """The first decoding pass: the prompt's points, and PerSAM's hooks when it is guided."""
    hooks = {}
    if prompt.guided:
        hooks = dict(
            attn_sim=prompt.attn_sim,
            target_embedding=target_embedding,
            semantic_prompt=semantic_prompt,
        )
    return decoder.decode(
        embedding,
        point_coords=prompt.point_coords,
        point_labels=prompt.point_labels,
        multimask=multimask,
        **hooks,
    )


def cascade(
    segmenter: PipelineContext,
    features: ImageFeatures,
    prompt: FirstPassPrompt,
    target_embedding: np.ndarray,
    mask_weights: np.ndarray | None = None,
) -> tuple[torch.Tensor, float]:
    """PerSAM's (no ``mask_weights``) or PerSAM-F's three decoding passes for one prompt
    (module docstring, rules 4-6).

    Returns:
        ``(1, 1, 4 He, 4 We)`` final low-res logits and SAM's predicted IoU of that mask.
    """
    config = segmenter.config
    decoder = segmenter.decoder
    embedding = features.sam_embedding
    points = dict(point_coords=prompt.point_coords, point_labels=prompt.point_labels)
    refine_multimask = config.persam_refine_multimask

    def refine(box: torch.Tensor | None, logits: torch.Tensor) -> tuple[torch.Tensor, float]:
        out = decoder.decode(
            embedding, **points, boxes=box, mask_input=logits, multimask=refine_multimask
        )
        return _best(out)

    with segmenter.timed("decoding"):
        if mask_weights is None:  # PerSAM: single-mask first pass, no box in pass 2
            first = first_pass(
                decoder, embedding, prompt, target_embedding, False, config.persam_semantic_prompt
            )
            logits, iou = refine(None, first.low_res_logits)
        else:  # PerSAM-F: blended multimask first pass, its box in pass 2
            first = first_pass(
                decoder, embedding, prompt, target_embedding, True, config.persam_semantic_prompt
            )
            blended = blend(first.low_res_logits, mask_weights)
            # An empty blended mask has no box (the released code would fail on it): pass 2
            # then runs on the point and the blended logits alone.
            logits, iou = refine(_mask_box(decoder, blended, features), blended)
        box = _mask_box(decoder, logits, features)
        if box is None:  # nothing to box: pass 2's (empty) mask is the answer
            return logits, iou
        return refine(box, logits)


def _taken_cells(
    decoder: SamDecoder,
    mask: np.ndarray,
    input_size: tuple[int, int],
    peak_cell: tuple[int, int],
    dilation: int,
) -> torch.Tensor:
    """``(He, We)`` bool: embedding cells at least half covered by an instance's mask (``(H, W)``
    bool, original resolution), plus the cell that prompted it, dilated by ``dilation`` cells."""
    he, we = decoder.embedding_size
    h, w = input_size
    resized = F.interpolate(
        torch.from_numpy(mask).float()[None, None], (h, w), mode="bilinear", align_corners=False
    )
    padded = torch.zeros(1, 1, decoder.img_size, decoder.img_size)
    padded[..., :h, :w] = resized
    taken = F.adaptive_avg_pool2d(padded, (he, we))[0, 0] >= 0.5
    taken[peak_cell] = True
    if dilation > 0:
        size = 2 * dilation + 1
        grown = F.max_pool2d(taken.float()[None, None], size, stride=1, padding=dilation)
        taken = grown[0, 0] > 0
    return taken


def _component_at(mask: np.ndarray, xy: tuple[float, float]) -> np.ndarray:
    """The 8-connected part of ``mask`` ((H, W) bool) that contains the pixel at ``xy``, or is
    nearest to it when the point fell outside the mask."""
    labels, count = ndimage.label(mask, structure=np.ones((3, 3), dtype=bool))
    if count <= 1:
        return mask
    height, width = mask.shape
    col = min(max(int(xy[0]), 0), width - 1)
    row = min(max(int(xy[1]), 0), height - 1)
    chosen = labels[row, col]
    if chosen == 0:
        rows, cols = np.nonzero(labels)
        nearest = np.argmin((rows - row) ** 2 + (cols - col) ** 2)
        chosen = labels[rows[nearest], cols[nearest]]
    return labels == chosen


def _input_to_original(xy: list[float], features: ImageFeatures) -> tuple[float, float]:
    """An XY point from the SAM input frame to original pixels."""
    (height, width), (h, w) = features.original_size, features.input_size
    return xy[0] * width / w, xy[1] * height / h


def _is_duplicate(mask: np.ndarray, found: list[Instance]) -> bool:
    area = int(mask.sum())
    for instance in found:
        shared = int(np.logical_and(mask, instance.mask).sum())
        if shared >= DUPLICATE_OVERLAP * min(area, int(instance.mask.sum())):
            return True
    return False


def baseline_cosine(
    label_ref: LabelReference, kind: PriorKind, prior: torch.Tensor, valid: torch.Tensor
) -> float:
    """The cosine a place must beat to look like the object: the reference's own background
    baseline (:meth:`LabelReference.background_cosine`), or, for references saved without it,
    the median cell of the target's ``(He, We)`` prior (over the ``valid`` cells)."""
    stored = label_ref.background_cosine(kind)
    return stored if stored is not None else float(prior[valid].median())


def is_absent(peak: float, baseline: float) -> bool:
    """No cell of the target looks more like the object than the reference's background."""
    return peak <= baseline


def is_further_instance(peak: float, first_peak: float, baseline: float, ratio: float) -> bool:
    """A further instance stands above the baseline by at least ``ratio`` of the first one's
    margin (all cosines; scale-free: no absolute cosine is involved)."""
    return peak - baseline >= ratio * (first_peak - baseline) and peak > baseline


def instance_score(iou: float, peak: float, baseline: float) -> float:
    """``sqrt(iou * lift)``: SAM's predicted IoU clipped to [0, 1] and the peak's lift over the
    baseline, ``(peak - baseline) / (1 - baseline)`` clipped to [0, 1]."""
    lift = (peak - baseline) / max(1.0 - baseline, 1e-6)
    return float(np.sqrt(np.clip(iou, 0.0, 1.0) * np.clip(lift, 0.0, 1.0)))


@torch.inference_mode()
def segment_label(
    segmenter: PipelineContext, target: ImageFeatures, label_ref: LabelReference
) -> list[Instance]:
    """Instances of one label in a target image, PerSAM / PerSAM-F style (module docstring).

    Args:
        segmenter: gives ``config`` (options, limits), ``decoder`` and ``timed``.
        target: the target's cached features (only ``sam_embedding`` and the sizes are used).
        label_ref: the label's shots (their SAM target embeddings and background baselines) and
            optional PerSAM-F ``mask_weights``.

    Returns:
        Instances, best first found, masks ``(H, W)`` bool at the target's original resolution,
        scores in [0, 1] (not yet thresholded): exactly one without ``persam_multi_instance``
        and ``absence_test`` (the published output), else up to ``max_instances``.
    """
    config = segmenter.config
    decoder = segmenter.decoder
    published_f = persam_f_published(config, label_ref)
    mask_weights = label_ref.mask_weights if published_f is not None else None
    kind = prior_kind(config, label_ref)
    target_embedding = label_ref.sam_target_embedding()  # the hooks' embedding: the mean
    prior = sam_location_prior(target, label_ref.sam_prior_embedding(kind))
    valid = valid_cells(decoder, target.input_size)
    baseline = baseline_cosine(label_ref, kind, prior, valid)
    limit = config.max_instances if config.persam_multi_instance else 1
    available = valid.clone()
    found: list[Instance] = []
    first_peak: float | None = None

    for _ in range(MAX_ROUNDS_PER_INSTANCE * max(limit, 1)):
        if len(found) >= limit or not available.any():
            break
        prompt = make_prompt(config, decoder, prior, target, available, guided=not published_f)
        if first_peak is None:
            if config.absence_test and is_absent(prompt.peak, baseline):
                break
            first_peak = prompt.peak
        elif not is_further_instance(
            prompt.peak, first_peak, baseline, config.persam_instance_ratio
        ):
            break
        logits, iou = cascade(segmenter, target, prompt, target_embedding, mask_weights)
        upscaled = decoder.upscale(logits, target.input_size, target.original_size)
        mask = (upscaled[0, 0] > decoder.mask_threshold).cpu().numpy()
        score = instance_score(iou, prompt.peak, baseline)
        if limit == 1 and not config.absence_test:  # published: the one mask, as is
            return [Instance.from_mask(label_ref.label, mask, score)]
        if limit > 1 and mask.any():
            # The target-guided attention favours every look-alike region at once, so SAM may
            # return several instances as one mask; keep the part this round was prompted on.
            xy = _input_to_original(prompt.point_coords[0, 0].tolist(), target)
            mask = _component_at(mask, xy)
        available &= ~_taken_cells(
            decoder, mask, target.input_size, prompt.peak_cell, config.persam_suppress_dilation
        )
        if mask.sum() < max(config.min_instance_area, 1) or _is_duplicate(mask, found):
            continue
        found.append(Instance.from_mask(label_ref.label, mask, score))
    return found
