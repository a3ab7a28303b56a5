"""Label Studio JSON <-> engine conversion (the ``labelstudio`` package), as a specification."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from label_studio_sdk.converter.brush import mask2rle

from builders import brush_result as shared_brush_result
from labelstudio import (
    AnnotationError,
    ConfigError,
    TaskDataError,
    annotation_to_masks,
    decode_brush,
    instances_to_results,
    interactive_prompts,
    parse_label_config,
    task_image_url,
    task_score,
)
from matcher_core.reference import Instance

BRUSH_CONFIG = """
<View>
  <Image name="image" value="$image" smart="true"/>
  <BrushLabels name="tag" toName="image">
    <Label value="cat" background="red"/>
    <Label value="dog" background="blue"/>
  </BrushLabels>
  <KeyPointLabels name="kp" toName="image" smart="true">
    <Label value="cat" smart="true"/>
    <Label value="dog" smart="true"/>
  </KeyPointLabels>
  <RectangleLabels name="box" toName="image" smart="true">
    <Label value="cat"/>
    <Label value="bird"/>
  </RectangleLabels>
  <PolygonLabels name="poly" toName="image">
    <Label value="cat"/>
  </PolygonLabels>
  <Choices name="quality" toName="image"><Choice value="good"/></Choices>
</View>
"""

POLYGON_CONFIG = """
<View>
  <Image name="img" value="$photo"/>
  <PolygonLabels name="outline" toName="img"><Label value="cat"/><Label value="dog"/></PolygonLabels>
</View>
"""

TWO_IMAGES_CONFIG = """
<View>
  <Image name="left" value="$left_url"/>
  <Image name="right" value="$right_url"/>
  <RectangleLabels name="left_box" toName="left"><Label value="cat"/></RectangleLabels>
  <BrushLabels name="right_brush" toName="right"><Label value="cat"/></BrushLabels>
</View>
"""


_BRUSH_SCHEMA = parse_label_config(BRUSH_CONFIG)


def brush_schema():
    return _BRUSH_SCHEMA


def random_mask(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A blob plus noise, so runs of every length occur."""
    yy, xx = np.mgrid[:height, :width]
    blob = (yy - height / 2) ** 2 + (xx - width / 3) ** 2 < (min(height, width) / 3) ** 2
    return blob ^ (rng.random((height, width)) < 0.05)


def brush_result(mask: np.ndarray, label: str = "cat", **overrides) -> dict:
    return shared_brush_result(mask, label, **overrides)


def polygon_result(points, label="cat", from_name="poly", size=(100, 200)) -> dict:
    return {
        "from_name": from_name,
        "to_name": "image",
        "type": "polygonlabels",
        "original_width": size[1],
        "original_height": size[0],
        "value": {"points": points, "polygonlabels": [label]},
    }


def disk(height: int, width: int, center_xy, radius: float) -> np.ndarray:
    yy, xx = np.mgrid[:height, :width]
    return (xx + 0.5 - center_xy[0]) ** 2 + (yy + 0.5 - center_xy[1]) ** 2 <= radius**2


# ------------------------------------------------------------------------------------------
# Label configs


def test_brush_config_predicts_into_brushlabels_and_lists_every_mask_label():
    schema = brush_schema()
    assert schema.output.from_name == "tag"
    assert schema.output.type == "brushlabels"
    assert schema.output.to_name == "image"
    assert schema.image_key == "image"
    assert [c.type for c in schema.controls] == [
        "brushlabels",
        "keypointlabels",
        "rectanglelabels",
        "polygonlabels",
    ]
    assert schema.labels == ["cat", "dog", "bird"]
    assert schema.control("quality") is None  # Choices is not mask-capable


def test_polygon_config_predicts_polygons():
    schema = parse_label_config(POLYGON_CONFIG)
    assert schema.output.type == "polygonlabels"
    assert schema.image_key == "photo"
    assert schema.output.labels == ["cat", "dog"]


def test_label_alias_is_the_label_results_carry():
    schema = parse_label_config(
        '<View><Image name="i" value="$im"/>'
        '<BrushLabels name="b" toName="i"><Label value="Cat" alias="c"/></BrushLabels></View>'
    )
    assert schema.output.labels == ["c"]


@pytest.mark.parametrize(
    "config, message",
    [
        ("", "empty"),
        ("<View><Image name='i' value='$im'", "cannot be parsed"),
        (
            "<View><Text name='t' value='$text'/>"
            "<Labels name='l' toName='t'><Label value='a'/></Labels></View>",
            "no <Image",
        ),
        (
            "<View><Image name='i' value='$im'/>"
            "<Choices name='c' toName='i'><Choice value='a'/></Choices></View>",
            "no BrushLabels",
        ),
        (
            "<View><Image name='i' value='$im'/><BrushLabels name='b' toName='i'/></View>",
            "no <Label>",
        ),
        (
            "<View><Image name='i' valueList='$pages'/>"
            "<BrushLabels name='b' toName='i'><Label value='a'/></BrushLabels></View>",
            "no <Image",
        ),
        (
            '<?xml version="1.0"?><!DOCTYPE v [<!ENTITY x "y">]><View>&x;</View>',
            "DOCTYPE",
        ),
    ],
)
def test_unusable_configs_raise_config_error(config, message):
    with pytest.raises(ConfigError, match=message):
        parse_label_config(config)


def test_several_images_per_task_use_the_output_controls_image():
    schema = parse_label_config(TWO_IMAGES_CONFIG)
    assert schema.output.from_name == "right_brush"
    assert schema.image_key == "right_url"
    assert schema.control("left_box").image_key == "left_url"
    task = {
        "id": 7,
        "data": {"left_url": "/data/upload/1/a.png", "right_url": "/data/upload/1/b.png"},
    }
    assert task_image_url(task, schema) == "/data/upload/1/b.png"


def test_a_task_without_the_image_key_names_the_key_and_what_is_there():
    schema = parse_label_config(TWO_IMAGES_CONFIG)
    with pytest.raises(TaskDataError, match=r"right_url.*left_url"):
        task_image_url({"id": 3, "data": {"left_url": "/x.png"}}, schema)
    with pytest.raises(TaskDataError, match="no 'data'"):
        task_image_url({"id": 3}, schema)


# ------------------------------------------------------------------------------------------
# Brush RLE


@pytest.mark.parametrize("height, width", [(1, 1), (7, 13), (31, 17), (64, 3)])
def test_brush_round_trip_through_prediction_and_annotation(height, width):
    schema = brush_schema()
    mask = random_mask(np.random.default_rng(height * width), height, width)
    mask[0, 0] = True  # never empty
    results = instances_to_results(
        [Instance.from_mask("dog", mask, 0.8)], schema, (height, width), model_version="v1"
    )
    assert len(results) == 1
    result = results[0]
    assert result["type"] == "brushlabels"
    assert (result["original_width"], result["original_height"]) == (width, height)
    assert result["value"]["brushlabels"] == ["dog"]
    assert result["value"]["format"] == "rle"
    assert result["score"] == pytest.approx(0.8)
    assert result["readonly"] is False and result["image_rotation"] == 0
    masks = annotation_to_masks(results, schema, (height, width))
    assert list(masks) == ["dog"]
    np.testing.assert_array_equal(masks["dog"][0], mask)


def test_truncated_rle_never_decodes_to_a_wrong_mask():
    mask = random_mask(np.random.default_rng(0), 23, 29)
    rle = mask2rle(mask.astype(np.uint8) * 255)
    for keep in range(len(rle)):
        value = {"format": "rle", "rle": rle[:keep], "brushlabels": ["cat"]}
        try:
            decoded = decode_brush(value, 23, 29)
        except AnnotationError:
            continue
        # Only dropping pure padding may pass, and then the mask is intact.
        np.testing.assert_array_equal(decoded, mask)
    with pytest.raises(AnnotationError, match="truncated|corrupt"):
        decode_brush({"rle": rle[: len(rle) // 2]}, 23, 29)


@pytest.mark.parametrize(
    "rle, message",
    [
        ([], "non-empty"),
        ("abc", "non-empty"),
        ([0, 0, 1, 300, 7, 7, 7], "0..255"),
        ([0, 0, 1, -1, 7, 7, 7], "0..255"),
        ([0, 0, 1, 1.5, 7, 7, 7], "0..255"),
        ([0, 0, 1], "no complete header"),
    ],
)
def test_malformed_rle_items_raise_annotation_error(rle, message):
    with pytest.raises(AnnotationError, match=message):
        decode_brush({"format": "rle", "rle": rle}, 4, 4)


def rle_from_bits(bits: str) -> list[int]:
    bits += "0" * (-len(bits) % 8)
    return [int(bits[i : i + 8], 2) for i in range(0, len(bits), 8)]


def test_corrupt_rle_streams_raise_annotation_error():
    count_of_one_pixel = f"{4:032b}"
    sizes = "1111" * 4  # run lengths of 16 bits
    # A literal run of 1000 values in a stream declaring 4: the decoder writes past the end.
    overrun = count_of_one_pixel + "00111" + sizes + "0" + "11" + f"{999:016b}" + "1" * 8 * 6
    with pytest.raises(AnnotationError, match="corrupt"):
        decode_brush({"rle": rle_from_bits(overrun)}, 1, 1)
    # Words of 12 bits cannot hold 8-bit RGBA values.
    wide_words = count_of_one_pixel + "01011" + sizes + "1" + "00" + "0" * 16 + "1" * 12
    with pytest.raises(AnnotationError, match="word size 12"):
        decode_brush({"rle": rle_from_bits(wide_words)}, 1, 1)


def test_rle_whose_length_disagrees_with_original_size_is_refused():
    mask = np.ones((10, 10), dtype=bool)
    result = brush_result(mask, original_width=12, original_height=10)
    with pytest.raises(AnnotationError, match=r"RLE holds 400 values \(100 pixels\).*12x10"):
        annotation_to_masks([result], brush_schema(), (10, 12))


def test_size_mismatch_with_the_task_image_is_refused_and_swaps_are_explained():
    mask = np.ones((10, 20), dtype=bool)
    with pytest.raises(AnnotationError, match="20x10 image but the task image is 20x11"):
        annotation_to_masks([brush_result(mask)], brush_schema(), (11, 20))
    with pytest.raises(AnnotationError, match="EXIF orientation"):
        annotation_to_masks([brush_result(mask)], brush_schema(), (20, 10))


def test_rotated_images_are_refused_with_a_remedy():
    result = brush_result(np.ones((8, 8), dtype=bool), image_rotation=90)
    with pytest.raises(AnnotationError, match="rotated by 90 degrees.*reset the rotation"):
        annotation_to_masks([result], brush_schema(), (8, 8))


# ------------------------------------------------------------------------------------------
# Polygons


def test_axis_aligned_polygon_covers_its_pixels_plus_at_most_half_its_outline():
    # 200x100 image; x from 10% to 60% = pixels 20..119, y from 20% to 70% = rows 20..69:
    # exactly 100 x 50 pixel centres inside. PIL also fills pixels the outline touches.
    result = polygon_result([[10, 20], [60, 20], [60, 70], [10, 70]])
    mask = annotation_to_masks([result], brush_schema(), (100, 200))["cat"][0]
    assert mask[20:70, 20:120].all()
    assert 0 <= mask.sum() - 100 * 50 <= (2 * 100 + 2 * 50) / 2 + 1
    assert not mask[:19].any() and not mask[:, :19].any()
    assert not mask[71:].any() and not mask[:, 121:].any()


def test_triangle_polygon_area_matches_the_hand_computed_area():
    # Right triangle with legs of 150 and 80 pixels: area 6000.
    result = polygon_result([[10, 10], [85, 10], [10, 90]])
    mask = annotation_to_masks([result], brush_schema(), (100, 200))["cat"][0]
    perimeter = 150 + 80 + np.hypot(150, 80)
    assert 0 <= int(mask.sum()) - 6000 <= perimeter / 2 + 1


def test_empty_masks_are_dropped_and_alone_they_are_an_error(caplog):
    degenerate = brush_result(np.zeros((100, 200), dtype=bool))
    square = polygon_result([[10, 10], [20, 10], [20, 20], [10, 20]])
    with caplog.at_level(logging.WARNING):
        masks = annotation_to_masks([degenerate, square], brush_schema(), (100, 200))
    assert len(masks["cat"]) == 1
    assert "empty mask" in caplog.text
    with pytest.raises(AnnotationError, match="empty mask"):
        annotation_to_masks([degenerate], brush_schema(), (100, 200))


def test_unknown_labels_are_skipped_with_a_warning_unless_nothing_is_left(caplog):
    known = polygon_result([[10, 10], [20, 10], [20, 20]], label="cat")
    unknown = polygon_result([[30, 30], [40, 30], [40, 40]], label="zebra")
    with caplog.at_level(logging.WARNING):
        masks = annotation_to_masks([unknown, known], brush_schema(), (100, 200))
    assert list(masks) == ["cat"]
    assert "'zebra' is not in control 'poly'" in caplog.text
    with pytest.raises(AnnotationError, match="zebra"):
        annotation_to_masks([unknown], brush_schema(), (100, 200))


def test_results_of_unknown_controls_and_other_types_are_ignored():
    square = polygon_result([[10, 10], [20, 10], [20, 20], [10, 20]])
    stranger = polygon_result([[10, 10], [20, 10], [20, 20]], from_name="nope")
    choice = {"type": "choices", "from_name": "quality", "value": {"choices": ["good"]}}
    masks = annotation_to_masks([choice, stranger, square], brush_schema(), (100, 200))
    assert len(masks["cat"]) == 1
    with pytest.raises(AnnotationError, match="no usable mask"):
        annotation_to_masks([choice], brush_schema(), (100, 200))


def test_results_on_another_image_of_the_task_are_skipped():
    schema = parse_label_config(TWO_IMAGES_CONFIG)
    on_left = {
        "from_name": "left_box",
        "to_name": "left",
        "type": "rectanglelabels",
        "value": {"x": 0, "y": 0, "width": 50, "height": 50, "rectanglelabels": ["cat"]},
    }
    with pytest.raises(AnnotationError, match="not the output image"):
        annotation_to_masks([on_left], schema, (10, 10), prompt_masker=BoxFiller(10, 10))


# ------------------------------------------------------------------------------------------
# Rectangles and keypoints go through SAM (here: plain functions standing in for it)


class BoxFiller:
    """A prompt masker that fills the box it is given; records its calls."""

    def __init__(self, height: int, width: int):
        self.shape = (height, width)
        self.calls: list[tuple] = []

    def __call__(self, points, labels, box):
        self.calls.append((points, labels, box))
        mask = np.zeros(self.shape, dtype=bool)
        x0, y0, x1, y1 = np.round(box).astype(int)
        mask[y0:y1, x0:x1] = True
        return mask


class DiskAroundPoints:
    """A prompt masker that returns a disk around the mean of the points; records its calls."""

    def __init__(self, height: int, width: int, radius: float = 10):
        self.shape = (height, width)
        self.radius = radius
        self.calls: list[tuple] = []

    def __call__(self, points, labels, box):
        self.calls.append((points, labels, box))
        return disk(*self.shape, points.mean(axis=0), self.radius)


def rectangle_result(x, y, width, height, rotation=0, label="cat") -> dict:
    return {
        "from_name": "box",
        "to_name": "image",
        "type": "rectanglelabels",
        "value": {
            "x": x,
            "y": y,
            "width": width,
            "height": height,
            "rotation": rotation,
            "rectanglelabels": [label],
        },
    }


def keypoint_result(x, y, label="cat") -> dict:
    return {
        "from_name": "kp",
        "to_name": "image",
        "type": "keypointlabels",
        "value": {"x": x, "y": y, "width": 1, "keypointlabels": [label]},
    }


def test_rectangles_become_masks_through_the_prompt_masker_with_pixel_boxes():
    masker = BoxFiller(100, 200)
    result = rectangle_result(10, 20, 25, 50, label="bird")
    masks = annotation_to_masks([result], brush_schema(), (100, 200), prompt_masker=masker)
    ((points, labels, box),) = masker.calls
    assert points is None and labels is None
    np.testing.assert_allclose(box, [20, 20, 70, 70])
    assert masks["bird"][0].sum() == 50 * 50


def test_rotated_rectangles_prompt_with_their_axis_aligned_hull():
    masker = BoxFiller(100, 100)
    # 20x10 px rectangle at (50, 50), rotated 90 degrees clockwise about its top-left corner:
    # it then spans x 40..50, y 50..70.
    annotation_to_masks(
        [rectangle_result(50, 50, 20, 10, rotation=90)],
        brush_schema(),
        (100, 100),
        prompt_masker=masker,
    )
    np.testing.assert_allclose(masker.calls[0][2], [40, 50, 50, 70], atol=1e-4)


def test_keypoints_on_one_object_refine_it_and_keypoints_elsewhere_start_another():
    masker = DiskAroundPoints(100, 200)
    results = [
        keypoint_result(25, 50),  # (50, 50) px
        keypoint_result(27, 52),  # (54, 52) px: inside the first disk -> same object
        keypoint_result(75, 50),  # (150, 50) px: a second object
    ]
    masks = annotation_to_masks(results, brush_schema(), (100, 200), prompt_masker=masker)
    assert len(masks["cat"]) == 2
    assert [len(call[0]) for call in masker.calls] == [1, 2, 1]
    np.testing.assert_allclose(masker.calls[1][0], [[50, 50], [54, 52]])
    assert all((call[1] == 1).all() and call[2] is None for call in masker.calls)
    assert masks["cat"][0][51, 52] and masks["cat"][1][50, 150]


def test_smart_tool_prompts_kept_beside_the_masks_they_made_are_not_new_objects():
    # What an annotation made with smart tools holds: the clicks and the box that prompted SAM,
    # the resulting brush masks, and a negative click.
    first_cat = disk(100, 200, (50, 50), 15)
    second_cat = np.zeros((100, 200), dtype=bool)
    second_cat[20:80, 120:180] = True
    results = [
        {**keypoint_result(25, 50), "is_positive": True},  # (50, 50) px, inside the cat mask
        {**keypoint_result(5, 5), "is_positive": False},  # background click
        {**rectangle_result(60, 20, 30, 60), "is_positive": True},  # the second cat's box
        brush_result(first_cat),
        {**brush_result(second_cat), "id": "r2"},
    ]
    masker = DiskAroundPoints(100, 200)
    masks = annotation_to_masks(results, brush_schema(), (100, 200), prompt_masker=masker)
    assert masker.calls == []
    assert len(masks["cat"]) == 2


def test_boxes_and_keypoints_without_a_prompt_masker_are_an_error():
    with pytest.raises(AnnotationError, match="need SAM"):
        annotation_to_masks([keypoint_result(10, 10)], brush_schema(), (50, 50))
    with pytest.raises(AnnotationError, match="need SAM"):
        annotation_to_masks([rectangle_result(1, 1, 9, 9)], brush_schema(), (50, 50))


# ------------------------------------------------------------------------------------------
# Predictions


def test_polygon_output_round_trips_to_nearly_the_same_mask():
    schema = parse_label_config(POLYGON_CONFIG)
    mask = disk(120, 160, (60, 50), 30)
    results = instances_to_results([Instance.from_mask("dog", mask, 0.9)], schema, (120, 160))
    assert len(results) == 1
    value = results[0]["value"]
    assert value["polygonlabels"] == ["dog"] and value["closed"] is True
    assert all(0 <= x <= 100 and 0 <= y <= 100 for x, y in value["points"])
    back = annotation_to_masks(
        [{**results[0], "from_name": "outline", "to_name": "img"}], schema, (120, 160)
    )["dog"][0]
    iou = (back & mask).sum() / (back | mask).sum()
    assert iou > 0.95


def test_polygon_output_gives_one_polygon_per_sizeable_part():
    schema = parse_label_config(POLYGON_CONFIG)
    mask = disk(100, 200, (50, 50), 20) | disk(100, 200, (150, 50), 15)
    mask[95, 5] = True  # a one-pixel speck: no polygon of its own
    results = instances_to_results([Instance.from_mask("cat", mask, 0.5)], schema, (100, 200))
    assert len(results) == 2
    assert len({result["id"] for result in results}) == 2


def test_rectangle_output_when_the_config_only_has_boxes():
    schema = parse_label_config(
        '<View><Image name="i" value="$im"/>'
        '<RectangleLabels name="r" toName="i"><Label value="cat"/></RectangleLabels></View>'
    )
    mask = np.zeros((50, 100), dtype=bool)
    mask[10:20, 30:80] = True
    (result,) = instances_to_results([Instance.from_mask("cat", mask, 0.7)], schema, (50, 100))
    value = result["value"]
    assert (value["x"], value["y"], value["width"], value["height"]) == pytest.approx(
        (30, 20, 50, 20)
    )
    assert all(type(value[key]) is float for key in ("x", "y", "width", "height"))


def test_keypoint_output_lies_inside_the_object_even_when_its_centroid_does_not():
    schema = parse_label_config(
        '<View><Image name="i" value="$im"/>'
        '<KeyPointLabels name="k" toName="i"><Label value="cat"/></KeyPointLabels></View>'
    )
    ring = disk(60, 80, (40, 30), 20) & ~disk(60, 80, (40, 30), 12)  # centre (40, 30) is a hole
    (result,) = instances_to_results([Instance.from_mask("cat", ring, 0.7)], schema, (60, 80))
    x, y = result["value"]["x"] * 80 / 100, result["value"]["y"] * 60 / 100
    assert ring[int(y), int(x)]


def test_prediction_ids_are_unique_and_stable_for_one_model_version():
    schema = brush_schema()
    mask = disk(40, 40, (20, 20), 8)
    instances = [Instance.from_mask("cat", mask, 0.9), Instance.from_mask("cat", mask, 0.6)]
    first = [r["id"] for r in instances_to_results(instances, schema, (40, 40), "v1")]
    again = [r["id"] for r in instances_to_results(instances, schema, (40, 40), "v1")]
    other = [r["id"] for r in instances_to_results(instances, schema, (40, 40), "v2")]
    assert len(set(first)) == 2 and first == again and set(first).isdisjoint(other)


def test_instances_of_labels_the_output_lacks_or_empty_are_not_predicted(caplog):
    schema = brush_schema()
    full = disk(20, 20, (10, 10), 5)
    empty = np.zeros((20, 20), dtype=bool)
    with caplog.at_level(logging.WARNING):
        results = instances_to_results(
            [
                Instance.from_mask("bird", full, 0.9),  # a rectangle label, not a brush label
                Instance.from_mask("cat", empty, 0.9),
                Instance.from_mask("cat", full, 0.9),
            ],
            schema,
            (20, 20),
        )
    assert len(results) == 1
    assert "'bird' is not in output control 'tag'" in caplog.text


def test_task_score_is_the_mean_instance_score_and_zero_without_instances():
    mask = disk(10, 10, (5, 5), 3)
    instances = [Instance.from_mask("cat", mask, s) for s in (0.2, 0.6, 1.0)]
    assert task_score(instances) == pytest.approx(0.6)
    assert task_score([]) == 0.0


# ------------------------------------------------------------------------------------------
# Smart tools


def test_interactive_prompts_from_positive_and_negative_keypoints_and_a_box():
    context = {
        "result": [
            {**keypoint_result(50, 50, label="dog"), "is_positive": True},
            {**keypoint_result(10, 10, label="dog"), "is_positive": False},
            {**rectangle_result(20, 20, 60, 60, label="dog"), "is_positive": True},
        ]
    }
    points, labels, box, label = interactive_prompts(context, brush_schema(), (100, 200))
    np.testing.assert_allclose(points, [[100, 50], [20, 10]])
    np.testing.assert_array_equal(labels, [1, 0])
    np.testing.assert_allclose(box, [40, 20, 160, 80])
    assert label == "dog"


def test_interactive_box_only():
    context = {"result": [rectangle_result(0, 0, 50, 50)]}
    points, labels, box, label = interactive_prompts(context, brush_schema(), (10, 10))
    assert points is None and labels is None and label == "cat"
    np.testing.assert_allclose(box, [0, 0, 5, 5])


@pytest.mark.parametrize(
    "context, message",
    [
        ({}, "no 'result'"),
        ({"result": []}, "no keypoint or rectangle"),
        ({"result": [keypoint_result(5, 5, label="bird")]}, "'bird' is not a label of output"),
        ({"result": [{**keypoint_result(5, 5), "value": {"x": "a", "y": 1}}]}, "x must be"),
    ],
)
def test_unusable_smart_contexts_raise_annotation_error(context, message):
    with pytest.raises(AnnotationError, match=message):
        interactive_prompts(context, brush_schema(), (100, 100))


# ------------------------------------------------------------------------------------------
# Properties


@settings(max_examples=60, deadline=None)
@given(
    height=st.integers(1, 24),
    width=st.integers(1, 24),
    seed=st.integers(0, 2**32 - 1),
    density=st.floats(0, 1),
)
def test_rle_round_trip_for_random_masks(height, width, seed, density):
    mask = np.random.default_rng(seed).random((height, width)) < density
    decoded = decode_brush({"rle": mask2rle(mask.astype(np.uint8) * 255)}, height, width)
    np.testing.assert_array_equal(decoded, mask)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**40), 2**40)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=6) | st.dictionaries(st.text(max_size=12), children, max_size=6)
    ),
    max_leaves=30,
)

result_like = st.fixed_dictionaries(
    {
        "type": st.sampled_from(
            ["brushlabels", "polygonlabels", "rectanglelabels", "keypointlabels", "choices", 3]
        ),
        "from_name": st.sampled_from(["tag", "poly", "box", "kp", "quality", "x", None]),
    },
    optional={
        "to_name": st.sampled_from(["image", "other"]),
        "original_width": json_values | st.integers(1, 40),
        "original_height": json_values | st.integers(1, 40),
        "image_rotation": st.sampled_from([0, 90, None, "0", 1e400]),
        "is_positive": st.booleans(),
        "value": st.fixed_dictionaries(
            {},
            optional={
                "rle": st.lists(st.integers(-5, 300), max_size=40) | json_values,
                "format": st.sampled_from(["rle", "png"]),
                "points": st.lists(
                    st.lists(st.floats(allow_nan=True) | st.integers(), max_size=3), max_size=8
                )
                | json_values,
                "x": json_values | st.floats(-200, 200),
                "y": json_values | st.floats(-200, 200),
                "width": json_values | st.floats(-200, 200),
                "height": json_values | st.floats(-200, 200),
                "rotation": json_values | st.floats(-720, 720),
                "brushlabels": st.lists(st.sampled_from(["cat", "dog", "zebra"])) | json_values,
                "polygonlabels": st.lists(st.sampled_from(["cat", "zebra"])) | json_values,
                "rectanglelabels": st.lists(st.sampled_from(["cat", "bird"])) | json_values,
                "keypointlabels": st.lists(st.sampled_from(["cat", "dog"])) | json_values,
            },
        )
        | json_values,
    },
)


def _valid_results() -> list[dict]:
    mask = disk(30, 40, (20, 15), 6)
    square = polygon_result([[10, 10], [40, 10], [40, 40], [10, 40]], size=(30, 40))
    return [
        brush_result(mask),
        square,
        {**rectangle_result(10, 10, 30, 30), "original_width": 40, "original_height": 30},
        keypoint_result(50, 50),
    ]


@st.composite
def mutated_results(draw):
    """A valid result with one field, or one field of its value, replaced by junk."""
    result = draw(st.sampled_from(_valid_results()))
    result = {**result, "value": dict(result["value"])}
    target = result["value"] if draw(st.booleans()) else result
    target[draw(st.sampled_from(sorted(target)))] = draw(json_values)
    return result


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(results=st.lists(mutated_results() | result_like | json_values, max_size=5) | json_values)
def test_fuzzed_annotations_raise_only_annotation_error(results):
    masker = BoxFiller(30, 40)

    def any_prompt_masker(points, labels, box):
        if box is not None:
            return masker(points, labels, box)
        return disk(30, 40, points.mean(axis=0), 5)

    try:
        masks = annotation_to_masks(results, brush_schema(), (30, 40), any_prompt_masker)
    except AnnotationError:
        return
    assert masks and all(
        m.shape == (30, 40) and m.dtype == bool and m.any() for ms in masks.values() for m in ms
    )


@settings(max_examples=100, deadline=None)
@given(context=st.fixed_dictionaries({"result": st.lists(result_like, max_size=4)}) | json_values)
def test_fuzzed_smart_contexts_raise_only_annotation_error(context):
    try:
        points, labels, box, label = interactive_prompts(context, brush_schema(), (30, 40))
    except AnnotationError:
        return
    assert points is not None or box is not None
    assert label in brush_schema().output.labels


tag_names = st.sampled_from(
    [
        "View",
        "Image",
        "BrushLabels",
        "PolygonLabels",
        "RectangleLabels",
        "KeyPointLabels",
        "Label",
        "Choices",
        "Choice",
        "Text",
        "Labels",
        "Brush",
        "Header",
        "x",
    ]
)
attributes = st.dictionaries(
    st.sampled_from(["name", "toName", "value", "valueList", "alias", "smart", "background"]),
    st.sampled_from(["image", "$image", "$", "tag", "img", "cat", "", "a,b", "$a b", "true"]),
    max_size=4,
)


@st.composite
def xml_trees(draw, depth=0):
    tag = draw(tag_names)
    attrs = " ".join(f'{k}="{v}"' for k, v in draw(attributes).items())
    children = draw(st.lists(xml_trees(depth + 1), max_size=0 if depth > 2 else 4))
    return f"<{tag} {attrs}>{''.join(children)}</{tag}>"


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(config=xml_trees() | st.text(max_size=200))
def test_fuzzed_label_configs_raise_only_config_error(config):
    try:
        schema = parse_label_config(config)
    except ConfigError:
        return
    assert schema.output in schema.controls
    assert schema.labels and all(label in schema.labels for label in schema.output.labels)
