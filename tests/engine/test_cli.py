"""The command line works without a server: segment a folder, evaluate a dataset (random weights:
these tests check that the tools run and write what they promise, not quality)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from builders import SHARED_DATA, disc_image
from matcher_core.__main__ import main

DATA = SHARED_DATA


def smoke_args(tmp_path: Path) -> list[str]:
    return ["--random-weights", "--model-dir", str(tmp_path / "models"), "--score-threshold", "0"]


def segment(tmp_path: Path, folder: Path, *args: str, ref_mask: str = "ref.png") -> int:
    """``segment`` with ``folder``'s ``ref.jpg`` (and ``ref_mask``) as the reference, writing
    to ``tmp_path/out``, on the tiny random models; ``args`` are the other arguments."""
    return main(
        [
            "segment",
            "--ref-image",
            str(folder / "ref.jpg"),
            "--ref-mask",
            str(folder / ref_mask),
            "--out",
            str(tmp_path / "out"),
            *args,
            *smoke_args(tmp_path),
        ]
    )


def write_pair(folder: Path, name: str, seed: int, size=(60, 90)) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    image, mask = disc_image(*size, centre=(30 + seed, 25), radius=12, seed=seed)
    Image.fromarray(image).save(folder / f"{name}.jpg")
    Image.fromarray(mask.astype(np.uint8) * 255).save(folder / f"{name}.png")


def test_segment_writes_masks_and_summaries_at_original_size(tmp_path):
    write_pair(tmp_path / "in", "ref", 0)
    write_pair(tmp_path / "in", "a", 1, size=(50, 120))
    write_pair(tmp_path / "in", "b", 2, size=(120, 50))
    out = tmp_path / "out"
    code = segment(
        tmp_path,
        tmp_path / "in",
        "--label-studio-json",
        "brush",
        str(tmp_path / "in/a.jpg"),
        str(tmp_path / "in/b.jpg"),
    )
    assert code == 0
    for stem, (height, width) in (("a", (50, 120)), ("b", (120, 50))):
        summary = json.loads((out / f"{stem}.json").read_text())
        assert summary["random_weights"] is True
        assert (summary["width"], summary["height"]) == (width, height)
        for instance in summary["instances"]:
            assert instance["label"] == "object" and 0 <= instance["score"] <= 1
            assert Image.open(out / instance["mask"]).size == (width, height)
        task = json.loads((out / f"{stem}.labelstudio.json").read_text())
        for result in task["predictions"][0]["result"]:
            assert result["type"] == "brushlabels"
            assert (result["original_width"], result["original_height"]) == (width, height)


def test_a_folder_with_masks_beside_its_images_segments_the_images_only(tmp_path):
    """``00000.jpg`` with its mask ``00000.png`` in one folder: only the JPEG is segmented, and
    an image whose name differs only by suffix (``c.png`` beside ``c.webp``...) never
    overwrites another's output."""
    folder = tmp_path / "in"
    write_pair(folder, "ref", 0)
    write_pair(folder, "a", 1)
    write_pair(folder, "b", 2)
    out = tmp_path / "out"
    code = segment(tmp_path, folder, str(folder))

    assert code == 0
    assert sorted(p.name for p in out.glob("*.json")) == ["a.json", "b.json", "ref.json"]
    assert json.loads((out / "a.json").read_text())["image"].endswith("a.jpg")


def test_distinct_outputs_for_images_that_share_a_stem(tmp_path):
    from matcher_core.__main__ import output_stems

    paths = [Path("x/00000.jpg"), Path("x/00000.png"), Path("y/00000.jpg")]
    stems = output_stems(paths)

    assert len(set(stems.values())) == 3
    assert stems[paths[0]] == "00000"


def test_label_studio_json_is_importable_as_is(tmp_path):
    """Tasks name the image as Label Studio reaches it (``--image-url``), and each prediction
    carries a model version and a score (for sorting in the Data Manager)."""
    write_pair(tmp_path / "in", "ref", 0)
    write_pair(tmp_path / "in", "a", 1)
    out = tmp_path / "out"
    code = segment(
        tmp_path,
        tmp_path / "in",
        "--label-studio-json",
        "brush",
        "--image-url",
        "/data/local-files/?d=in/",
        str(tmp_path / "in/a.jpg"),
    )

    assert code == 0
    tasks = json.loads((out / "labelstudio_tasks.json").read_text())
    assert [task["data"]["image"] for task in tasks] == ["/data/local-files/?d=in/a.jpg"]
    prediction = tasks[0]["predictions"][0]
    assert prediction["model_version"].startswith("oneshot-random-")
    assert 0.0 <= prediction["score"] <= 1.0


def test_indexed_reference_masks_give_one_label_per_index(tmp_path):
    from matcher_core.__main__ import reference_example

    image, _ = disc_image(40, 40, centre=(20, 20), radius=5)
    Image.fromarray(image).save(tmp_path / "ref.jpg")
    indexed = np.zeros((40, 40), np.uint8)
    indexed[2:10, 2:10], indexed[20:30, 20:30] = 1, 2
    palette = Image.fromarray(indexed, mode="P")
    palette.putpalette([0, 0, 0, 255, 0, 0, 0, 255, 0] + [0] * 759)
    palette.save(tmp_path / "ref.png")
    example = reference_example(
        str(tmp_path / "ref.jpg"), str(tmp_path / "ref.png"), ["cat", "dog"]
    )
    assert {k: int(v[0].sum()) for k, v in example.masks.items()} == {"cat": 64, "dog": 100}
    with pytest.raises(ValueError, match="names 1 labels"):
        reference_example(str(tmp_path / "ref.jpg"), str(tmp_path / "ref.png"), ["cat"])


def test_bad_reference_is_a_clear_error(tmp_path, capsys):
    write_pair(tmp_path, "ref", 0)
    Image.fromarray(np.zeros((60, 90), np.uint8)).save(tmp_path / "empty.png")
    code = segment(tmp_path, tmp_path, str(tmp_path / "ref.jpg"), ref_mask="empty.png")
    assert code == 2 and "mask is empty" in capsys.readouterr().err


def test_evaluate_on_a_tiny_real_subset_writes_json_and_html(tmp_path):
    if not DATA.exists():
        pytest.skip(f"shared data not found at {DATA}")
    out = tmp_path / "report"
    code = main(
        [
            "evaluate",
            "--dataset",
            str(DATA / "fss1000"),
            "--categories",
            "apple",
            "basketball",
            "--max-targets",
            "2",
            "--negatives",
            "1",
            "--no-progress",
            "--out",
            str(out),
            *smoke_args(tmp_path),
        ]
    )
    assert code == 0
    report = json.loads((out / "report.json").read_text())
    assert set(report["categories"]) == {"apple", "basketball"}
    assert report["random_weights"] is True and len(report["targets"]) == 4
    assert all(0.0 <= t["iou"] <= 1.0 for t in report["targets"])
    assert "Random weights" in (out / "report.html").read_text()
    assert (out / "worst-0.png").exists() and (out / "best-0.png").exists()


def test_evaluate_reads_a_label_studio_export(tmp_path):
    from labelstudio import instances_to_results, label_config_xml, parse_label_config
    from labelstudio.export import labelstudio_export_dataset
    from matcher_core import Instance

    schema = parse_label_config(label_config_xml([("BrushLabels", "tag", ["disc"])]))
    tasks = []
    for k in range(3):
        image, mask = disc_image(40, 50, centre=(20 + k, 20), radius=8, seed=k)
        Image.fromarray(image).save(tmp_path / f"{k}.jpg")
        results = instances_to_results([Instance.from_mask("disc", mask, 1.0)], schema, mask.shape)
        tasks.append(
            {
                "id": k,
                "data": {"image": f"/data/upload/1/{k}.jpg"},
                "annotations": [{"result": results}],
            }
        )
    (tmp_path / "export.json").write_text(json.dumps(tasks))
    categories = labelstudio_export_dataset(tmp_path / "export.json", tmp_path)
    assert list(categories) == ["disc"] and len(categories["disc"]) == 3
    image, mask = categories["disc"][1].load()
    assert image.shape == (40, 50, 3) and mask.sum() == disc_image(40, 50, (21, 20), 8)[1].sum()
