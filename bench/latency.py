"""Per-target latency of the engine, split by stage, cold and warm cache, Matcher vs PerSAM.

Real-size architectures with random weights (no weights can be downloaded here): the speed of a
network does not depend on its weight values, except where a pipeline's control flow does (how
many instances PerSAM looks for, how many proposals survive filtering) - those counts are printed.

    python bench/latency.py                      # SAM vit_b + DINOv2-S (CPU defaults)
    python bench/latency.py --encoder vit_large_patch14_dinov2.lvd142m
    python bench/latency.py --sam-type tiny --encoder tiny --encoder-input-size 112   # smoke
    python bench/latency.py --sam-type mobile_sam --runtime onnx   # the light CPU choice

Every ratio printed is measured within this one run.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from labelstudio.brush import mask_to_rle  # noqa: E402
from matcher_core import Example, OneShotSegmenter, SegmenterConfig  # noqa: E402
from matcher_core.config import DECODER_PRECISIONS, ENCODER_RUNTIMES  # noqa: E402
from matcher_core.imageio import load_image, load_label_mask  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "oneshot_seg_real"
STAGES = ["encoder_sam", "encoder_patch", "matching", "prompts", "decoding", "scoring", "rle"]


def load_pair(folder: Path, index: int) -> tuple[np.ndarray, np.ndarray]:
    image_path = sorted(folder.glob("*.jpg"))[index]
    return load_image(image_path), load_label_mask(image_path.with_suffix(".png")) > 0


def brush_results(instances, size) -> None:
    """Encode the instances as Label Studio brush RLE (what /predict returns)."""
    for instance in instances:
        mask_to_rle(instance.mask)


def synchronize(segmenter: OneShotSegmenter) -> None:
    if segmenter.device.type == "cuda":
        torch.cuda.synchronize(segmenter.device)


def run_once(segmenter: OneShotSegmenter, reference, image: np.ndarray) -> tuple[dict, int]:
    synchronize(segmenter)
    segmenter.timings.clear()
    decoded_before = segmenter.decoder.prompt_sets_decoded
    start = time.perf_counter()
    instances = segmenter.segment(reference, image)
    with segmenter.timed("rle"):
        brush_results(instances, image.shape[:2])
    synchronize(segmenter)
    timings = dict(segmenter.timings)
    timings["total"] = time.perf_counter() - start
    timings["prompt_sets"] = segmenter.decoder.prompt_sets_decoded - decoded_before
    return timings, len(instances)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sam-type", default="vit_b")
    parser.add_argument("--encoder", default="vit_small_patch14_dinov2.lvd142m")
    parser.add_argument("--encoder-input-size", type=int, default=518)
    parser.add_argument("--folder", default=str(DATA / "davis2016_val" / "blackswan"))
    parser.add_argument("--targets", type=int, default=2, help="target images timed per mode")
    parser.add_argument("--model-dir", default="/tmp/bench-models")
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--runtime", default="torch", choices=ENCODER_RUNTIMES, help="encoder runtime (CPU)"
    )
    parser.add_argument("--decoder-precision", default="float32", choices=DECODER_PRECISIONS)
    parser.add_argument(
        "--autocast", default=None, help="CUDA autocast dtype for the whole call: bf16 | fp16"
    )
    parser.add_argument(
        "--configs",
        nargs="+",
        default=["fast", "fast-persam"],
        help="fast / fast-persam (the product's defaults in Matcher / PerSAM mode), "
        "fast-persam-decoding (absence test off) or a published preset (fss, coco, lvis, part, "
        "persam, persam_f)",
    )
    args = parser.parse_args()

    base = SegmenterConfig(
        sam_type=args.sam_type,
        encoder=args.encoder,
        encoder_input_size=args.encoder_input_size,
        random_weights=True,
        model_dir=args.model_dir,
        device=args.device,
        encoder_runtime=args.runtime,
        decoder_precision=args.decoder_precision,
    )
    folder = Path(args.folder)
    ref_image, ref_mask = load_pair(folder, 0)
    targets = [load_pair(folder, i + 1)[0] for i in range(args.targets)]

    print(
        f"# latency: SAM {args.sam_type}, encoder {args.encoder}@{args.encoder_input_size}, "
        f"runtime {args.runtime}, decoder {args.decoder_precision}, autocast {args.autocast}, "
        f"random weights, device {args.device}, torch {torch.__version__}, "
        f"load average {os.getloadavg()[0]:.2f} at start, "
        f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"image {targets[0].shape[1]}x{targets[0].shape[0]}\n"
    )
    rows = []
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16}
    autocast = (
        torch.autocast(torch.device(args.device).type, dtype=dtypes[args.autocast])
        if args.autocast
        else contextlib.nullcontext()
    )
    with autocast:
        rows = measure(args, base, ref_image, ref_mask, targets)
    print_table(rows)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    gpu = ""
    if torch.cuda.is_available() and torch.device(args.device).type == "cuda":
        gpu = f"; peak GPU memory {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB"
    print(
        f"\nraw SAM encoder forward: {rows[0][4]:.2f} s; peak RSS {peak:.0f} MiB{gpu}; "
        f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}; "
        f"load average {os.getloadavg()[0]:.2f} at end"
    )


def config_named(base: SegmenterConfig, name: str) -> SegmenterConfig:
    """``fast-persam``: the product's PerSAM mode; ``fast-persam-decoding``: the same with the
    absence test off, so that random weights still decode (they fail the test and decode
    nothing); else a preset."""
    if name == "fast-persam":
        return base.replace(mode="persam")
    if name == "fast-persam-decoding":
        return base.replace(mode="persam", absence_test=False)
    return base.with_preset(name)


def measure(args, base, ref_image, ref_mask, targets) -> list:
    rows = []
    for mode in args.configs:
        config = config_named(base, mode)
        segmenter = OneShotSegmenter(config)
        reference = segmenter.build_reference([Example(ref_image, {"object": [ref_mask]})])
        # Process warm-up (first-call allocations and kernel selection happen once per server
        # process, not per request): segment the reference image itself once, untimed.
        segmenter.segment(reference, ref_image)
        # Raw SAM encoder forward on the same image, measured here, as the yardstick.
        start = time.perf_counter()
        segmenter.sam_encoder(targets[0])
        synchronize(segmenter)
        raw_sam = time.perf_counter() - start
        for k, image in enumerate(targets):
            segmenter.cache.clear()
            cold, count = run_once(segmenter, reference, image)
            warm, _ = run_once(segmenter, reference, image)
            encoders = cold.get("encoder_sam", 0) + cold.get("encoder_patch", 0)
            rows.append((mode, k, cold, warm, raw_sam, encoders, count))
        del segmenter
    return rows


def print_table(rows) -> None:
    header = (
        "| mode | target | cache | "
        + " | ".join(STAGES)
        + " | total s | total / SAM enc | total / both enc | decoder prompt sets | instances |"
    )
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for mode, k, cold, warm, raw_sam, encoders, count in rows:
        for name, t in (("cold", cold), ("warm", warm)):
            stages = " | ".join(f"{t.get(s, 0.0):.3f}" for s in STAGES)
            print(
                f"| {mode} | {k} | {name} | {stages} | {t['total']:.2f} | "
                f"{t['total'] / raw_sam:.3f} | {t['total'] / encoders:.3f} | "
                f"{t['prompt_sets']} | {count} |"
            )


if __name__ == "__main__":
    main()
