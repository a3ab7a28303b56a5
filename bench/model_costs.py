"""What each model choice costs: parameters, checkpoint size, memory and encoder seconds per image.

Random weights with the real architectures (no downloads here); a forward pass costs the same
whatever the weight values. Checkpoint size = float32 state dict (what the official files hold).

    python bench/model_costs.py                       # all SAM types and DINOv2 S/B/L
    python bench/model_costs.py --sam vit_b --encoders vit_small_patch14_dinov2.lvd142m
"""

from __future__ import annotations

import argparse
import gc
import resource
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matcher_core import SegmenterConfig  # noqa: E402
from matcher_core.features import PatchEncoder, SamImageEncoder  # noqa: E402
from matcher_core.models import load_encoder, load_sam  # noqa: E402


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def sizes(model: torch.nn.Module) -> tuple[float, float]:
    params = sum(p.numel() for p in model.parameters())
    state_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    return params / 1e6, state_bytes / 2**20


def timed(encode, image: np.ndarray, repeats: int) -> float:
    """Mean seconds of ``encode(image)`` after one warm-up call."""
    with torch.inference_mode():
        encode(image)
        start = time.perf_counter()
        for _ in range(repeats):
            encode(image)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sam", nargs="+", default=["vit_b", "vit_l", "vit_h"])
    parser.add_argument(
        "--encoders",
        nargs="+",
        default=[
            "vit_small_patch14_dinov2.lvd142m",
            "vit_base_patch14_dinov2.lvd142m",
            "vit_large_patch14_dinov2.lvd142m",
        ],
    )
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--model-dir", default="/tmp/bench-models")
    args = parser.parse_args()
    image = np.random.default_rng(0).integers(0, 255, (480, 854, 3), dtype=np.uint8)
    print(
        f"# model costs on {torch.get_num_threads()} CPU threads, 854x480 image, "
        f"torch {torch.__version__}\n"
    )
    print("| model | parameters (M) | checkpoint (MiB) | seconds / image | peak RSS after (MiB) |")
    print("|---|---:|---:|---:|---:|")
    for sam_type in args.sam:
        config = SegmenterConfig(
            sam_type=sam_type, random_weights=True, model_dir=args.model_dir, device="cpu"
        )
        sam = load_sam(config)
        encoder = SamImageEncoder(sam)
        params, mib = sizes(sam)
        seconds = timed(encoder, image, args.repeats)
        print(
            f"| SAM {sam_type} (image encoder) | {params:.0f} | {mib:.0f} | {seconds:.1f} | "
            f"{peak_rss_mib():.0f} |",
            flush=True,
        )
        del sam, encoder
        gc.collect()
    for name in args.encoders:
        config = SegmenterConfig(
            encoder=name, random_weights=True, model_dir=args.model_dir, device="cpu"
        )
        model = load_encoder(config)
        encoder = PatchEncoder(model, config.encoder_input_size)
        params, mib = sizes(model)
        seconds = timed(encoder, image, args.repeats)
        print(
            f"| {name} @{config.encoder_input_size} | {params:.0f} | {mib:.0f} | {seconds:.1f} | "
            f"{peak_rss_mib():.0f} |",
            flush=True,
        )
        del model, encoder
        gc.collect()


if __name__ == "__main__":
    main()
