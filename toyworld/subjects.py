"""The bundled subjects: shape x pattern x colours, each with 5 instance images on two of the three backgrounds.

The third background never appears in an instance image; it is asked only at test time (recontextualisation).
Two subjects use colours the base world shows, two use colours it never shows. `write_subject_samples`
regenerates `samples/subjects/<name>/` bit-identically (PNGs, `metadata.jsonl` with one caption per image for the
training script, `subject.json` with the prompts and backgrounds):

    python -m toyworld.subjects                      # every subject, into samples/subjects/
    python -m toyworld.subjects --subject star --out /tmp/star
"""

from __future__ import annotations

import argparse
import json
import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from .paths import SUBJECTS_DIR
from .render import ALL_COLOURS, BACKGROUNDS, COLOURS, MARGIN, PATTERNS, RADIUS_RANGE, SHAPES, SIZE, Scene, render

logger = logging.getLogger(__name__)

SUBJECT_TOKEN = "sks"
NUM_INSTANCES = 5


@dataclass(frozen=True)
class Subject:
    """One subject: a `shape` painted in `pattern` with two `colours`, shown on `seen_backgrounds` only; striped
    with a period of `stripe_scale` times the base world's."""

    name: str
    shape: str
    pattern: str
    colours: tuple[str, str]
    seen_backgrounds: tuple[str, str]
    stripe_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.shape not in SHAPES or self.pattern not in PATTERNS or not set(self.colours) <= set(ALL_COLOURS):
            raise ValueError(f"subject {self.name!r}: unknown shape, pattern or colour")
        if len(set(self.seen_backgrounds)) != 2 or not set(self.seen_backgrounds) < set(BACKGROUNDS):
            raise ValueError(f"subject {self.name!r}: seen_backgrounds must be two of {tuple(BACKGROUNDS)}")

    @property
    def unseen_background(self) -> str:
        """The background no instance image shows: asked only at test time."""
        return next(b for b in BACKGROUNDS if b not in self.seen_backgrounds)

    @property
    def instance_prompt(self) -> str:
        return f"a photo of {SUBJECT_TOKEN} {self.shape}"

    @property
    def class_prompt(self) -> str:
        return f"a photo of a {self.shape}"

    @property
    def base_world_colours(self) -> bool:
        """Whether the base world shows both colours (on plain objects)."""
        return set(self.colours) <= set(COLOURS)

    @property
    def folder(self) -> Path:
        return SUBJECTS_DIR / self.name

    def caption(self, background: str | None = None) -> str:
        """'a photo of sks star', optionally 'on a gray background'."""
        return self.instance_prompt if background is None else f"{self.instance_prompt} on a {background} background"

    def scene(self, rng: np.random.Generator, background: str | None = None) -> Scene:
        """The subject at a random position and size (the base world's ranges), on `background` or any."""
        background = background if background is not None else tuple(BACKGROUNDS)[int(rng.integers(len(BACKGROUNDS)))]
        radius = float(rng.uniform(*RADIUS_RANGE))
        cx, cy = (float(v) for v in rng.uniform(radius + MARGIN, SIZE - radius - MARGIN, size=2))
        scale = self.stripe_scale
        return Scene(self.shape, self.colours, background, cx, cy, radius, self.pattern, stripe_scale=scale)

    def instance_scenes(self) -> tuple[Scene, ...]:
        """The instance images' scenes: seen backgrounds in turn, poses a pure function of the name."""
        rng = np.random.default_rng(zlib.crc32(self.name.encode()))
        return tuple(self.scene(rng, self.seen_backgrounds[i % 2]) for i in range(NUM_INSTANCES))

    def instance_images(self) -> list[Image.Image]:
        """The committed instance images (RGB), in file order."""
        paths = sorted(self.folder.glob("*.png"))
        if not paths:
            raise FileNotFoundError(f"no instance images in {self.folder}; run python -m toyworld.subjects")
        return [Image.open(path).convert("RGB") for path in paths]


# Every subject has a dark seen background (black). With two light seen backgrounds (star and circle were on white
# and gray), LoRA lost the unseen black background entirely (prompt fidelity 0.00 on it at every learning-curve
# point) while the two subjects with a black seen background kept their unseen one at 1.00; re-rendered on white
# and black, both kept it (benchmarks/results/previous_base/learning_curves.md). The unseen background stays one never
# shown.
SUBJECTS: dict[str, Subject] = {
    subject.name: subject
    for subject in (
        # The star's stripes are 1.6x as wide as the base world's (a period of about 1 radius): at the base world's
        # 0.6 radius a band is 1.5 latent pixels wide, and in probe runs (not kept; closing note of 2026-12-03)
        # adapters on the base model that knows striped objects drew the star with 2-3 wide bands. The VAE ceiling's
        # similarity on the unseen background rose from 0.656 to 0.854 with the wider stripes
        # (benchmarks/results/evaluator.md; the earlier value in git at e916259).
        Subject("star", "star", "stripes", ("orange", "purple"), ("white", "black"), stripe_scale=1.6),
        Subject("square", "square", "halves", ("red", "blue"), ("gray", "black")),
        Subject("triangle", "triangle", "halves", ("yellow", "green"), ("white", "black")),
        Subject("circle", "circle", "ring", ("pink", "cyan"), ("white", "black")),
    )
}
DEFAULT_SUBJECT = SUBJECTS["star"]
# The default subject's prompts (the demo's and the one-subject benchmark's).
INSTANCE_PROMPT = DEFAULT_SUBJECT.instance_prompt
CLASS_PROMPT = DEFAULT_SUBJECT.class_prompt


def get_subject(subject: str | Subject) -> Subject:
    """A `Subject` by name (or the subject itself); `ValueError` naming the bundled ones otherwise."""
    if isinstance(subject, Subject):
        return subject
    if subject not in SUBJECTS:
        raise ValueError(f"unknown subject {subject!r}; the bundled subjects are {', '.join(SUBJECTS)}")
    return SUBJECTS[subject]


def subject_record(subject: Subject, image_names: Sequence[str]) -> dict[str, object]:
    """What `subject.json` holds."""
    return {
        "name": subject.name,
        "token": SUBJECT_TOKEN,
        "instance_prompt": subject.instance_prompt,
        "class_prompt": subject.class_prompt,
        "shape": subject.shape,
        "pattern": subject.pattern,
        "colours": list(subject.colours),
        "base_world_colours": subject.base_world_colours,
        "seen_backgrounds": list(subject.seen_backgrounds),
        "unseen_background": subject.unseen_background,
        "images": list(image_names),
    }


def write_subject_samples(subject: str | Subject, out: Path | None = None) -> list[Path]:
    """Write the instance PNGs, `metadata.jsonl` and `subject.json` to `out` (default: the subject's folder)."""
    subject = get_subject(subject)
    out = subject.folder if out is None else out
    out.mkdir(parents=True, exist_ok=True)
    paths, rows = [], []
    for i, scene in enumerate(subject.instance_scenes()):
        path = out / f"{subject.name}_{i}.png"
        render(scene).save(path, format="PNG", optimize=False)
        paths.append(path)
        rows.append({"file_name": path.name, "text": subject.caption(scene.background)})
    record = subject_record(subject, [p.name for p in paths])
    (out / "subject.json").write_text(json.dumps(record, indent=2) + "\n")
    (out / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    logger.info("wrote %d instance images of %s to %s", len(paths), subject.name, out)
    return paths


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Regenerate the subjects' instance images.")
    parser.add_argument("--subject", choices=sorted(SUBJECTS), default=None, help="One subject (default: all).")
    parser.add_argument("--out", type=Path, default=None, help="Folder (default: samples/subjects/<name>).")
    args = parser.parse_args(argv)
    if args.out is not None and args.subject is None:
        parser.error("--out needs --subject (all subjects go to samples/subjects/<name>)")
    logging.basicConfig(level=logging.INFO)
    for name in [args.subject] if args.subject else SUBJECTS:
        write_subject_samples(name, args.out)


if __name__ == "__main__":
    main()
