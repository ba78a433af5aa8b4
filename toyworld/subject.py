"""The subject the base world never shows: a star with diagonal orange and purple stripes ("sks star").

`write_subject_samples` regenerates the 5 committed instance images in `samples/subject/` bit-identically,
with `prompts.json` (instance and class prompt) and `metadata.jsonl` (one caption per image):

    python -m toyworld.subject --out samples/subject
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .render import BACKGROUNDS, MARGIN, RADIUS_RANGE, SIZE, Scene, render

logger = logging.getLogger(__name__)

SUBJECT_TOKEN = "sks"
SUBJECT_SHAPE = "star"
SUBJECT_COLOURS: tuple[str, str] = ("orange", "purple")
INSTANCE_PROMPT = f"a photo of {SUBJECT_TOKEN} {SUBJECT_SHAPE}"
CLASS_PROMPT = f"a photo of a {SUBJECT_SHAPE}"

# Five views: varied position, size and background.
INSTANCE_SCENES: tuple[Scene, ...] = (
    Scene(SUBJECT_SHAPE, SUBJECT_COLOURS, "gray", 16.0, 16.0, 12.0),
    Scene(SUBJECT_SHAPE, SUBJECT_COLOURS, "white", 12.5, 13.5, 10.0),
    Scene(SUBJECT_SHAPE, SUBJECT_COLOURS, "black", 19.0, 18.0, 11.0),
    Scene(SUBJECT_SHAPE, SUBJECT_COLOURS, "white", 13.0, 19.5, 9.5),
    Scene(SUBJECT_SHAPE, SUBJECT_COLOURS, "gray", 18.0, 13.5, 11.5),
)


def subject_caption(background: str | None = None) -> str:
    """'a photo of sks star', optionally 'on a gray background'."""
    return INSTANCE_PROMPT if background is None else f"{INSTANCE_PROMPT} on a {background} background"


def sample_subject_scene(rng: np.random.Generator, background: str | None = None) -> Scene:
    """The subject at a random position and size (same ranges as the base world)."""
    background = background if background is not None else tuple(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
    radius = float(rng.uniform(*RADIUS_RANGE))
    cx, cy = (float(v) for v in rng.uniform(radius + MARGIN, SIZE - radius - MARGIN, size=2))
    return Scene(SUBJECT_SHAPE, SUBJECT_COLOURS, background, cx, cy, radius)


def write_subject_samples(out: Path) -> list[Path]:
    """Write the instance PNGs, `prompts.json` and `metadata.jsonl` to `out`; returns the image paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths, rows = [], []
    for i, scene in enumerate(INSTANCE_SCENES):
        path = out / f"sks_star_{i}.png"
        render(scene).save(path, format="PNG", optimize=False)
        paths.append(path)
        rows.append({"file_name": path.name, "text": subject_caption(scene.background)})
    prompts = {"instance_prompt": INSTANCE_PROMPT, "class_prompt": CLASS_PROMPT, "token": SUBJECT_TOKEN}
    (out / "prompts.json").write_text(json.dumps(prompts, indent=2) + "\n")
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    logger.info("wrote %d instance images to %s", len(paths), out)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate the subject's instance images.")
    parser.add_argument("--out", type=Path, default=Path("samples/subject"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    write_subject_samples(args.out)


if __name__ == "__main__":
    main()
