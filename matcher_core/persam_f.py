"""PerSAM-F: learn, per label, how to blend SAM's 3 multimask logits (2 free weights).

The blend is ``(1 - w1 - w2) * m0 + w1 * m1 + w2 * m2`` over SAM's multimask logits, ``w1 = w2 =
1/3`` at the start, trained with Dice + sigmoid focal loss (AdamW, eps 1e-4, cosine learning-rate
schedule, 1000 iterations at lr 1e-3 by default) on annotated examples of the label, as in the
released ``persam_f.py``.

**Where the weights apply**: only to the decoder call they were learned on, PerSAM-F's *first
pass* in PerSAM mode (:func:`matcher_core.persam.cascade`). Passes 2-3 of the cascade take SAM's
best output as usual, and the weights are never blended into Matcher's prompt sets (their
prompts are not the ones the weights were learned on).

The prompts of an example are that first pass on the example's own location prior
(``config.persam_f_first_pass``):

* ``published`` (default, ``persam_f.py``): the positive point only, at the maximum of the
  prior of the ``(mean + max) / 2`` reference embedding, no decoder hooks, multimask output;
* ``persam`` (a departure): PerSAM's first pass (positive and negative point from the mean
  prior, target-guided attention and target-semantic prompting), multimask output.

``persam_f.py`` trains on the reference image itself; ``config.persam_f_train_on_reference`` (the
``persam_f`` preset) does so in :meth:`OneShotSegmenter.build_reference`, and
:mod:`matcher_core.learning` also trains on corrected examples.

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

import contextlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from .features import ImageFeatures
from .persam import (
    FirstPassPrompt,
    first_pass,
    make_prompt,
    sam_location_prior,
)
from .reference import LabelReference
from .sam_decoder import blend

if TYPE_CHECKING:  # pragma: no cover
    from .segmenter import OneShotSegmenter

FOCAL_ALPHA = 0.25
FOCAL_GAMMA = 2.0
DICE_SMOOTHING = 1.0
ADAMW_EPS = 1e-4
"""The published PerSAM-F optimiser's epsilon (PyTorch's default is 1e-8)."""


@contextmanager
def _one_intra_op_thread() -> Iterator[None]:
    """Run the cached-logits loop on one intra-op thread, then restore the setting.

    Each iteration is ~20 element-wise passes over the pixels; splitting each across threads
    costs a fork/join per pass, and on a shared CPU the threads wait for each other: on the
    project's loaded 2-core machine, 2 threads made the loop 10x *slower* than 1. (The setting is
    process-wide while training runs.)
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


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
        """Dice + focal of the blend of ``(1, 3, H, W)`` logits with ``(3,)`` weights (autograd
        formulation, as published)."""
        blended = blend(multimask_logits, weights).reshape(-1)
        return dice_loss(blended, self.mask, self.mask_sum) + focal_loss(
            blended, self.mask, self.alpha_t
        )


CHUNK_PIXELS = 1 << 17
"""Pixels per block in :class:`_CachedExample`: a block's temporaries stay in the CPU cache,
and blocks are few enough that per-operation dispatch does not dominate (measured on an
854 x 480 mask: 2^17 beats 2^15 and 2^16 by 1.1-1.2x; BENCHMARKS.md, PerSAM-F)."""


def cross_entropy_from_probability(
    s: torch.Tensor, q: torch.Tensor, right: torch.Tensor
) -> torch.Tensor:
    """``softplus(s) = log(1 + exp(s))`` given ``q = sigmoid(s)`` and ``right = 1 - q``, in place
    of ``s``.

    ``softplus(s) = max(s, 0) - log(max(q, 1 - q))``: one vectorised ``log`` instead of
    ``F.softplus``, whose CPU kernel calls scalar ``log1p`` (20x slower per pixel here). Where
    ``max(q, 1 - q)`` rounds to 1 the result loses its tail ``exp(-|s|) < 6e-8``; every use
    multiplies it by ``q^2`` (focal term and slope), so the loss moves by less than float32
    resolution.
    """
    return s.clamp_(min=0).sub_(torch.maximum(q, right).log_())


class _CachedExample:
    """One example's cached multimask logits with the loss and its gradient in closed form.

    The same loss as :meth:`_Target.loss`, computed in one pass over the pixels (the loop's cost
    is all per-pixel work). With ``t`` in {0, 1}, let ``s = (1 - 2t) z`` be the logit signed
    towards the wrong class, ``q = sigmoid(s) = 1 - p_t``. Then

    * focal: ``alpha_t * softplus(s) * q^2`` (``softplus(s)`` is the cross-entropy);
    * Dice: ``sum(p) = sum(t) + sum((1 - 2t) q)``, ``sum(p t) = sum(t) - sum(t q)``;
    * ``d focal / ds = alpha_t q^2 (2 (1 - q) softplus(s) + q)``,
      ``d dice / ds = (a + b t) q (1 - q)`` with ``a = num / den^2``, ``b = 2 (den - num) / den^2``
      (``num = 2 sum(p t) + 1``, ``den = sum(p) + sum(t) + 1``);
    * ``s`` is linear in the blend weights, ``s = weights @ x`` with ``x = (1 - 2t) logits``, so
      the gradient with respect to the weights is a matrix-vector product.

    What depends on the target alone is done once: the pixels are split into the object's and
    the background's, so that within each ``t`` and ``alpha_t`` are constants (applied to the
    group's sums, not per pixel). The Dice factors ``a`` and ``b`` need every pixel's ``q``
    first, but they are scalars: the Dice gradient is ``a * x @ (q (1 - q))`` over all pixels
    plus ``b *`` the same over the object's, so one pass collects those ``(3,)`` vectors with the
    focal gradient and applies ``a`` and ``b`` at the end. Pixels go in blocks of
    :data:`CHUNK_PIXELS`; sums accumulate in float64.
    """

    def __init__(self, logits: torch.Tensor, mask: np.ndarray):
        flat_logits = logits.reshape(3, -1)
        inside = torch.from_numpy(np.ascontiguousarray(mask, dtype=bool).reshape(-1))
        count = inside.numel()
        self.target_sum = float(inside.sum())
        # Signed towards the wrong class: negated inside the object (t = 1), as they are outside.
        groups = (
            ((-flat_logits[:, inside]).contiguous(), FOCAL_ALPHA / count, True),
            (flat_logits[:, ~inside].contiguous(), (1 - FOCAL_ALPHA) / count, False),
        )
        self.blocks = [
            (x[:, i : i + CHUNK_PIXELS], alpha_over_count, is_object)
            for x, alpha_over_count, is_object in groups
            for i in range(0, x.shape[1], CHUNK_PIXELS)
        ]

    def loss_and_gradient(
        self, weights: torch.Tensor, pool: ThreadPoolExecutor | None = None
    ) -> tuple[float, torch.Tensor]:
        """Loss and its ``(3,)`` gradient with respect to the ``(3,)`` blend weights; with a
        ``pool``, its threads share the blocks (:data:`LOSS_THREADS`)."""
        if pool is None:
            sums = _block_sums(self.blocks, weights)
        else:
            parts = [self.blocks[i::LOSS_THREADS] for i in range(LOSS_THREADS)]
            sums = sum(pool.map(_block_sums, parts, [weights] * LOSS_THREADS), _BlockSums())
        numerator = 2 * (self.target_sum - sums.object_q) + DICE_SMOOTHING
        denominator = (
            (self.target_sum - sums.object_q + sums.background_q) + self.target_sum + DICE_SMOOTHING
        )
        a = numerator / denominator**2
        b = 2 * (denominator - numerator) / denominator**2
        gradient = sums.focal_gradient + a * sums.dice_all + b * sums.dice_object
        return 1 - numerator / denominator + sums.focal, gradient.float()


LOSS_THREADS = 2
"""Threads that share an iteration's blocks when the caller allows more than one intra-op
thread: each runs its blocks' operations on one core, with one join per iteration (1.2x on 2
cores, where threads inside each operation made it slower; BENCHMARKS.md, PerSAM-F)."""


@dataclass
class _BlockSums:
    """The per-pixel sums of :class:`_CachedExample` over some of its blocks."""

    focal: float = 0.0
    object_q: float = 0.0
    background_q: float = 0.0
    focal_gradient: torch.Tensor = field(
        default_factory=lambda: torch.zeros(3, dtype=torch.float64)
    )
    dice_all: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))
    dice_object: torch.Tensor = field(default_factory=lambda: torch.zeros(3, dtype=torch.float64))

    def __add__(self, other: _BlockSums) -> _BlockSums:
        return _BlockSums(
            *(getattr(self, f.name) + getattr(other, f.name) for f in fields(_BlockSums))
        )


def _block_sums(
    blocks: list[tuple[torch.Tensor, float, bool]], weights: torch.Tensor
) -> _BlockSums:
    """One pass over ``blocks`` of :class:`_CachedExample` at the blend ``weights``."""
    sums = _BlockSums()
    for signed_logits, alpha_over_count, is_object in blocks:
        s = weights @ signed_logits
        q = torch.sigmoid(s)
        right = 1 - q  # p_t
        cross_entropy = cross_entropy_from_probability(s, q, right)
        q2 = q * q
        sums.focal += alpha_over_count * float(torch.dot(q2, cross_entropy))
        q_sum = float(q.sum())
        focal_slope = torch.addcmul(q, right, cross_entropy, value=2).mul_(q2)
        sums.focal_gradient += (signed_logits @ focal_slope) * alpha_over_count
        dice = signed_logits @ q.mul_(right)  # q (1 - q); q is not needed any more
        sums.dice_all += dice
        if is_object:
            sums.object_q += q_sum
            sums.dice_object += dice
        else:
            sums.background_q += q_sum
    return sums


def example_prompt(
    segmenter: OneShotSegmenter, label_ref: LabelReference, features: ImageFeatures
) -> FirstPassPrompt:
    """PerSAM-F's first-pass prompts on a training example, from the example's own location
    prior (``config.persam_f_first_pass``, module docstring)."""
    decoder = segmenter.decoder
    published = segmenter.config.persam_f_first_pass == "published"
    prior = sam_location_prior(
        features, label_ref.sam_prior_embedding("mean_max" if published else "mean")
    )
    return make_prompt(segmenter.config, decoder, prior, features, guided=not published)


def example_logits(
    segmenter: OneShotSegmenter,
    target_embedding: np.ndarray,
    features: ImageFeatures,
    prompt: FirstPassPrompt,
    mask_size: tuple[int, int],
) -> torch.Tensor:
    """PerSAM-F's first-pass multimask logits of one example, ``(1, 3, H, W)`` at ``mask_size``
    (the original resolution), as a plain tensor that autograd may use."""
    decoder = segmenter.decoder
    with segmenter.timed("decoding"):
        out = first_pass(
            decoder,
            features.sam_embedding,
            prompt,
            target_embedding,
            multimask=True,
            semantic_prompt=segmenter.config.persam_semantic_prompt,
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
    loss_and_gradient: Callable[[torch.Tensor], tuple[float, torch.Tensor]],
    iterations: int,
    examples: int,
) -> TrainingReport:
    """The PerSAM-F loop over the ``(2,)`` free weights ``(w1, w2)``.

    ``loss_and_gradient(free)`` returns the loss at ``free`` and its ``(2,)`` gradient.
    """
    config = segmenter.config
    start = time.perf_counter()
    free = torch.nn.Parameter(torch.full((2,), 1 / 3))
    optimiser = torch.optim.AdamW(
        [free], lr=config.persam_f_lr, weight_decay=config.persam_f_weight_decay, eps=ADAMW_EPS
    )
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, max(iterations, 1))
    losses = []
    for _ in range(iterations):
        loss, free.grad = loss_and_gradient(free)
        losses.append(loss)
        optimiser.step()
        schedule.step()
    loss_after, _ = loss_and_gradient(free)
    return TrainingReport(
        weights=blend_weights(free.detach()).numpy().astype(np.float32),
        loss_before=losses[0] if losses else loss_after,
        loss_after=loss_after,
        iterations=iterations,
        seconds=time.perf_counter() - start,
        examples=examples,
    )


def train_mask_weights(
    segmenter: OneShotSegmenter,
    label_ref: LabelReference,
    pairs: list[tuple[ImageFeatures, np.ndarray]],
    iterations: int | None = None,
) -> TrainingReport:
    """Learn the label's PerSAM-F blend weights on ``pairs`` of (features, ``(H, W)`` bool mask).

    Each example is decoded once; the ``iterations`` (default ``config.persam_f_iterations``)
    AdamW steps run on the cached logits, with the loss's gradient in closed form
    (:class:`_CachedExample`). ``seconds`` includes the decoding.
    """
    _check_pairs(pairs)
    start = time.perf_counter()
    target_embedding = label_ref.sam_target_embedding()
    cached = []
    for features, mask in pairs:
        prompt = example_prompt(segmenter, label_ref, features)
        logits = example_logits(segmenter, target_embedding, features, prompt, mask.shape)
        cached.append(_CachedExample(logits, mask))

    pool = ThreadPoolExecutor(LOSS_THREADS) if torch.get_num_threads() > 1 else None

    def loss_and_gradient(free: torch.Tensor) -> tuple[float, torch.Tensor]:
        weights = blend_weights(free.detach())
        loss, gradient = 0.0, torch.zeros(3)
        for example in cached:
            example_loss, example_gradient = example.loss_and_gradient(weights, pool)
            loss, gradient = loss + example_loss, gradient + example_gradient
        # mean over examples, then through weights = (1 - w1 - w2, w1, w2)
        loss, gradient = loss / len(cached), gradient / len(cached)
        return loss, gradient[1:] - gradient[0]

    iterations = segmenter.config.persam_f_iterations if iterations is None else iterations
    # The loop runs on host tensors in float32 whatever autocast the caller runs under.
    try:
        with _one_intra_op_thread(), torch.autocast("cpu", enabled=False):
            report = _optimise(segmenter, loss_and_gradient, iterations, len(pairs))
    finally:
        if pool is not None:
            pool.shutdown()
    report.seconds = time.perf_counter() - start
    return report


def train_mask_weights_reference(
    segmenter: OneShotSegmenter,
    label_ref: LabelReference,
    pairs: list[tuple[ImageFeatures, np.ndarray]],
    iterations: int | None = None,
) -> TrainingReport:
    """The published loop: decode every example again in every iteration, autograd loss (slow).

    Only for tests and ``bench/`` to show that :func:`train_mask_weights` learns the same weights.
    """
    _check_pairs(pairs)
    target_embedding = label_ref.sam_target_embedding()
    targets = [_Target.of(mask) for _, mask in pairs]
    prompts = [example_prompt(segmenter, label_ref, f) for f, _ in pairs]

    def loss_and_gradient(free: torch.Tensor) -> tuple[float, torch.Tensor]:
        with torch.inference_mode(False), torch.enable_grad():
            free = free.detach().requires_grad_(True)
            weights = blend_weights(free)
            losses = []
            for (features, mask), prompt, target in zip(pairs, prompts, targets, strict=True):
                logits = example_logits(segmenter, target_embedding, features, prompt, mask.shape)
                losses.append(target.loss(logits, weights))
            loss = torch.stack(losses).mean()
            loss.backward()
        return float(loss.detach()), free.grad

    iterations = segmenter.config.persam_f_iterations if iterations is None else iterations
    bypass = getattr(segmenter.decoder, "bypass", contextlib.nullcontext)  # no decoder memo
    with bypass():
        return _optimise(segmenter, loss_and_gradient, iterations, len(pairs))
