"""Tiny CNN classifiers trained only on ground-truth renders: shape (4 classes) and which subject, if any
(`SUBJECT_CLASSES`: "none", then every bundled subject).

Training is a pure function of the seed (batches are rendered per step from `numpy.random.default_rng([seed,
step])`), takes a few minutes per classifier on 2 shared CPU cores, and augments every batch with blur, noise,
contrast and colour jitter so that the classifiers also work on the slightly soft images a diffusion model
produces. The weights (about 160k parameters each, 0.6 MB) ship as safetensors under `assets/toy-evaluator/`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .render import (
    ALL_COLOURS,
    BACKGROUNDS,
    PATTERNS,
    SHAPES,
    SIZE,
    Scene,
    compose,
    render_array,
    sample_scene,
)
from .subjects import SUBJECTS, Subject

logger = logging.getLogger(__name__)

BatchFn = Callable[[np.random.Generator, int], tuple[np.ndarray, np.ndarray]]


class TinyCNN(nn.Module):
    """Three conv stages (32 -> 16 -> 8 -> 4), global average pooling, a linear head."""

    def __init__(self, num_classes: int, width: int = 24) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for out in (width, 2 * width, 4 * width):
            layers += [
                nn.Conv2d(channels, out, 3, padding=1),
                nn.GELU(),
                nn.Conv2d(out, out, 3, padding=1),
                nn.GELU(),
                nn.MaxPool2d(2),
            ]
            channels = out
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(channels, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """images: float [n, 3, 32, 32] in [0, 1] -> logits [n, num_classes]."""
        return self.head(self.features(images - 0.5).mean(dim=(2, 3)))


def to_unit(images: np.ndarray) -> torch.Tensor:
    """uint8 [n, h, w, 3] -> float [n, 3, h, w] in [0, 1]."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255.0


def degrade(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random blur (sigma 0-1.5 px), gaussian noise (std 0-0.05), contrast/brightness jitter (+-8%) and a
    per-channel gain (+-5%): the softness and colour drift of a diffusion model's output."""
    n = images.shape[0]
    sigma = torch.rand(n, generator=generator) * 1.5 + 1e-3
    offsets = torch.arange(-2, 3, dtype=torch.float32)
    kernel_1d = torch.exp(-(offsets[None, :] ** 2) / (2 * sigma[:, None] ** 2))
    kernel_1d = kernel_1d / kernel_1d.sum(dim=1, keepdim=True)
    kernel = (kernel_1d[:, :, None] * kernel_1d[:, None, :])[:, None].repeat_interleave(3, dim=0)
    padded = F.pad(images.reshape(1, n * 3, SIZE, SIZE), (2, 2, 2, 2), mode="replicate")
    blurred = F.conv2d(padded, kernel, groups=n * 3).reshape(n, 3, SIZE, SIZE)
    contrast = 1.0 + (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 0.16
    brightness = (torch.rand(n, 1, 1, 1, generator=generator) - 0.5) * 0.16
    gain = 1.0 + (torch.rand(n, 3, 1, 1, generator=generator) - 0.5) * 0.1
    noise = torch.randn(images.shape, generator=generator) * torch.rand(n, 1, 1, 1, generator=generator) * 0.05
    return (((blurred - 0.5) * contrast + 0.5) * gain + brightness + noise).clamp(0.0, 1.0)


def shape_batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Half base-world renders, half shapes in arbitrary colours and stripes (so stripes do not hide the shape)."""
    labels = rng.integers(len(SHAPES), size=n)
    images = []
    for i, label in enumerate(labels):
        scene = sample_scene(rng, shape=SHAPES[label])
        if i % 2 == 0:
            images.append(render_array(scene))
        else:
            palette = rng.uniform(0, 255, size=(int(rng.choice([1, 2])), 3))
            background = rng.uniform(0, 255, size=3)
            if np.linalg.norm(palette.mean(0) - background) < 90:  # keep the object visible
                background = 255.0 - background
            period = float(rng.uniform(3.0, 9.0))
            images.append(compose(scene.shape, scene.cx, scene.cy, scene.radius, palette, background, period))
    return np.stack(images), labels


SUBJECT_CLASSES: tuple[str, ...] = ("none", *SUBJECTS)  # the subject model's classes: not a subject, then each


def subject_label(shape: str, pattern: str, colours: tuple[str, ...]) -> int:
    """The class of an object: 1 + the index of the subject it is, or 0 (`none`)."""
    for index, subject in enumerate(SUBJECTS.values(), start=1):
        if (subject.shape, subject.pattern, subject.colours) == (shape, pattern, tuple(colours)):
            return index
    return 0


# How far a subject's stripes may differ from its instance images and still be the subject: any phase (with two
# colours, half a period swaps them) and a period within these factors. A CNN trained on exact renders learned the
# phase: a render shifted by half a period scored P(star) 0.000, and generated striped stars that a person calls the
# subject scored 0 (benchmarks/results/evaluator.md).
STRIPE_SCALES = (0.8, 1.25)


def subject_scene(rng: np.random.Generator, subject: Subject) -> Scene:
    """The subject at a random pose, its stripes (if any) at a random phase and a period within `STRIPE_SCALES` of
    its own."""
    scene = subject.scene(rng)
    scale = scene.stripe_scale * float(rng.uniform(*STRIPE_SCALES))
    return replace(scene, stripe_phase=float(rng.uniform(0.0, 1.0)), stripe_scale=scale)


def near_miss(rng: np.random.Generator, subject: Subject) -> tuple[np.ndarray, int]:
    """Something that shares part of `subject`'s look (shape, colours or pattern), and its class (usually 0)."""
    kind = int(rng.integers(5))
    scene = subject_scene(rng, subject)
    shape, pattern, colours = subject.shape, subject.pattern, subject.colours
    if kind == 0:  # its shape, plain, in one of its colours
        colours = (colours[int(rng.integers(2))],)
    elif kind == 1:  # its shape, plain, in any colour at all: one colour is never a two-colour subject
        background = np.array(BACKGROUNDS[scene.background], dtype=np.float64)
        image = compose(shape, scene.cx, scene.cy, scene.radius, rng.uniform(0, 255, size=(1, 3)), background, 1.0)
        return image, 0
    elif kind == 2:  # its pattern and colours on another shape
        shape = tuple(s for s in SHAPES if s != subject.shape)[int(rng.integers(len(SHAPES) - 1))]
    elif kind == 3:  # its shape and pattern in another colour pair (often sharing one of its colours)
        names = list(ALL_COLOURS)
        while set(colours) == set(subject.colours):
            colours = tuple(names[i] for i in rng.choice(len(names), size=2, replace=False))
    else:  # its shape and colours in another pattern
        pattern = tuple(p for p in PATTERNS if p != subject.pattern)[int(rng.integers(len(PATTERNS) - 1))]
    scene = replace(scene, shape=shape, pattern=pattern, colours=colours)
    return render_array(scene), subject_label(shape, pattern, colours)


def subject_batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Half the bundled subjects (in turn at random, any background), a quarter base world, a quarter near misses
    of a random subject; labels index `SUBJECT_CLASSES`."""
    subjects = list(SUBJECTS.values())
    images, labels = [], []
    for _ in range(n):
        draw, subject = rng.random(), subjects[int(rng.integers(len(subjects)))]
        if draw < 0.5:
            image, label = render_array(subject_scene(rng, subject)), 1 + subjects.index(subject)
        elif draw < 0.75:
            image, label = render_array(sample_scene(rng)), 0
        else:
            image, label = near_miss(rng, subject)
        images.append(image)
        labels.append(label)
    return np.stack(images), np.array(labels, dtype=np.int64)


def one_subject_batch(subject: Subject) -> BatchFn:
    """A balanced held-out task for one subject: half its renders (label 1), half others (label 0): the base
    world, its near misses and the other subjects, a third each."""
    others = [s for s in SUBJECTS.values() if s != subject]

    def batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
        images, labels = [], []
        for i in range(n):
            if i % 2 == 0:
                images.append(render_array(subject_scene(rng, subject)))
                labels.append(1)
                continue
            kind = (i // 2) % 3
            if kind == 0:
                image = render_array(sample_scene(rng))
            elif kind == 1:
                image = near_miss(rng, subject)[0]  # not this subject (if another, still label 0 here)
            else:
                image = render_array(subject_scene(rng, others[int(rng.integers(len(others)))]))
            images.append(image)
            labels.append(0)
        return np.stack(images), np.array(labels, dtype=np.int64)

    return batch


def train_classifier(
    batch_fn: BatchFn, num_classes: int, seed: int, steps: int = 1200, batch_size: int = 64, lr: float = 3e-3
) -> TinyCNN:
    """Train a `TinyCNN` on rendered batches (deterministic given `seed`); returns it in eval mode."""
    torch.manual_seed(seed)
    model = TinyCNN(num_classes)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps, pct_start=0.1)
    for step in range(steps):
        images, labels = batch_fn(np.random.default_rng([seed, step]), batch_size)
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        logits = model(degrade(to_unit(images), generator))
        loss = F.cross_entropy(logits, torch.from_numpy(labels))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        if (step + 1) % 200 == 0:
            logger.info("step %d/%d loss %.4f", step + 1, steps, loss.item())
    return model.eval()


@torch.no_grad()
def heldout_accuracy(model: TinyCNN, batch_fn: BatchFn, seed: int, n: int = 2000, degraded: bool = False) -> float:
    """Accuracy on `n` fresh renders from a seed never used in training (optionally degraded)."""
    images, labels = batch_fn(np.random.default_rng([seed, 10**9]), n)
    x = to_unit(images)
    if degraded:
        x = degrade(x, torch.Generator().manual_seed(seed + 12345))
    predictions = model(x).argmax(dim=1).numpy()
    return float((predictions == labels).mean())


@torch.no_grad()
def one_subject_accuracy(model: TinyCNN, subject: Subject, seed: int, n: int = 1000, degraded: bool = False) -> float:
    """Accuracy of "P(`subject`) > 0.5" on `one_subject_batch(subject)` from a seed never used in training."""
    images, labels = one_subject_batch(subject)(np.random.default_rng([seed, 10**9]), n)
    x = to_unit(images)
    if degraded:
        x = degrade(x, torch.Generator().manual_seed(seed + 12345))
    probability = model(x).softmax(dim=1)[:, SUBJECT_CLASSES.index(subject.name)].numpy()
    return float(((probability > 0.5) == labels).mean())
