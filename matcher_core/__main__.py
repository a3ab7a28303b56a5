"""Command line: ``python -m matcher_core segment|evaluate ...`` (no server needed)."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
from PIL import Image

from .config import DECODER_PRECISIONS, ENCODER_RUNTIMES, PRESETS, SegmenterConfig
from .datasets import IMAGE_SUFFIXES
from .imageio import ImageError, load_image, load_label_mask


def _add_model_arguments(parser: argparse.ArgumentParser) -> None:
    defaults = SegmenterConfig()
    group = parser.add_argument_group("models")
    group.add_argument("--mode", choices=["matcher", "persam"], default=defaults.mode)
    group.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="fast (default) or a published configuration: fss, coco, lvis, part, persam, persam_f",
    )
    group.add_argument(
        "--sam-type",
        default=defaults.sam_type,
        help="vit_h | vit_l | vit_b | mobile_sam | tiny | mobile_sam_tiny",
    )
    group.add_argument(
        "--encoder-runtime",
        choices=ENCODER_RUNTIMES,
        default=defaults.encoder_runtime,
        help="CPU runtime of the image encoders (onnx: ONNX Runtime, openvino: OpenVINO; "
        "exported once)",
    )
    group.add_argument(
        "--decoder-precision",
        choices=DECODER_PRECISIONS,
        default=defaults.decoder_precision,
        help="SAM's decoder in float32 or under bfloat16 autocast (faster on bf16 hardware)",
    )
    group.add_argument("--sam-checkpoint", help="SAM checkpoint file (default: official download)")
    group.add_argument(
        "--encoder", default=defaults.encoder, help="timm name, tf_efficientnet_lite0 or tiny"
    )
    group.add_argument("--encoder-checkpoint", help="local encoder weights")
    group.add_argument("--encoder-input-size", type=int, default=defaults.encoder_input_size)
    group.add_argument("--device", default=defaults.device, help="auto | cpu | cuda | cuda:N")
    group.add_argument("--model-dir", default=defaults.model_dir)
    group.add_argument(
        "--random-weights",
        action="store_true",
        help="small random models for smoke runs (outputs are meaningless)",
    )
    group.add_argument("--score-threshold", type=float, default=defaults.score_threshold)
    group.add_argument("--seed", type=int, default=defaults.seed)


def config_from_args(args: argparse.Namespace) -> SegmenterConfig:
    sam_type, encoder, size = args.sam_type, args.encoder, args.encoder_input_size
    if (
        args.random_weights
        and sam_type == SegmenterConfig.sam_type
        and encoder == SegmenterConfig.encoder
    ):
        sam_type, encoder, size = "tiny", "tiny", 112  # smoke runs default to the tiny models
    config = SegmenterConfig(
        mode=args.mode,
        sam_type=sam_type,
        sam_checkpoint=args.sam_checkpoint,
        encoder=encoder,
        encoder_checkpoint=args.encoder_checkpoint,
        encoder_input_size=size,
        device=args.device,
        encoder_runtime=args.encoder_runtime,
        decoder_precision=args.decoder_precision,
        model_dir=args.model_dir,
        random_weights=args.random_weights,
        score_threshold=args.score_threshold,
        seed=args.seed,
    )
    return config.with_preset(args.preset) if args.preset else config


def _folder_images(folder: Path) -> list[Path]:
    """The images of a folder, without the masks kept beside them: of files sharing a stem
    (``00000.jpg`` and its mask ``00000.png``), only the non-PNG one is an image."""
    files = [p for p in sorted(folder.iterdir()) if p.suffix.lower() in IMAGE_SUFFIXES]
    stems_of_photos = {p.stem for p in files if p.suffix.lower() != ".png"}
    images = [p for p in files if not (p.suffix.lower() == ".png" and p.stem in stems_of_photos)]
    if len(images) < len(files):
        logging.info(
            "%s: %d PNG file(s) beside an image of the same name taken as masks and skipped",
            folder,
            len(files) - len(images),
        )
    return images


def _image_paths(items: list[str], exclude: tuple[str, ...] = ()) -> list[Path]:
    """Image files named on the command line, and the images of named folders (see
    :func:`_folder_images`), without the ``exclude`` files (the reference mask)."""
    excluded = {Path(item).resolve() for item in exclude}
    paths: list[Path] = []
    for item in items:
        path = Path(item)
        paths.extend(_folder_images(path) if path.is_dir() else [path])
    return [path for path in paths if path.resolve() not in excluded]


def output_stems(paths: list[Path]) -> dict[Path, str]:
    """A distinct output name stem per input: the file's stem, or ``<stem>_<suffix>`` (and the
    parent folder's name too) where stems would collide, so no output overwrites another."""
    names: dict[Path, str] = {}
    taken: set[str] = set()
    for path in paths:
        for candidate in (
            path.stem,
            f"{path.stem}_{path.suffix.lstrip('.')}",
            f"{path.parent.name}_{path.stem}_{path.suffix.lstrip('.')}",
        ):
            if candidate not in taken:
                break
        else:
            candidate = f"{path.stem}_{len(taken)}"
        taken.add(candidate)
        names[path] = candidate
    return names


def reference_example(image_path: str, mask_path: str, labels: list[str] | None):
    """Reference image + mask file -> :class:`Example`; an indexed PNG gives one label per index."""
    from .reference import Example

    image = load_image(image_path)
    label_map = load_label_mask(mask_path)
    if label_map.shape != image.shape[:2]:
        raise ValueError(f"mask {label_map.shape} does not fit image {image.shape[:2]}")
    indices = [int(i) for i in np.unique(label_map) if i != 0]
    if not indices:
        raise ValueError(f"{mask_path}: the mask is empty")
    if labels and len(labels) != len(indices):
        raise ValueError(f"--labels names {len(labels)} labels, the mask has {len(indices)}")
    names = labels or (["object"] if indices == [1] else [f"label_{i}" for i in indices])
    return Example(image, {name: [label_map == i] for name, i in zip(names, indices, strict=True)})


def cmd_segment(args: argparse.Namespace) -> int:
    from .learning import model_version
    from .segmenter import OneShotSegmenter

    config = config_from_args(args)
    example = reference_example(args.ref_image, args.ref_mask, args.labels)
    segmenter = OneShotSegmenter(config)
    reference = segmenter.build_reference([example])
    version = model_version(reference, context={"mode": config.mode})
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    paths = _image_paths(args.images, exclude=(args.ref_mask,))
    stems = output_stems(paths)
    tasks: list[dict] = []
    failures = 0
    for path in paths:
        try:
            image = load_image(path, config.max_image_pixels)
        except (ImageError, OSError) as error:
            logging.error("%s: %s", path, error)
            failures += 1
            continue
        instances = segmenter.segment(reference, image)
        _write_instances(out, stems[path], path, image, instances, version, config.random_weights)
        if args.label_studio_json:
            task = label_studio_task(args, path, instances, list(example.masks), image, version)
            (out / f"{stems[path]}.labelstudio.json").write_text(json.dumps(task, indent=2))
            tasks.append(task)
        print(
            f"{path}: {len(instances)} instance(s)"
            + "".join(f" {i.label}={i.score:.2f}" for i in instances)
        )
    if tasks:
        _write_label_studio_tasks(out, tasks, args.image_url)
    return 1 if failures else 0


def _write_instances(
    out: Path,
    stem: str,
    path: Path,
    image: np.ndarray,
    instances: list,
    version: str,
    random_weights: bool,
) -> None:
    """One PNG per instance and the image's JSON summary, under ``out`` named by ``stem``."""
    summary = {
        "image": str(path),
        "width": image.shape[1],
        "height": image.shape[0],
        "random_weights": random_weights,
        "model_version": version,
        "instances": [],
    }
    for k, instance in enumerate(instances):
        name = f"{stem}_{instance.label}_{k}.png"
        Image.fromarray(instance.mask.astype(np.uint8) * 255).save(out / name)
        summary["instances"].append(
            {
                "label": instance.label,
                "score": round(instance.score, 4),
                "box_xyxy": list(instance.box),
                "mask": name,
            }
        )
    (out / f"{stem}.json").write_text(json.dumps(summary, indent=2))


def _write_label_studio_tasks(out: Path, tasks: list[dict], image_url: str | None) -> None:
    """One file to import: Label Studio takes a list of tasks with their predictions."""
    (out / "labelstudio_tasks.json").write_text(json.dumps(tasks, indent=2))
    if not image_url:
        logging.warning(
            "Label Studio cannot show local paths: pass --image-url PREFIX (e.g. "
            "/data/local-files/?d=images/ or https://host/images/) to name the images as "
            "Label Studio reaches them"
        )


def label_studio_task(
    args: argparse.Namespace,
    path: Path,
    instances: list,
    labels: list[str],
    image: np.ndarray,
    version: str,
) -> dict:
    """A Label Studio task for ``path`` with its prediction (results, score, model version),
    importable as is when ``--image-url`` says where Label Studio finds the image."""
    # The CLI program (not the library) offers Label Studio's format as an option; the one
    # engine module allowed to import upward (see the import-linter contract).
    from labelstudio import instances_to_results, label_config_xml, parse_label_config, task_score

    tag = {"brush": "BrushLabels", "polygon": "PolygonLabels"}[args.label_studio_json]
    schema = parse_label_config(label_config_xml([(tag, "label", labels)]))
    results = instances_to_results(instances, schema, image.shape[:2], version)
    url = f"{args.image_url}{path.name}" if args.image_url else str(path)
    prediction = {"model_version": version, "score": task_score(instances), "result": results}
    return {"data": {"image": url}, "predictions": [prediction]}


def cmd_evaluate(args: argparse.Namespace) -> int:
    from .datasets import folder_dataset
    from .evaluate import evaluate, write_report
    from .segmenter import OneShotSegmenter

    config = config_from_args(args)
    if args.labelstudio_export:
        from labelstudio.export import labelstudio_export_dataset  # see cmd_segment

        categories = labelstudio_export_dataset(args.labelstudio_export, args.image_root or ".")
    else:
        categories = folder_dataset(args.dataset)
    if args.categories:
        categories = {k: v for k, v in categories.items() if any(s in k for s in args.categories)}
    segmenter = OneShotSegmenter(config)
    report, cases = evaluate(
        segmenter,
        categories,
        shots=args.shots,
        negatives_per_category=args.negatives,
        max_targets=args.max_targets,
        progress=not args.no_progress,
    )
    page = write_report(report, cases, args.out)
    print(report.table())
    print(f"report: {page}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m matcher_core",
        description="One-shot segmentation with Matcher / PerSAM on SAM",
    )
    parser.add_argument("--log-level", default="WARNING")
    sub = parser.add_subparsers(dest="command", required=True)

    segment = sub.add_parser("segment", help="segment images like a reference image + mask")
    segment.add_argument("--ref-image", required=True)
    segment.add_argument(
        "--ref-mask",
        required=True,
        help="binary mask (one label) or indexed PNG (one label per index)",
    )
    segment.add_argument("--labels", nargs="+", help="label names, in mask index order")
    segment.add_argument("--out", required=True, help="output folder")
    segment.add_argument(
        "--label-studio-json",
        metavar="CONTROL",
        choices=["brush", "polygon"],
        help="also write Label Studio tasks with predictions (one per image, and all of them "
        "in labelstudio_tasks.json): 'brush' or 'polygon'",
    )
    segment.add_argument(
        "--image-url",
        metavar="PREFIX",
        help="with --label-studio-json: each task's image is PREFIX + file name, as Label Studio "
        "reaches it (e.g. /data/local-files/?d=images/); default the local path",
    )
    segment.add_argument("images", nargs="+", help="image files or folders")
    _add_model_arguments(segment)
    segment.set_defaults(run=cmd_segment)

    evaluation = sub.add_parser("evaluate", help="one-shot / k-shot evaluation with a report")
    source = evaluation.add_mutually_exclusive_group(required=True)
    source.add_argument("--dataset", help="folder of <category>/<name>.jpg + .png")
    source.add_argument("--labelstudio-export", help="Label Studio JSON export")
    evaluation.add_argument("--image-root", help="where the export's images are")
    evaluation.add_argument("--shots", type=int, default=1)
    evaluation.add_argument(
        "--negatives",
        type=int,
        default=2,
        help="images of other categories per category (false positives)",
    )
    evaluation.add_argument("--max-targets", type=int, help="targets per category at most")
    evaluation.add_argument("--categories", nargs="+", help="only categories containing these")
    evaluation.add_argument("--out", default="evaluation", help="report folder")
    evaluation.add_argument("--no-progress", action="store_true")
    _add_model_arguments(evaluation)
    evaluation.set_defaults(run=cmd_evaluate)

    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.run(args)
    except (ValueError, FileNotFoundError, ImageError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def segment_main() -> int:
    """``oneshot-segment ...``: the same as ``python -m matcher_core segment ...``."""
    return main(["segment", *sys.argv[1:]])


def evaluate_main() -> int:
    """``oneshot-evaluate ...``: the same as ``python -m matcher_core evaluate ...``."""
    return main(["evaluate", *sys.argv[1:]])


if __name__ == "__main__":
    sys.exit(main())
