"""PerSAM-F training speed: decode once and train on cached logits vs decode in every iteration.

Random SAM ``vit_b`` (real size, random weights: timings are real, masks are not), one real image
and mask from the shared data set. The decode-every-iteration loop (the published method's) is
timed on ``--reference-iterations`` iterations and extrapolated to ``--iterations`` when fewer;
both loops are also run for the same number of iterations to compare the learned weights. The
CPU may be shared, so each timing is the best of ``--repeats`` runs.

    OMP_NUM_THREADS=2 python bench/persam_f_speed.py [--image X.jpg --mask X.png]

The random ``vit_b`` state dict (~370 MB) is saved once under ``--model-dir`` (never commit it).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matcher_core import Example, OneShotSegmenter, SegmenterConfig, persam_f  # noqa: E402
from matcher_core.imageio import load_image, load_label_mask  # noqa: E402

DATA = Path("/work/shared/data/oneshot_seg_real")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image", default=str(DATA / "davis2016_val/dog/00000.jpg"))
    parser.add_argument("--mask", default=None, help="default: the image's .png")
    parser.add_argument("--iterations", type=int, default=1000)
    parser.add_argument("--reference-iterations", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--model-dir", default="/tmp/bench-models")
    args = parser.parse_args()

    config = SegmenterConfig(
        mode="persam",
        sam_type="vit_b",
        random_weights=True,
        encoder="tiny",
        encoder_input_size=112,
        model_dir=args.model_dir,
        device="cpu",
        decoder_memo_bytes=0,  # both loops decode as they would the first time
    )
    image = load_image(args.image)
    mask = load_label_mask(args.mask or str(Path(args.image).with_suffix(".png"))) > 0
    load_start = os.getloadavg()
    print(f"image {args.image} {image.shape[1]}x{image.shape[0]}, mask {mask.mean():.1%} of it")
    print(
        f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
        f"load average at start {load_start[0]:.2f} (1 min) on {os.cpu_count()} CPUs"
    )

    segmenter = OneShotSegmenter(config)
    started = time.perf_counter()
    reference = segmenter.build_reference([Example(image, {"object": [mask]})])
    encode_seconds = time.perf_counter() - started
    label = reference.labels["object"]
    pairs = [(segmenter.features(image), mask)]  # cached: no second encoder pass

    # Warm up both paths (allocator, kernels) so neither pays first-call costs.
    persam_f.train_mask_weights(segmenter, label, pairs, iterations=2)
    persam_f.train_mask_weights_reference(segmenter, label, pairs, iterations=2)

    # Other processes share the CPU: every timing is the best of --repeats runs.
    k = min(args.reference_iterations, args.iterations)
    slow_runs = [
        persam_f.train_mask_weights_reference(segmenter, label, pairs, iterations=k)
        for _ in range(args.repeats)
    ]
    fast_k = persam_f.train_mask_weights(segmenter, label, pairs, iterations=k)
    fast_runs = [
        persam_f.train_mask_weights(segmenter, label, pairs, iterations=args.iterations)
        for _ in range(args.repeats)
    ]
    slow = min(slow_runs, key=lambda r: r.seconds)
    fast = min(fast_runs, key=lambda r: r.seconds)

    slow_full = slow.seconds / k * args.iterations
    extrapolated = k < args.iterations
    difference = float(np.abs(fast_k.weights - slow.weights).max())
    spread = max(r.seconds for r in fast_runs) / fast.seconds

    print(f"\nSAM vit_b encoder (once, for the reference and the example): {encode_seconds:.1f} s")
    print(f"\nbest of {args.repeats} runs each")
    print(f"\n| loop | iterations run | seconds | ms / iteration | seconds for {args.iterations} |")
    print("|---|---:|---:|---:|---:|")
    note = " (extrapolated)" if extrapolated else ""
    print(
        f"| decode every iteration (published) | {k} | {slow.seconds:.2f} | "
        f"{1000 * slow.seconds / k:.1f} | {slow_full:.1f}{note} |"
    )
    print(
        f"| decode once + cached logits (ours) | {args.iterations} | {fast.seconds:.2f} | "
        f"{1000 * fast.seconds / args.iterations:.2f} | {fast.seconds:.2f} |"
    )
    print(
        f"\nspeed ratio for {args.iterations} iterations (this run): "
        f"{slow_full / fast.seconds:.0f}x"
        + (f" (published loop extrapolated from {k} iterations)" if extrapolated else "")
    )
    print(f"slowest / fastest of the {args.repeats} cached-logits runs: {spread:.2f}")
    print(f"max |weights difference| after {k} iterations, both loops: {difference:.2e}")
    print(f"  published loop weights: {np.array2string(slow.weights, precision=6)}")
    print(f"  cached-logits weights:  {np.array2string(fast_k.weights, precision=6)}")
    print(
        f"{args.iterations} iterations, cached logits: weights "
        f"{np.array2string(fast.weights, precision=4)}, loss {fast.loss_before:.4f} -> "
        f"{fast.loss_after:.4f}"
    )
    load_end = os.getloadavg()
    print(f"load average at end {load_end[0]:.2f} (1 min), {load_end[1]:.2f} (5 min)")


if __name__ == "__main__":
    main()
