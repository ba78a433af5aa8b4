"""Tiny CNN classifiers trained only on ground-truth renders: shape (4 classes) and subject-vs-not.

Training is a pure function of the seed (batches are rendered per step from `numpy.random.default_rng([seed,
step])`), takes a few minutes per classifier on 2 shared CPU cores, and augments every batch with blur, noise,
contrast and colour jitter so that the classifiers also work on the slightly soft images a diffusion model
produces. The weights (about 160k parameters each, 0.6 MB) ship as safetensors under `assets/toy-evaluator/`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .render import (
    ALL_COLOURS,
    BACKGROUNDS,
    EXTRA_COLOURS,
    SHAPES,
    SIZE,
    compose,
    render_array,
    sample_scene,
)
from .subject import SUBJECT_COLOURS, sample_subject_scene

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


def near_miss(rng: np.random.Generator) -> np.ndarray:
    """Something that shares part of the subject's look but is not the subject."""
    kind = int(rng.integers(5))
    if kind == 0:  # a plain star in one of the subject's colours
        return render_array(sample_scene(rng, shape="star", colour=tuple(EXTRA_COLOURS)[int(rng.integers(2))]))
    if kind == 4:  # a plain star in any colour at all: one colour is never the two-tone subject
        scene = sample_scene(rng, shape="star")
        background = np.array(BACKGROUNDS[scene.background], dtype=np.float64)
        return compose("star", scene.cx, scene.cy, scene.radius, rng.uniform(0, 255, size=(1, 3)), background, 1.0)
    if kind == 1:  # the subject's stripes on another shape
        shape = ("circle", "square", "triangle")[int(rng.integers(3))]
        return render_array(sample_scene(rng, shape=shape, colours=SUBJECT_COLOURS))
    names = list(ALL_COLOURS)
    while True:  # a striped star in another colour pair (kind 2) or a half-subject pair (kind 3)
        pair = tuple(names[i] for i in rng.choice(len(names), size=2, replace=False))
        if set(pair) != set(SUBJECT_COLOURS) and (kind == 2 or set(pair) & set(SUBJECT_COLOURS)):
            return render_array(sample_scene(rng, shape="star", colours=pair))


def subject_batch(rng: np.random.Generator, n: int) -> tuple[np.ndarray, np.ndarray]:
    """Label 1: the subject anywhere; label 0: the base world (half) or a near miss (half)."""
    labels = (rng.random(n) < 0.5).astype(np.int64)
    images = []
    for label in labels:
        if label == 1:
            images.append(render_array(sample_subject_scene(rng)))
        elif rng.random() < 0.5:
            images.append(render_array(sample_scene(rng)))
        else:
            images.append(near_miss(rng))
    return np.stack(images), labels


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
