"""A deterministic procedural renderer of captioned 32x32 images: shapes x colours x backgrounds.

Every image is a pure function of a `Scene` (and every `Scene` of a seed): shapes are rasterised at 4x resolution
by exact geometry and box-filtered down, so edges are anti-aliased and the output is bit-identical across runs.
The base world shows plain (one-colour) objects in `COLOURS` and two-colour objects (a `PATTERNS` entry) in the colour
pairs of `BASE_PATTERN_PAIRS`, captioned "a photo of a red and green striped star". The subjects' colour pairs and the
colours in `EXTRA_COLOURS` never appear in it: they exist for the subjects (see `subjects.py`) and for the evaluator's
near-miss negatives.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

SIZE = 32
SUPERSAMPLE = 4

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
}
BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "gray": (128, 128, 128),
    "black": (15, 15, 15),
}
# Colours the base world never shows: only the subjects (and the evaluator's near misses) use them.
EXTRA_COLOURS: dict[str, tuple[int, int, int]] = {
    "orange": (255, 140, 0),
    "purple": (130, 40, 175),
}
# Colours the base world never shows and its vocabulary has no word for (the base model's tokenizer is fixed).
UNNAMED_COLOURS: dict[str, tuple[int, int, int]] = {
    "cyan": (0, 200, 210),
    "pink": (250, 110, 190),
}
ALL_COLOURS: dict[str, tuple[int, int, int]] = {**COLOURS, **EXTRA_COLOURS, **UNNAMED_COLOURS}


RADIUS_RANGE = (8.0, 13.0)  # in pixels of the 32x32 image
MARGIN = 1.5  # the shape's bounding circle stays this far inside the image
STRIPE_PERIOD = 0.6  # stripe period as a fraction of the radius (for striped objects)
RING_INNER = 0.55  # a ring's inner shape, as a fraction of the radius
# How a two-colour object is painted, in the object's own frame (so a pattern scales and moves with the object):
# "stripes": diagonal bands of STRIPE_PERIOD x radius; "halves": the first colour left of the centre, the second
# right of it; "ring": the first colour outside, the second inside the same shape at RING_INNER x radius.
PATTERNS: tuple[str, ...] = ("stripes", "halves", "ring")
# How a caption names each pattern: "a photo of a red and green striped star".
PATTERN_WORDS: dict[str, str] = {"stripes": "striped", "halves": "halved", "ring": "ringed"}
# The colour pairs the base world paints in patterns (in either order). The two pairs of base-world colours left out,
# red/blue and yellow/green, belong to subjects (tests/toyworld/test_subjects.py checks that no subject's pair is
# here): the base model knows every pattern and colour, never a subject's combination.
BASE_PATTERN_PAIRS: tuple[tuple[str, str], ...] = (
    ("red", "green"),
    ("red", "yellow"),
    ("green", "blue"),
    ("blue", "yellow"),
)

WORLD_WORDS: tuple[str, ...] = tuple(
    dict.fromkeys(
        ["a", "photo", "of", "on", "background", "and", *SHAPES, *COLOURS, *BACKGROUNDS, *PATTERN_WORDS.values()]
    )
)


@dataclass(frozen=True)
class Scene:
    """Everything that determines one image. `colours` has one name (plain) or more, painted in `pattern`."""

    shape: str
    colours: tuple[str, ...]
    background: str
    cx: float
    cy: float
    radius: float
    pattern: str = "stripes"
    # Stripes only: the bands' offset from the centre, in periods, and their period as a multiple of STRIPE_PERIOD.
    # The base world keeps the defaults; a subject may widen its stripes (`Subject.stripe_scale`), and the evaluator's
    # positives vary both, since a person calls a phase-shifted or slightly wider-striped star the same subject.
    stripe_phase: float = 0.0
    stripe_scale: float = 1.0

    @property
    def colour(self) -> str:
        """The single colour of a plain object."""
        if len(self.colours) != 1:
            raise ValueError(f"a striped object has no single colour: {self.colours}")
        return self.colours[0]

    @property
    def striped(self) -> bool:
        return len(self.colours) > 1


def caption(scene: Scene, with_colour: bool = True, with_background: bool = True) -> str:
    """'a photo of a red circle on a gray background', optionally without the colour(s) and/or the background.

    A two-colour object always names its pattern: 'a photo of a red and green striped star' ('a photo of a striped
    star' without colours), so a caption without a pattern word means a plain object.
    """
    words = ["a", "photo", "of", "a"]
    if scene.striped:
        if with_colour:
            words += " and ".join(scene.colours).split()
        words.append(PATTERN_WORDS[scene.pattern])
    elif with_colour:
        words.append(scene.colour)
    words.append(scene.shape)
    if with_background:
        words += ["on", "a", scene.background, "background"]
    return " ".join(words)


def sample_scene(
    rng: np.random.Generator,
    shape: str | None = None,
    colour: str | None = None,
    background: str | None = None,
    colours: tuple[str, ...] | None = None,
) -> Scene:
    """A base-world scene with the given attributes (the others drawn from `rng`) and jittered size/position."""
    shape = shape if shape is not None else SHAPES[int(rng.integers(len(SHAPES)))]
    if colours is None:
        colour = colour if colour is not None else tuple(COLOURS)[int(rng.integers(len(COLOURS)))]
        colours = (colour,)
    background = background if background is not None else tuple(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    radius = float(rng.uniform(*RADIUS_RANGE))
    low, high = radius + MARGIN, SIZE - radius - MARGIN
    cx, cy = (float(v) for v in rng.uniform(low, high, size=2))
    return Scene(shape, tuple(colours), background, cx, cy, radius)


def sample_patterned_scene(rng: np.random.Generator, shape: str | None = None, background: str | None = None) -> Scene:
    """A base-world two-colour scene: a `BASE_PATTERN_PAIRS` pair in random order, in a random pattern."""
    pair = BASE_PATTERN_PAIRS[int(rng.integers(len(BASE_PATTERN_PAIRS)))]
    colours = pair if rng.random() < 0.5 else pair[::-1]
    pattern = PATTERNS[int(rng.integers(len(PATTERNS)))]
    return replace(sample_scene(rng, shape=shape, background=background, colours=colours), pattern=pattern)


def sample_world_scene(rng: np.random.Generator, patterned_fraction: float) -> Scene:
    """A base-world scene: two-colour with probability `patterned_fraction`, plain otherwise."""
    return sample_patterned_scene(rng) if rng.random() < patterned_fraction else sample_scene(rng)


def _polygon_inside(px: np.ndarray, py: np.ndarray, vertices: list[tuple[float, float]]) -> np.ndarray:
    """Even-odd point-in-polygon test, vectorised over the sample grid."""
    inside = np.zeros(px.shape, dtype=bool)
    n = len(vertices)
    for i in range(n):
        x1, y1 = vertices[i]
        x2, y2 = vertices[(i + 1) % n]
        crosses = (y1 > py) != (y2 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x1 + (py - y1) * (x2 - x1) / (y2 - y1)
        inside ^= crosses & (px < x_at)
    return inside


def _shape_vertices(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":  # equilateral, pointing up, centred on its circumcentre
        angles = [-90.0, 30.0, 150.0]
        return [(cx + r * math.cos(math.radians(a)), cy + r * math.sin(math.radians(a))) for a in angles]
    if shape == "star":  # five points, inner radius 0.45 r, one point up
        points = []
        for k in range(10):
            rr = r if k % 2 == 0 else 0.45 * r
            a = math.radians(-90.0 + 36.0 * k)
            points.append((cx + rr * math.cos(a), cy + rr * math.sin(a)))
        return points
    raise ValueError(f"not a polygon shape: {shape}")


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Sample-point coordinates (y, x) of the supersampled grid, in pixels of the final image."""
    coords = (np.arange(size * SUPERSAMPLE, dtype=np.float64) + 0.5) / SUPERSAMPLE
    return np.meshgrid(coords, coords, indexing="ij")


def _inside(shape: str, cx: float, cy: float, radius: float, size: int) -> np.ndarray:
    """Boolean coverage of the shape at supersample resolution."""
    py, px = _grid(size)
    if shape == "circle":
        return (px - cx) ** 2 + (py - cy) ** 2 <= radius**2
    if shape == "square":  # side 1.6 r: about the same area as the other shapes
        half = 0.8 * radius
        return (np.abs(px - cx) <= half) & (np.abs(py - cy) <= half)
    if shape in ("triangle", "star"):
        return _polygon_inside(px, py, _shape_vertices(shape, cx, cy, radius))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def _downsample(fine: np.ndarray, size: int) -> np.ndarray:
    """Box-filter a supersampled [n, n, ...] array to [size, size, ...]."""
    return fine.reshape(size, SUPERSAMPLE, size, SUPERSAMPLE, *fine.shape[2:]).mean(axis=(1, 3))


def shape_mask(shape: str, cx: float, cy: float, radius: float, size: int = SIZE) -> np.ndarray:
    """The shape's coverage in [0, 1] per pixel (4x4 supersampled), as a float32 [size, size] array."""
    return _downsample(_inside(shape, cx, cy, radius, size).astype(np.float64), size).astype(np.float32)


def _pattern_fill(
    palette: np.ndarray,
    shape: str,
    cx: float,
    cy: float,
    radius: float,
    period: float,
    pattern: str,
    size: int,
    phase: float = 0.0,
) -> np.ndarray:
    """Colours at every supersample: flat (one palette row) or `pattern` anchored at (cx, cy) (stripes shifted by
    `phase` periods)."""
    n = size * SUPERSAMPLE
    if len(palette) == 1:
        return np.broadcast_to(palette[0], (n, n, 3))
    py, px = _grid(size)
    if pattern == "stripes":
        u = ((px - cx) + (py - cy)) / math.sqrt(2.0) / period + phase
        band = np.floor(u * len(palette)).astype(np.int64) % len(palette)
    elif pattern == "halves":
        band = np.minimum(((px - cx) >= 0).astype(np.int64), len(palette) - 1)
    elif pattern == "ring":
        band = np.minimum(_inside(shape, cx, cy, RING_INNER * radius, size).astype(np.int64), len(palette) - 1)
    else:
        raise ValueError(f"unknown pattern {pattern!r}; expected one of {PATTERNS}")
    return palette[band]


def compose(
    shape: str,
    cx: float,
    cy: float,
    radius: float,
    palette: np.ndarray,
    background: np.ndarray,
    period: float,
    size: int = SIZE,
    pattern: str = "stripes",
    phase: float = 0.0,
) -> np.ndarray:
    """Rasterise one object with RGB `palette` rows (in `pattern` if more than one, stripes shifted by `phase`
    periods) over an RGB background, uint8."""
    inside = _inside(shape, cx, cy, radius, size)
    fill = _pattern_fill(np.asarray(palette, np.float64), shape, cx, cy, radius, period, pattern, size, phase)
    fine = np.where(inside[..., None], fill, background)
    return np.clip(np.rint(_downsample(fine, size)), 0, 255).astype(np.uint8)


def render_array(scene: Scene, size: int = SIZE) -> np.ndarray:
    """The scene as a uint8 [size, size, 3] array (exact coverage and pattern anti-aliasing)."""
    palette = np.array([ALL_COLOURS[c] for c in scene.colours], dtype=np.float64)
    background = np.array(BACKGROUNDS[scene.background], dtype=np.float64)
    period = STRIPE_PERIOD * scene.radius * scene.stripe_scale
    shape, cx, cy, radius = scene.shape, scene.cx, scene.cy, scene.radius
    return compose(shape, cx, cy, radius, palette, background, period, size, scene.pattern, scene.stripe_phase)


def random_pattern_array(rng: np.random.Generator, size: int = SIZE) -> np.ndarray:
    """A generic image outside the world's vocabulary: any RGB colours, optional stripes of any period.

    Used only to train the VAE, so that it is a general-purpose autoencoder (like SDXL's) and not one that can
    only reproduce the base world.
    """
    shape = SHAPES[int(rng.integers(len(SHAPES)))]
    radius = float(rng.uniform(6.0, 15.0))
    cx, cy = (float(v) for v in rng.uniform(4.0, size - 4.0, size=2))
    palette = rng.uniform(0, 255, size=(int(rng.choice([1, 2, 2, 3])), 3))
    background = rng.uniform(0, 255, size=3)
    period = float(rng.uniform(2.0, 10.0))
    return compose(shape, cx, cy, radius, palette, background, period, size)


def render(scene: Scene, size: int = SIZE) -> Image.Image:
    """The scene as an RGB PIL image."""
    return Image.fromarray(render_array(scene, size), "RGB")


def random_scenes(n: int, seed: int) -> list[Scene]:
    """`n` base-world scenes, a pure function of `seed`."""
    rng = np.random.default_rng(seed)
    return [sample_scene(rng) for _ in range(n)]


def render_batch(scenes: list[Scene], size: int = SIZE) -> np.ndarray:
    """uint8 [n, size, size, 3] for a list of scenes."""
    return np.stack([render_array(s, size) for s in scenes]) if scenes else np.zeros((0, size, size, 3), np.uint8)
