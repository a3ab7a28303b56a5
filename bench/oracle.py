"""The Matcher pipeline below SAM, measured on real features with an oracle in SAM's place.

No SAM weights exist here, but every other stage can be measured on real photographs: the real
``tf_efficientnet_lite0`` features of ``oneshot_seg_real`` drive the real matching, prompt
sampling, proposal filtering, scoring and merging code, and an *oracle segmenter* answers each
prompt set the way an ideal SAM would:

* the ground-truth instance under the positive points (the union when they fall on several);
* when they fall on none, a background region around the first point (a colour flood fill
  within a window, a stand-in for the superpixel-like part SAM returns for a click on clutter).

Its predicted IoU is 0.95 for an instance and 0.9 for background (both above the presets' IoU
filters: the oracle does not tell the pipeline which is which). So the figures here are an upper
bound set by SAM's quality and a fair comparison of everything the engine decides.

Targets (per folder, the first image is the reference):

* *present*: the folder's other images (one instance each): mask mIoU with the FSS protocol
  (per folder, intersections over unions summed, then the mean over folders);
* *multi*: composites, the reference's object cut from a later image of its folder and pasted
  2 or 3 times (no overlap) on a frame of another folder: instance recall and precision (IoU > 0.5);
* *absent*: frames of other folders: the fraction with any output (false positives).

With ``--shots 1 2 4 8`` the reference holds that many images of the folder (the corrections an
annotator made, added as shots the way learning adds them); targets are the images after them.

    python bench/oracle.py                       # fast default vs the fss and part presets
    python bench/oracle.py --configs fast fss --shots 1 2 4 8
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from realdata import DEFAULT_DATA, SUBSETS, real_encoder, real_feature_config  # noqa: E402

from matcher_core.config import SegmenterConfig  # noqa: E402
from matcher_core.features import ImageFeatures, pool_mask_to_grid  # noqa: E402
from matcher_core.imageio import load_image, load_label_mask  # noqa: E402
from matcher_core.matcher import segment_label  # noqa: E402
from matcher_core.reference import LabelReference, Shot  # noqa: E402
from matcher_core.sam_decoder import DecoderOutput  # noqa: E402

IMG_SIZE, LOW_RES, EMBEDDING = 1024, 256, 64
INSTANCE_IOU, BACKGROUND_IOU = 0.95, 0.9
FLOOD_WINDOW = 6
"""The background region lies within a window of 1/6 of the image's sides around the point."""


class OracleDecoder:
    """A :class:`matcher_core.proposals.PromptableSegmenter` that knows the target's instances."""

    img_size = IMG_SIZE
    mask_threshold = 0.0
    embedding_size = (EMBEDDING, EMBEDDING)

    def __init__(self, image: np.ndarray, instances: list[np.ndarray]):
        self.original_size = image.shape[:2]
        height, width = self.original_size
        scale = IMG_SIZE / max(height, width)
        self.input_size = (int(height * scale + 0.5), int(width * scale + 0.5))
        self.image = image
        self.instances = instances
        self.labels = np.zeros(self.original_size, np.int32)
        for index, mask in enumerate(instances, start=1):
            self.labels[mask] = index
        self._low_res: dict[tuple, tuple[torch.Tensor, float]] = {}

    def to_input_coords(self, xy: np.ndarray, original_size: tuple[int, int]) -> np.ndarray:
        height, width = original_size
        scale = IMG_SIZE / max(height, width)
        return (np.asarray(xy, np.float32) * scale).astype(np.float32)

    def _to_low_res(self, mask: np.ndarray) -> torch.Tensor:
        """``(H, W)`` bool to ``(L, L)`` logits of the padded square (SAM's low-res frame)."""
        crop_h = max(1, round(self.input_size[0] * LOW_RES / IMG_SIZE))
        crop_w = max(1, round(self.input_size[1] * LOW_RES / IMG_SIZE))
        low = cv2.resize(mask.astype(np.float32), (crop_w, crop_h), interpolation=cv2.INTER_AREA)
        logits = torch.full((LOW_RES, LOW_RES), -8.0)
        logits[:crop_h, :crop_w] = torch.from_numpy(np.where(low >= 0.5, 8.0, -8.0))
        return logits

    def _background_region(self, x: int, y: int) -> np.ndarray:
        """Pixels of similar colour connected to ``(x, y)`` within the window, objects excluded."""
        height, width = self.original_size
        wy, wx = max(1, height // FLOOD_WINDOW), max(1, width // FLOOD_WINDOW)
        y0, y1, x0, x1 = (
            max(0, y - wy),
            min(height, y + wy + 1),
            max(0, x - wx),
            min(width, x + wx + 1),
        )
        flood = np.zeros((y1 - y0 + 2, x1 - x0 + 2), np.uint8)
        flood[1:-1, 1:-1] = self.labels[y0:y1, x0:x1] > 0  # never into an object
        flood[y - y0 + 1, x - x0 + 1] = 0
        cv2.floodFill(
            np.ascontiguousarray(self.image[y0:y1, x0:x1]),
            flood,
            (x - x0, y - y0),
            0,
            (12, 12, 12),
            (12, 12, 12),
            cv2.FLOODFILL_FIXED_RANGE | cv2.FLOODFILL_MASK_ONLY | (2 << 8),
        )
        region = np.zeros(self.original_size, bool)
        region[y0:y1, x0:x1] = flood[1:-1, 1:-1] == 2
        return region

    def answer(self, xy: np.ndarray) -> tuple[torch.Tensor, float]:
        """The oracle's low-res logits for positive points ``(n, 2)`` (original pixels)."""
        height, width = self.original_size
        cols = np.clip(xy[:, 0].astype(int), 0, width - 1)
        rows = np.clip(xy[:, 1].astype(int), 0, height - 1)
        hit = tuple(sorted(set(self.labels[rows, cols].tolist()) - {0}))
        key = hit or ("background", int(cols[0]), int(rows[0]))
        if key not in self._low_res:
            if hit:
                mask, iou = np.isin(self.labels, hit), INSTANCE_IOU
            else:
                mask, iou = self._background_region(int(cols[0]), int(rows[0])), BACKGROUND_IOU
            self._low_res[key] = (self._to_low_res(mask), iou)
        return self._low_res[key]

    def decode(self, embedding, point_coords=None, point_labels=None, boxes=None, multimask=True):
        count = 3 if multimask else 1
        scale = max(self.original_size) / IMG_SIZE
        logits = torch.empty(len(point_coords), count, LOW_RES, LOW_RES)
        ious = torch.empty(len(point_coords), count)
        for b, (points, labels) in enumerate(zip(point_coords, point_labels, strict=True)):
            positive = points[labels == 1].numpy() * scale
            logits[b], ious[b] = self.answer(positive)
        return DecoderOutput(logits, ious)

    def upscale(self, low_res_logits, input_size, original_size):
        x = F.interpolate(low_res_logits, (IMG_SIZE, IMG_SIZE), mode="bilinear")
        x = x[..., : input_size[0], : input_size[1]]
        return F.interpolate(x, original_size, mode="bilinear")


class Host:
    """What ``segment_label`` needs of a segmenter."""

    def __init__(self, config: SegmenterConfig, decoder: OracleDecoder):
        self.config, self.decoder = config, decoder

    def timed(self, stage):
        from contextlib import nullcontext

        return nullcontext()


@dataclass
class Target:
    image: np.ndarray
    features: torch.Tensor
    instances: list[np.ndarray]
    kind: str
    folder: str


def composite(
    source: np.ndarray, mask: np.ndarray, frame: np.ndarray, copies: int, rng
) -> tuple[np.ndarray, list[np.ndarray]]:
    """``copies`` non-overlapping pastes of the masked object (scaled to fit) on ``frame``."""
    ys, xs = np.nonzero(mask)
    crop = source[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    crop_mask = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    height, width = frame.shape[:2]
    scale = min(1.0, 0.4 * height / crop.shape[0], (0.9 * width / copies) / crop.shape[1])
    size = (max(8, int(crop.shape[1] * scale)), max(8, int(crop.shape[0] * scale)))
    crop = cv2.resize(crop, size, interpolation=cv2.INTER_AREA)
    crop_mask = cv2.resize(crop_mask.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST) > 0
    out, taken, instances = frame.copy(), np.zeros((height, width), bool), []
    for _ in range(50):
        if len(instances) == copies:
            break
        y = int(rng.integers(0, height - size[1] + 1))
        x = int(rng.integers(0, width - size[0] + 1))
        placed = np.zeros((height, width), bool)
        placed[y : y + size[1], x : x + size[0]] = crop_mask
        if (placed & ndimage.binary_dilation(taken, iterations=4)).any():
            continue
        out[placed] = crop[crop_mask]
        taken |= placed
        instances.append(placed)
    return out, instances


def load_folders(
    data: Path, limit: int | None
) -> list[tuple[str, list[tuple[np.ndarray, np.ndarray]]]]:
    folders = []
    for subset_dir in SUBSETS:
        for directory in sorted(p for p in (data / subset_dir).iterdir() if p.is_dir()):
            pairs = [
                (load_image(path), load_label_mask(path.with_suffix(".png")) > 0)
                for path in sorted(directory.glob("*.jpg"))[:limit]
            ]
            folders.append((directory.name, pairs))
    return folders


def shot(features: torch.Tensor, mask: np.ndarray) -> Shot:
    return Shot(
        patch_features=features.numpy().astype(np.float16),
        patch_mask=pool_mask_to_grid(mask, tuple(features.shape[:2])).numpy(),
        sam_target_embedding=np.zeros(1, np.float32),
    )


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = (a | b).sum()
    return float((a & b).sum() / union) if union else 1.0


def predicted_instances(instances, config: SegmenterConfig) -> list[np.ndarray]:
    """Instances as masks; Matcher's union is split into its connected parts to count them."""
    if config.output == "union":
        if not instances:
            return []
        labelled, count = ndimage.label(instances[0].mask)
        return [labelled == i for i in range(1, count + 1) if (labelled == i).sum() >= 64]
    return [i.mask for i in instances]


def evaluate(config: SegmenterConfig, references, targets) -> dict[str, float]:
    per_folder: dict[str, list[float]] = {}
    found = truths = predicted = correct = absent_hits = absent = 0
    start = time.perf_counter()
    for target in targets:
        label_ref = references[target.folder]
        grid = tuple(target.features.shape[:2])
        height, width = target.image.shape[:2]
        scale = IMG_SIZE / max(height, width)
        features = ImageFeatures(
            original_size=(height, width),
            input_size=(int(height * scale + 0.5), int(width * scale + 0.5)),
            sam_embedding=torch.zeros(1, EMBEDDING, EMBEDDING),
            patch_features=target.features,
        )
        assert features.patch_features.shape[:2] == grid
        result = segment_label(
            Host(config, OracleDecoder(target.image, target.instances)), features, label_ref
        )
        masks = predicted_instances(result, config)
        if target.kind == "absent":
            absent += 1
            absent_hits += bool(masks)
            continue
        union = np.any(masks, axis=0) if masks else np.zeros((height, width), bool)
        truth = np.any(target.instances, axis=0)
        if target.kind == "present":
            inter_union = per_folder.setdefault(target.folder, [0.0, 0.0])
            inter_union[0] += float((union & truth).sum())
            inter_union[1] += float((union | truth).sum())
            continue
        truths += len(target.instances)
        predicted += len(masks)
        found += sum(any(iou(m, t) > 0.5 for m in masks) for t in target.instances)
        correct += sum(any(iou(m, t) > 0.5 for t in target.instances) for m in masks)
    return {
        "miou": float(np.mean([i / u for i, u in per_folder.values()])) if per_folder else 0.0,
        "recall": found / truths if truths else 0.0,
        "precision": correct / predicted if predicted else 0.0,
        "absent_fp": absent_hits / absent if absent else 0.0,
        "seconds": time.perf_counter() - start,
        "targets": len(targets),
    }


CONFIGS = {
    "fast": lambda: SegmenterConfig(),
    "fss": lambda: SegmenterConfig().with_preset("fss"),
    "part": lambda: SegmenterConfig().with_preset("part"),
    "coco": lambda: SegmenterConfig().with_preset("coco"),
    "fss+absence": lambda: SegmenterConfig().with_preset("fss").replace(absence_test=True),
    "fast-no-absence": lambda: SegmenterConfig(absence_test=False),
    "fast-margin-0.1": lambda: SegmenterConfig(absence_margin=0.1),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--configs", nargs="+", default=["fast", "fss", "part"], choices=CONFIGS)
    parser.add_argument("--shots", nargs="+", type=int, default=[1])
    parser.add_argument("--images-per-folder", type=int, default=10)
    parser.add_argument("--input-size", type=int, default=448)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    rng = np.random.default_rng(args.seed)
    encoder = real_encoder(real_feature_config(args.input_size))
    folders = load_folders(args.data, args.images_per_folder)
    encoded = {name: [encoder(image) for image, _ in pairs] for name, pairs in folders}
    print(f"{len(folders)} folders, {sum(len(p) for _, p in folders)} images encoded")

    rows = []
    for shots in args.shots:
        references, targets = {}, []
        for index, (name, pairs) in enumerate(folders):
            if len(pairs) <= shots:
                continue
            references[name] = LabelReference(
                label=name, shots=[shot(encoded[name][i], pairs[i][1]) for i in range(shots)]
            )
            for i in range(shots, len(pairs)):
                targets.append(
                    Target(pairs[i][0], encoded[name][i], [pairs[i][1]], "present", name)
                )
            others = [f for j, f in enumerate(folders) if j != index]
            for copy, (_, other_pairs) in enumerate(others[index % 3 :: 9][:2]):
                source, mask = pairs[-1 - copy]
                image, instances = composite(source, mask, other_pairs[0][0], 2 + copy, rng)
                targets.append(Target(image, encoder(image), instances, "multi", name))
            for other_name, other_pairs in others[index % 4 :: 8][:3]:
                frame = other_pairs[1][0] if len(other_pairs) > 1 else other_pairs[0][0]
                features = encoder(frame) if len(other_pairs) <= 1 else encoded[other_name][1]
                targets.append(Target(frame, features, [], "absent", name))
        for name in args.configs:
            result = evaluate(CONFIGS[name](), references, targets)
            rows.append((name, shots, result))
            print(
                f"| {name} | {shots} | {result['miou']:.3f} | {result['recall']:.3f} | "
                f"{result['precision']:.3f} | {result['absent_fp']:.3f} | "
                f"{1000 * result['seconds'] / result['targets']:.0f} |",
                flush=True,
            )
    print()
    print(
        "| configuration | shots | present mIoU | multi recall | multi precision | absent FP | ms/target |"
    )
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for name, shots, result in rows:
        print(
            f"| {name} | {shots} | {result['miou']:.3f} | {result['recall']:.3f} | "
            f"{result['precision']:.3f} | {result['absent_fp']:.3f} | "
            f"{1000 * result['seconds'] / result['targets']:.0f} |"
        )


if __name__ == "__main__":
    main()
