"""The renderer: deterministic, captioned, and the base world never shows the subject's look."""

import hashlib

import numpy as np
import pytest

from toyworld.classifiers import shape_batch
from toyworld.render import (
    BACKGROUNDS,
    BASE_PATTERN_PAIRS,
    COLOURS,
    EXTRA_COLOURS,
    PATTERNS,
    SHAPES,
    SIZE,
    Scene,
    caption,
    random_pattern_array,
    random_scenes,
    render,
    render_array,
    render_batch,
    sample_scene,
    sample_world_scene,
    shape_mask,
)


def test_same_seed_same_pixels_and_other_seed_other_pixels():
    first, again, other = (render_batch(random_scenes(24, seed)) for seed in (7, 7, 8))
    assert first.dtype == np.uint8 and first.shape == (24, SIZE, SIZE, 3)
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_captions_name_colour_shape_and_background():
    scene = Scene("circle", ("red",), "gray", 16.0, 16.0, 10.0)
    assert caption(scene) == "a photo of a red circle on a gray background"
    assert caption(scene, with_background=False) == "a photo of a red circle"
    assert caption(scene, with_colour=False) == "a photo of a circle on a gray background"
    assert caption(scene, with_colour=False, with_background=False) == "a photo of a circle"


def test_two_colour_captions_name_both_colours_and_the_pattern():
    scene = Scene("star", ("red", "green"), "white", 16.0, 16.0, 10.0, "halves")
    assert caption(scene) == "a photo of a red and green halved star on a white background"
    assert caption(scene, with_colour=False, with_background=False) == "a photo of a halved star"
    ring = Scene("circle", ("blue", "yellow"), "black", 16.0, 16.0, 10.0, "ring")
    assert caption(ring, with_background=False) == "a photo of a blue and yellow ringed circle"


def test_base_world_paints_every_pattern_in_its_colour_pairs_only():
    rng = np.random.default_rng(1)
    scenes = [sample_world_scene(rng, 0.3) for _ in range(1200)]
    patterned = [s for s in scenes if s.striped]
    assert 0.25 < len(patterned) / len(scenes) < 0.35
    assert {s.pattern for s in patterned} == set(PATTERNS)
    assert {tuple(sorted(s.colours)) for s in patterned} == {tuple(sorted(p)) for p in BASE_PATTERN_PAIRS}
    assert {s.colours for s in patterned} >= {p[::-1] for p in BASE_PATTERN_PAIRS}  # both orders
    assert {s.shape for s in patterned} == set(SHAPES)
    assert all(set(s.colours) <= set(COLOURS) for s in scenes)
    assert not any(s.striped for s in (sample_world_scene(rng, 0.0) for _ in range(100)))


def test_pixels_match_the_scene():
    scene = Scene("square", ("blue",), "white", 16.0, 16.0, 10.0)
    image = render_array(scene)
    assert tuple(image[0, 0]) == BACKGROUNDS["white"]
    assert tuple(image[16, 16]) == COLOURS["blue"]
    assert render(scene).size == (SIZE, SIZE)


@pytest.mark.parametrize("shape", SHAPES)
def test_shapes_have_comparable_area_and_stay_inside(shape):
    mask = shape_mask(shape, 16.0, 16.0, 12.0)
    assert 0.1 < mask.mean() < 0.5
    assert mask[0].sum() == mask[-1].sum() == mask[:, 0].sum() == mask[:, -1].sum() == 0


def test_base_world_covers_every_attribute_with_plain_objects_only():
    rng = np.random.default_rng(0)
    scenes = [sample_scene(rng) for _ in range(600)]
    assert {s.shape for s in scenes} == set(SHAPES)
    assert {s.colour for s in scenes} == set(COLOURS)
    assert {s.background for s in scenes} == set(BACKGROUNDS)
    assert {(s.shape, s.colour) for s in scenes if s.shape == "star"} == {("star", c) for c in COLOURS}
    assert not any(s.striped for s in scenes)
    assert not set(EXTRA_COLOURS) & set(COLOURS)
    for s in scenes:  # the whole object is inside the frame
        assert s.radius + 1 <= s.cx <= SIZE - s.radius - 1 and s.radius + 1 <= s.cy <= SIZE - s.radius - 1


def test_base_world_renders_are_unchanged_by_the_subject_patterns():
    """The bundled VAE and shape CNN were trained on these exact pixels: adding patterns must not move one."""
    digest = hashlib.sha256(render_batch(random_scenes(64, 7)).tobytes())
    rng = np.random.default_rng(3)
    digest.update(np.stack([random_pattern_array(rng) for _ in range(16)]).tobytes())
    images, labels = shape_batch(np.random.default_rng([11, 0]), 32)
    digest.update(images.tobytes())
    digest.update(labels.tobytes())
    assert digest.hexdigest() == "dcbf683e791f698a6aa38a703318c3d1ace8a7383e2a366db0986b60aa29445f"


def test_two_colour_patterns_paint_the_object_in_its_own_frame():
    red, blue = COLOURS["red"], COLOURS["blue"]
    halves = render_array(Scene("square", ("red", "blue"), "white", 16.0, 16.0, 10.0, "halves"))
    assert tuple(halves[16, 12]) == red and tuple(halves[16, 20]) == blue
    ring = render_array(Scene("circle", ("red", "blue"), "black", 16.0, 16.0, 12.0, "ring"))
    assert tuple(ring[16, 16]) == blue and tuple(ring[16, 5]) == red  # centre inside 0.55 r, edge outside
    assert tuple(ring[1, 1]) == BACKGROUNDS["black"]
    moved = render_array(Scene("circle", ("red", "blue"), "black", 12.0, 14.0, 12.0 * 0.9, "ring"))
    assert tuple(moved[14, 12]) == blue  # the pattern follows the object
    with pytest.raises(ValueError, match="unknown pattern 'dots'"):
        render_array(Scene("circle", ("red", "blue"), "black", 16.0, 16.0, 10.0, "dots"))
