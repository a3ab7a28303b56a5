"""PerSAM-F: learn, per label, how to blend SAM's 3 multimask logits (2 free weights).

The blend is ``(1 - w1 - w2) * m0 + w1 * m1 + w2 * m2`` over SAM's multimask logits, ``w1 = w2 =
1/3`` at the start, trained with Dice + sigmoid focal loss (AdamW, cosine learning-rate schedule)
on annotated examples of the label. The prompts of an example are PerSAM's first pass on that
example: positive and negative point from the example's own location prior, target-guided
attention and target-semantic prompting, multimask output; the same decoder call the weights are
used on at inference (:func:`matcher_core.persam.cascade`).

Why training is fast here: SAM is frozen and its decoder output does not depend on the two
weights, so each example is decoded *once* and its 3 logits, upscaled to the mask's resolution,
are cached; the optimisation loop then only blends cached tensors. The published method runs the
decoder in every iteration; :func:`train_mask_weights_reference` does that too, and tests and
``bench/persam_f_speed.py`` show both learn the same weights.

Several examples: the loss of one iteration is the *mean* of the examples' losses, so one example
gives exactly the published loss and more examples keep its scale (and the learning rate's
meaning) instead of growing with their number.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .features import ImageFeatures
from .persam import FirstPassPrompt, first_pass_prompt, sam_location_prior, valid_cells
from .reference import LabelReference
from .sam_decoder import blend

if TYPE_CHECKING:  # pragma: no cover
    from .segmenter import OneShotSegmenter

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
DICE_SMOOTHING = 1.0
ADAMW_EPS = 1e-4
"""The published PerSAM-F optimiser's epsilon (PyTorch's default is 1e-8)."""


@dataclass
class TrainingReport:
    """Outcome of PerSAM-F training for one label."""

    weights: np.ndarray
    """``(3,)`` float32 blend of SAM's multimask logits ``(1 - w1 - w2, w1, w2)``."""
    loss_before: float
    """Loss with the initial weights ``(1/3, 1/3, 1/3)``."""
    loss_after: float
    """Loss with the learned weights."""
    iterations: int
    seconds: float
    examples: int


def blend_weights(free: torch.Tensor) -> torch.Tensor:
    """``(3,)`` blend ``(1 - w1 - w2, w1, w2)`` from the ``(2,)`` free weights ``(w1, w2)``."""
    return torch.cat([1 - free.sum().reshape(1), free])


def dice_loss(logits: torch.Tensor, target: torch.Tensor, target_sum: torch.Tensor) -> torch.Tensor:
    """Soft Dice loss with +1 smoothing: ``1 - (2 sum(p t) + 1) / (sum(p) + sum(t) + 1)``,
    ``p = sigmoid(logits)``; ``logits``, ``target`` are ``(N,)``, ``target_sum`` is ``sum(t)``."""
    prob = logits.sigmoid()
    numerator = 2 * (prob * target).sum() + DICE_SMOOTHING
    return 1 - numerator / (prob.sum() + target_sum + DICE_SMOOTHING)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, alpha_t: torch.Tensor) -> torch.Tensor:
    """Sigmoid focal loss (gamma 2) averaged over pixels; ``alpha_t`` is the per-pixel class
    weight ``alpha t + (1 - alpha)(1 - t)`` (alpha 0.25), precomputed since it depends on the
    target only."""
    prob = logits.sigmoid()
    cross_entropy = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = prob * target + (1 - prob) * (1 - target)
    return (alpha_t * cross_entropy * (1 - p_t) ** FOCAL_GAMMA).mean()


@dataclass
class _Target:
    """A training mask flattened, with the loss terms that depend on it alone."""

    mask: torch.Tensor
    """``(H * W,)`` float 0/1."""
    mask_sum: torch.Tensor
    alpha_t: torch.Tensor

    @staticmethod
    def of(mask: np.ndarray) -> _Target:
        flat = torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32).reshape(-1))
        return _Target(flat, flat.sum(), FOCAL_ALPHA * flat + (1 - FOCAL_ALPHA) * (1 - flat))

    def loss(self, multimask_logits: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Dice + focal of the blend of ``(1, 3, H, W)`` logits with ``(3,)`` weights."""
        blended = blend(multimask_logits, weights).reshape(-1)
        return dice_loss(blended, self.mask, self.mask_sum) + focal_loss(
            blended, self.mask, self.alpha_t
        )


def example_prompt(
    segmenter: OneShotSegmenter, target_embedding: np.ndarray, features: ImageFeatures
) -> FirstPassPrompt:
    """PerSAM's first-pass prompts on a training example: points and attention prior from the
    example's own location prior."""
    decoder = segmenter.decoder
    prior = sam_location_prior(features, target_embedding)
    return first_pass_prompt(decoder, prior, valid_cells(decoder, features.input_size))


def example_logits(
    segmenter: OneShotSegmenter,
    target_embedding: np.ndarray,
    features: ImageFeatures,
    prompt: FirstPassPrompt,
    mask_size: tuple[int, int],
) -> torch.Tensor:
    """PerSAM's first-pass multimask logits of one example, ``(1, 3, H, W)`` at ``mask_size``
    (the original resolution), as a plain tensor that autograd may use."""
    decoder = segmenter.decoder
    with segmenter.timed("decoding"):
        out = decoder.decode(
            features.sam_embedding,
            point_coords=prompt.point_coords,
            point_labels=prompt.point_labels,
            multimask=True,
            attn_sim=prompt.attn_sim,
            target_embedding=target_embedding,
        )
    with torch.inference_mode():
        logits = decoder.upscale(out.low_res_logits, features.input_size, mask_size)
    return logits.cpu().clone()  # leave inference mode: an inference tensor cannot be saved


def _check_pairs(pairs: list[tuple[ImageFeatures, np.ndarray]]) -> None:
    if not pairs:
        raise ValueError("PerSAM-F needs at least one (image features, mask) example")
    for features, mask in pairs:
        if tuple(mask.shape) != tuple(features.original_size):
            raise ValueError(f"mask {mask.shape} does not fit image {features.original_size}")


def _optimise(
    segmenter: OneShotSegmenter,
    targets: list[_Target],
    logits_of: Callable[[int], torch.Tensor],
    iterations: int,
) -> TrainingReport:
    """The PerSAM-F loop; ``logits_of(i)`` gives example i's ``(1, 3, H, W)`` logits."""
    config = segmenter.config
    start = time.perf_counter()
    free = torch.nn.Parameter(torch.full((2,), 1 / 3))
    optimiser = torch.optim.AdamW(
        [free], lr=config.persam_f_lr, weight_decay=config.persam_f_weight_decay, eps=ADAMW_EPS
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, max(iterations, 1))

    def mean_loss() -> torch.Tensor:
        weights = blend_weights(free)
        return torch.stack([t.loss(logits_of(i), weights) for i, t in enumerate(targets)]).mean()

    with torch.inference_mode(False), torch.enable_grad():
        loss_before = None
        for _ in range(iterations):
            loss = mean_loss()
            loss_before = float(loss.detach()) if loss_before is None else loss_before
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
        with torch.no_grad():
            loss_after = float(mean_loss())
    return TrainingReport(
        weights=blend_weights(free.detach()).numpy().astype(np.float32),
        loss_before=loss_after if loss_before is None else loss_before,
        loss_after=loss_after,
        iterations=iterations,
        seconds=time.perf_counter() - start,
        examples=len(targets),
    )


def train_mask_weights(
    segmenter: OneShotSegmenter,
    label_ref: LabelReference,
    pairs: list[tuple[ImageFeatures, np.ndarray]],
    iterations: int | None = None,
) -> TrainingReport:
    """Learn the label's PerSAM-F blend weights on ``pairs`` of (features, ``(H, W)`` bool mask).

    Each example is decoded once; the ``iterations`` (default ``config.persam_f_iterations``)
    AdamW steps run on the cached logits. ``seconds`` includes the decoding.
    """
    _check_pairs(pairs)
    start = time.perf_counter()
    target_embedding = label_ref.sam_target_embedding()
    cached = []
    for features, mask in pairs:
        prompt = example_prompt(segmenter, target_embedding, features)
        cached.append(example_logits(segmenter, target_embedding, features, prompt, mask.shape))
    targets = [_Target.of(mask) for _, mask in pairs]
    iterations = segmenter.config.persam_f_iterations if iterations is None else iterations
    report = _optimise(segmenter, targets, cached.__getitem__, iterations)
    report.seconds = time.perf_counter() - start
    return report


def train_mask_weights_reference(
    segmenter: OneShotSegmenter,
    label_ref: LabelReference,
    pairs: list[tuple[ImageFeatures, np.ndarray]],
    iterations: int | None = None,
) -> TrainingReport:
    """The published loop: decode every example again in every iteration (slow).

    Only for tests and ``bench/`` to show that :func:`train_mask_weights` learns the same weights.
    """
    _check_pairs(pairs)
    target_embedding = label_ref.sam_target_embedding()
    targets = [_Target.of(mask) for _, mask in pairs]
    iterations = segmenter.config.persam_f_iterations if iterations is None else iterations
    prompts = [example_prompt(segmenter, target_embedding, f) for f, _ in pairs]

    def decode_again(index: int) -> torch.Tensor:
        features, mask = pairs[index]
        return example_logits(segmenter, target_embedding, features, prompts[index], mask.shape)

    return _optimise(segmenter, targets, decode_again, iterations)
