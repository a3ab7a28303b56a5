"""SAM choices and encoder runtimes: parameters, checkpoint size, CPU seconds per image in PyTorch
eager and the accelerated runtimes (ONNX Runtime fp32 / int8, OpenVINO fp32 / bf16), and each
runtime's accuracy against PyTorch fp32 (and the bfloat16 decoder's against the float32 one).

Real-size architectures with random weights (a forward pass costs the same whatever the weights);
each random state dict is saved once into ``--model-dir`` and loaded through ``models.py`` like a
real checkpoint, and the ONNX export is built from it by ``matcher_core.runtime`` as in production.

Accuracy, per SAM type and runtime: relative L2 error and max abs error of the image embedding,
and the IoU of the masks SAM's decoder gives on the two embeddings (16 random point prompts,
3 multimask outputs each, thresholded at 0; IoU of the union over all 48 masks and the minimum
per mask).

    OMP_NUM_THREADS=2 python bench/runtime_speed.py --sam mobile_sam vit_b
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from matcher_core import SegmenterConfig  # noqa: E402
from matcher_core import runtime as rt  # noqa: E402
from matcher_core.features import PatchEncoder, SamImageEncoder  # noqa: E402
from matcher_core.imageio import load_image  # noqa: E402
from matcher_core.models import (  # noqa: E402
    load_encoder,
    load_sam,
    model_dir,
    resolve_sam_checkpoint,
)
from matcher_core.sam_decoder import SamDecoder  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "oneshot_seg_real"


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def mask_agreement(
    decoder: SamDecoder, a: torch.Tensor, b: torch.Tensor, other: SamDecoder | None = None
) -> tuple[float, float]:
    """Masks of embedding ``a`` by ``decoder`` against those of ``b`` by ``other`` (default the
    same decoder)."""
    g = torch.Generator().manual_seed(0)
    coords = torch.rand(16, 1, 2, generator=g) * decoder.img_size * 0.6
    labels = torch.ones(16, 1, dtype=torch.int64)
    ma = decoder.decode(a, coords, labels, None, multimask=True).low_res_logits > 0
    mb = (other or decoder).decode(b, coords, labels, None, multimask=True).low_res_logits > 0
    union = (ma | mb).flatten(1).sum(1).clamp(min=1)
    per_mask = (ma & mb).flatten(1).sum(1) / union
    total = float((ma & mb).sum() / (ma | mb).sum().clamp(min=1))
    return total, float(per_mask.min())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sam", nargs="+", default=["mobile_sam", "vit_b"])
    parser.add_argument("--encoder", default="vit_small_patch14_dinov2.lvd142m")
    parser.add_argument("--encoder-input-size", type=int, default=518)
    parser.add_argument("--runtimes", nargs="+", default=["onnx", "onnx_int8"])
    parser.add_argument("--image", default=str(DATA / "davis2016_val/blackswan/00005.jpg"))
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--model-dir", default="/tmp/bench-models")
    args = parser.parse_args()
    image = load_image(args.image)
    start_load = os.getloadavg()[0]
    print(
        f"# runtime_speed: image {image.shape[1]}x{image.shape[0]}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, load average {start_load:.2f} at start\n"
    )
    rows, accuracy = [], []
    for sam_type in args.sam:
        config = SegmenterConfig(
            sam_type=sam_type, random_weights=True, model_dir=args.model_dir, device="cpu"
        )
        sam = load_sam(config)
        checkpoint = resolve_sam_checkpoint(config)
        params = sum(p.numel() for p in sam.image_encoder.parameters()) / 1e6
        size = checkpoint.stat().st_size / 2**20
        encoder = SamImageEncoder(sam)
        encoder(image)  # warm-up
        eager = best_of(lambda encoder=encoder: encoder(image), args.repeats)
        reference, _ = encoder(image)
        decoder = SamDecoder(sam)
        bf16_iou, bf16_min = mask_agreement(
            decoder, reference, reference, SamDecoder(sam, "bfloat16")
        )
        accuracy.append((sam_type, "decoder bfloat16", 0.0, 0.0, bf16_iou, bf16_min))
        row = {"model": f"SAM {sam_type}", "params": params, "size": size, "torch": eager}
        identity = f"{sam_type}:{rt.checkpoint_identity(checkpoint, sam_type)}"
        torch_encoder = sam.image_encoder
        for runtime in args.runtimes:
            sam.image_encoder = torch_encoder
            rt.accelerate_sam(sam, model_dir(config), identity, runtime)
            encoder = SamImageEncoder(sam)
            encoder(image)  # warm-up (session initialisation)
            row[runtime] = best_of(lambda encoder=encoder: encoder(image), args.repeats)
            embedding, _ = encoder(image)
            rel = float((embedding - reference).norm() / reference.norm())
            worst = float((embedding - reference).abs().max())
            iou, iou_min = mask_agreement(decoder, reference, embedding)
            accuracy.append((sam_type, runtime, rel, worst, iou, iou_min))
        rows.append(row)

    config = SegmenterConfig(
        encoder=args.encoder,
        encoder_input_size=args.encoder_input_size,
        random_weights=True,
        model_dir=args.model_dir,
        device="cpu",
    )
    patch = PatchEncoder(load_encoder(config), args.encoder_input_size)
    patch(image)
    row = {
        "model": f"{args.encoder} @{args.encoder_input_size}",
        "params": sum(p.numel() for p in patch.model.parameters()) / 1e6,
        "size": float("nan"),
        "torch": best_of(lambda: patch(image), args.repeats),
    }
    reference = patch(image)
    file = (
        model_dir(config)
        / f"random-encoder-{args.encoder}-{args.encoder_input_size}-seed{config.seed}.pth"
    )
    row["size"] = file.stat().st_size / 2**20
    torch_grid = patch.grid
    for runtime in args.runtimes:
        patch.grid = torch_grid
        identity = f"{args.encoder}:{rt.checkpoint_identity(file, args.encoder)}"
        rt.accelerate_patch_encoder(patch, model_dir(config), identity, runtime)
        patch(image)
        row[runtime] = best_of(lambda: patch(image), args.repeats)
        features = patch(image)
        rel = float((features - reference).norm() / reference.norm())
        cos = float((features * reference).sum(-1).min())
        accuracy.append(
            (
                args.encoder,
                runtime,
                rel,
                float((features - reference).abs().max()),
                cos,
                float("nan"),
            )
        )
    rows.append(row)

    names = " | ".join(args.runtimes)
    ratios = " | ".join(f"torch / {r}" for r in args.runtimes)
    print(f"| model | parameters (M) | checkpoint (MiB) | torch s | {names} s | {ratios} |")
    print("|---|---:|---:|---:|" + "---:|" * (2 * len(args.runtimes)))
    for row in rows:
        times = " | ".join(f"{row[r]:.2f}" for r in args.runtimes)
        speedups = " | ".join(f"{row['torch'] / row[r]:.2f}x" for r in args.runtimes)
        print(
            f"| {row['model']} | {row['params']:.1f} | {row['size']:.0f} | {row['torch']:.2f} | "
            f"{times} | {speedups} |"
        )
    print(
        "\n| model | runtime | embedding rel. L2 error | max abs error | "
        "mask IoU (all) / min cosine (DINOv2) | min per-mask IoU |"
    )
    print("|---|---|---:|---:|---:|---:|")
    for name, runtime, rel, worst, iou, iou_min in accuracy:
        print(f"| {name} | {runtime} | {rel:.2e} | {worst:.2e} | {iou:.4f} | {iou_min:.4f} |")
    print(f"\nload average {start_load:.2f} at start, {os.getloadavg()[0]:.2f} at end")


if __name__ == "__main__":
    main()
