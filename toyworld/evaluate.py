"""An evaluator for generated toy-world images that knows nothing of how an image was made.

- **background**: exact measure: the median colour of the 2-pixel border, nearest of `BACKGROUNDS`;
- **colour**: exact measure: the median colour of the pixels far from that background, nearest of `COLOURS`;
- **shape**: a tiny CNN trained on ground-truth renders (`classifiers.py`);
- **subject probability**: a tiny CNN over `SUBJECT_CLASSES` (none, then every bundled subject), trained on the
  subjects, the base world and near misses (a subject's shape plain or in other colours, its colours and pattern on
  other shapes, its shape and colours in another pattern): "is it this subject" (DreamBooth's classifier view);
- **subject similarity**: the analogue of DINO / CLIP-I: the cosine similarity of the object's appearance
  features (`appearance_features`: the masked crop's colours and its pattern, 16x16) to those of the subject's
  instance images, averaged over them;
- **background fidelity** split by the subject's seen backgrounds and the unseen one (recontextualisation).

The CNN weights are read from `assets/toy-evaluator/` (written by `train_evaluator`, deterministic).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .classifiers import (
    SUBJECT_CLASSES,
    TinyCNN,
    heldout_accuracy,
    one_subject_accuracy,
    shape_batch,
    subject_batch,
    to_unit,
    train_classifier,
)
from .paths import EVALUATOR_DIR
from .render import BACKGROUNDS, COLOURS, PATTERN_WORDS, SHAPES
from .subjects import DEFAULT_SUBJECT, SUBJECT_TOKEN, SUBJECTS, Subject, get_subject

logger = logging.getLogger(__name__)

DEFAULT_DIR = EVALUATOR_DIR
SHAPE_SEED, SUBJECT_SEED = 11, 12
FOREGROUND_FRACTION = 0.5  # a pixel is the object's if its distance from the background exceeds this x the max
MIN_OBJECT_DISTANCE = 40.0  # below this (0-255 units) the image has no visible object
ImageLike = Image.Image | np.ndarray
CLASSES_KEY = "classes"  # safetensors metadata of subject.safetensors: the JSON list of its classes


def as_uint8(images: Sequence[ImageLike] | np.ndarray) -> np.ndarray:
    """PIL images or arrays -> uint8 [n, 32, 32, 3] (other sizes are resized with a box filter)."""
    out = []
    for image in images:
        pil = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
        pil = pil.convert("RGB")
        if pil.size != (32, 32):
            pil = pil.resize((32, 32), Image.Resampling.BOX)
        out.append(np.asarray(pil, dtype=np.uint8))
    return np.stack(out)


def _nearest(colours: np.ndarray, palette: dict[str, tuple[int, int, int]]) -> list[str]:
    names = list(palette)
    table = np.array([palette[n] for n in names], dtype=np.float64)
    distances = np.linalg.norm(colours[:, None, :] - table[None], axis=-1)
    return [names[i] for i in distances.argmin(axis=1)]


def background_colours(images: np.ndarray) -> np.ndarray:
    """Median RGB of each image's 2-pixel border, float [n, 3]."""
    border = np.concatenate(
        [
            images[:, :2].reshape(len(images), -1, 3),
            images[:, -2:].reshape(len(images), -1, 3),
            images[:, 2:-2, :2].reshape(len(images), -1, 3),
            images[:, 2:-2, -2:].reshape(len(images), -1, 3),
        ],
        axis=1,
    )
    return np.median(border.astype(np.float64), axis=1)


def foreground_masks(images: np.ndarray) -> np.ndarray:
    """bool [n, h, w]: pixels much farther from the background colour than the anti-aliased edge."""
    distance = np.linalg.norm(images.astype(np.float64) - background_colours(images)[:, None, None], axis=-1)
    peak = distance.reshape(len(images), -1).max(axis=1)
    masks = distance > FOREGROUND_FRACTION * peak[:, None, None]
    masks[peak < MIN_OBJECT_DISTANCE] = False
    return masks


def object_colours(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Median RGB of each object's pixels [n, 3] and whether an object was found [n]."""
    masks = foreground_masks(images)
    found = masks.any(axis=(1, 2))
    colours = np.array(
        [
            np.median(img[m].astype(np.float64), axis=0) if m.any() else np.zeros(3)
            for img, m in zip(images, masks, strict=True)
        ]
    )
    return colours.reshape(len(images), 3), found


def appearance_features(images: np.ndarray, size: int = 16, pattern_weight: float = 2.0) -> torch.Tensor:
    """Per image, the object's bounding-box crop with the background masked out, resized to `size`, as two parts:
    colours centred at mid-gray (what colours, where) and colours minus the object's mean colour (the pattern,
    weighted by `pattern_weight`). float [n, 6 * size^2]; zeros where no object is visible."""
    masks = foreground_masks(images)
    features = []
    for image, mask in zip(images, masks, strict=True):
        if not mask.any():
            features.append(torch.zeros(6 * size * size))
            continue
        ys, xs = np.nonzero(mask)
        y0, y1, x0, x1 = ys.min(), ys.max() + 1, xs.min(), xs.max() + 1
        pixels = torch.from_numpy(image[y0:y1, x0:x1].astype(np.float32) / 255.0).permute(2, 0, 1)
        weights = torch.from_numpy(mask[y0:y1, x0:x1].astype(np.float32))
        mean = (pixels * weights).sum(dim=(1, 2)) / weights.sum()
        parts = [(pixels - 0.5) * weights, pattern_weight * (pixels - mean[:, None, None]) * weights]
        resized = [F.interpolate(p[None], size=(size, size), mode="bilinear", antialias=True)[0] for p in parts]
        features.append(torch.cat([r.flatten() for r in resized]))
    return torch.stack(features)


def parse_prompt(prompt: str) -> dict[str, str | bool | None]:
    """The attributes a prompt asks for: shape, colour, background (None if unnamed) and whether the subject."""
    words = re.findall(r"[a-z]+", prompt.lower())
    background = next(
        (w for w, n in zip(words, [*words[1:], ""], strict=True) if w in BACKGROUNDS and n == "background"), None
    )
    return {
        "shape": next((w for w in words if w in SHAPES), None),
        # A two-colour prompt ("a red and green striped star") asks for no single colour.
        "colour": None if set(words) & set(PATTERN_WORDS.values()) else next((w for w in words if w in COLOURS), None),
        "background": background,
        "subject": SUBJECT_TOKEN in words,
    }


@dataclass
class ToyEvaluator:
    """Scores images; build with `ToyEvaluator.load()` (or `train_evaluator` to re-create the weights)."""

    shape_model: TinyCNN
    subject_model: TinyCNN

    @classmethod
    def load(cls, folder: Path = DEFAULT_DIR) -> ToyEvaluator:
        """The saved CNNs; `ValueError` in one sentence if they were trained for other subjects than the bundled."""
        with safe_open(str(folder / "subject.safetensors"), framework="pt") as handle:
            classes = tuple(json.loads((handle.metadata() or {}).get(CLASSES_KEY, "[]")))
        if classes != SUBJECT_CLASSES:
            raise ValueError(
                f"the evaluator in {folder} knows the subjects {list(classes[1:])}, not the bundled "
                f"{list(SUBJECT_CLASSES[1:])}; retrain it with python -m scripts.train_toy_evaluator"
            )
        shape_model, subject_model = TinyCNN(len(SHAPES)), TinyCNN(len(SUBJECT_CLASSES))
        shape_model.load_state_dict(load_file(folder / "shape.safetensors"))
        subject_model.load_state_dict(load_file(folder / "subject.safetensors"))
        return cls(shape_model.eval(), subject_model.eval())

    def backgrounds(self, images: Sequence[ImageLike] | np.ndarray) -> list[str]:
        return _nearest(background_colours(as_uint8(images)), BACKGROUNDS)

    def colours(self, images: Sequence[ImageLike] | np.ndarray) -> list[str]:
        colours, found = object_colours(as_uint8(images))
        return [name if ok else "none" for name, ok in zip(_nearest(colours, COLOURS), found, strict=True)]

    @torch.no_grad()
    def shapes(self, images: Sequence[ImageLike] | np.ndarray) -> list[str]:
        logits = self.shape_model(to_unit(as_uint8(images)))
        return [SHAPES[i] for i in logits.argmax(dim=1).tolist()]

    @torch.no_grad()
    def subject_probabilities(self, images: Sequence[ImageLike] | np.ndarray) -> np.ndarray:
        """P(class) over `SUBJECT_CLASSES` ("none", then each subject), float [n, classes]."""
        return self.subject_model(to_unit(as_uint8(images))).softmax(dim=1).numpy()

    def subject_probability(
        self, images: Sequence[ImageLike] | np.ndarray, subject: str | Subject = DEFAULT_SUBJECT
    ) -> np.ndarray:
        """P(the image shows `subject`), float [n]."""
        return self.subject_probabilities(images)[:, SUBJECT_CLASSES.index(get_subject(subject).name)]

    def subject_similarity(
        self, images: Sequence[ImageLike] | np.ndarray, references: Sequence[ImageLike] | np.ndarray | Subject
    ) -> np.ndarray:
        """Mean cosine similarity of each image's appearance features to the references' (or a subject's instance
        images), float [n]."""
        if isinstance(references, Subject):
            references = references.instance_images()
        a = F.normalize(appearance_features(as_uint8(images)), dim=1)
        b = F.normalize(appearance_features(as_uint8(references)), dim=1)
        return (a @ b.T).mean(dim=1).numpy()

    def prompt_fidelity(self, images: Sequence[ImageLike] | np.ndarray, prompts: Sequence[str]) -> dict[str, float]:
        """Per attribute, the fraction of images that show what their prompt names (unnamed attributes skipped)."""
        predicted = {
            "shape": self.shapes(images),
            "colour": self.colours(images),
            "background": self.backgrounds(images),
        }
        asked = [parse_prompt(p) for p in prompts]
        scores: dict[str, float] = {}
        for key, values in predicted.items():
            pairs = [(v, a[key]) for v, a in zip(values, asked, strict=True) if a[key] is not None]
            if pairs:
                scores[key] = float(np.mean([v == want for v, want in pairs]))
        return scores

    def background_fidelity(
        self,
        images: Sequence[ImageLike] | np.ndarray,
        prompts: Sequence[str],
        subject: str | Subject = DEFAULT_SUBJECT,
    ) -> dict[str, float]:
        """The fraction of images showing the background their prompt names, separately for the subject's seen
        backgrounds ("seen") and the one its instance images never show ("unseen"); a key only if asked."""
        subject = get_subject(subject)
        shown = self.backgrounds(images)
        asked = [parse_prompt(p)["background"] for p in prompts]
        groups = {"seen": subject.seen_backgrounds, "unseen": (subject.unseen_background,)}
        scores: dict[str, float] = {}
        for key, backgrounds in groups.items():
            hits = [b == want for b, want in zip(shown, asked, strict=True) if want in backgrounds]
            if hits:
                scores[key] = float(np.mean(hits))
        return scores

    def class_preservation(
        self, images: Sequence[ImageLike] | np.ndarray, subject: str | Subject = DEFAULT_SUBJECT
    ) -> float:
        """Fraction of images (from the class prompt) that are ordinary members of the subject's class: the
        subject's shape, and not the subject."""
        subject = get_subject(subject)
        shapes = np.array([s == subject.shape for s in self.shapes(images)])
        return float(((self.subject_probability(images, subject) < 0.5) & shapes).mean())


def train_evaluator(folder: Path = DEFAULT_DIR, steps: int = 1200, retrain_shape: bool = True) -> dict[str, float]:
    """Train the CNNs (deterministic), save them to `folder`, and return their held-out accuracies: the shape
    CNN's, the subject CNN's over all its classes, and per subject, "is it this subject" on a balanced set.

    With `retrain_shape=False` the shape CNN already in `folder` is kept (and measured again): its training data,
    the base world's renders, does not depend on the subjects."""
    folder.mkdir(parents=True, exist_ok=True)
    shape_path = folder / "shape.safetensors"
    if retrain_shape:
        shape_model = train_classifier(shape_batch, len(SHAPES), seed=SHAPE_SEED, steps=steps)
        save_file({k: v.contiguous() for k, v in shape_model.state_dict().items()}, shape_path)
    elif not shape_path.is_file():
        raise FileNotFoundError(f"no shape CNN to keep at {shape_path}; train it too (retrain_shape=True)")
    else:
        shape_model = TinyCNN(len(SHAPES))
        shape_model.load_state_dict(load_file(shape_path))
        shape_model.eval()
    subject_model = train_classifier(subject_batch, len(SUBJECT_CLASSES), seed=SUBJECT_SEED, steps=steps)
    save_file(
        {k: v.contiguous() for k, v in subject_model.state_dict().items()},
        folder / "subject.safetensors",
        metadata={CLASSES_KEY: json.dumps(list(SUBJECT_CLASSES))},
    )
    accuracies = {
        "shape": heldout_accuracy(shape_model, shape_batch, seed=SHAPE_SEED + 100),
        "shape_degraded": heldout_accuracy(shape_model, shape_batch, seed=SHAPE_SEED + 100, degraded=True),
        "subject": heldout_accuracy(subject_model, subject_batch, seed=SUBJECT_SEED + 100),
        "subject_degraded": heldout_accuracy(subject_model, subject_batch, seed=SUBJECT_SEED + 100, degraded=True),
    }
    for subject in SUBJECTS.values():
        for degraded in (False, True):
            key = f"subject:{subject.name}" + ("_degraded" if degraded else "")
            accuracies[key] = one_subject_accuracy(subject_model, subject, SUBJECT_SEED + 200, degraded=degraded)
    (folder / "heldout_accuracy.json").write_text(json.dumps(accuracies, indent=2) + "\n")
    return accuracies
