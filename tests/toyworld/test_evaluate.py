"""The evaluator, scored on fresh ground-truth renders it never saw, and on the committed subject images."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from toyworld.classifiers import degrade, shape_batch, subject_batch, to_unit, train_classifier
from toyworld.evaluate import ToyEvaluator, parse_prompt
from toyworld.render import SHAPES, caption, random_scenes, render_array, render_batch, sample_scene

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "subject"
FRESH_SEED = 31337  # neither a training seed nor the report's held-out seed


@pytest.fixture(scope="module")
def evaluator() -> ToyEvaluator:
    return ToyEvaluator.load()


@pytest.fixture(scope="module")
def instances() -> list[Image.Image]:
    return [Image.open(p).convert("RGB") for p in sorted(SAMPLES.glob("*.png"))]


def _degraded(images: np.ndarray) -> np.ndarray:
    x = degrade(to_unit(images), torch.Generator().manual_seed(FRESH_SEED))
    return (x.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)


@pytest.mark.parametrize("degraded", [False, True])
def test_exact_measures_and_shape_cnn_on_fresh_renders(evaluator, degraded):
    scenes = random_scenes(300, FRESH_SEED)
    images = render_batch(scenes)
    images = _degraded(images) if degraded else images
    prompts = [caption(s) for s in scenes]
    scores = evaluator.prompt_fidelity(images, prompts)
    assert scores["background"] >= 0.98 and scores["colour"] >= 0.98 and scores["shape"] >= 0.98, scores


def test_cnns_on_their_own_held_out_tasks(evaluator):
    images, labels = shape_batch(np.random.default_rng([FRESH_SEED, 1]), 300)
    assert np.mean([SHAPES.index(s) for s in evaluator.shapes(images)] == labels) >= 0.98
    images, labels = subject_batch(np.random.default_rng([FRESH_SEED, 2]), 300)
    assert np.mean((evaluator.subject_probability(images) > 0.5) == labels) >= 0.98


def test_instance_images_are_the_subject_and_plain_stars_are_not(evaluator, instances):
    assert len(instances) == 5
    assert evaluator.subject_probability(instances).min() >= 0.9
    rng = np.random.default_rng(FRESH_SEED)
    stars = np.stack([render_array(sample_scene(rng, shape="star")) for _ in range(64)])
    assert evaluator.subject_probability(stars).max() < 0.5
    assert evaluator.class_preservation(stars) == 1.0
    assert evaluator.class_preservation(instances) == 0.0


def test_subject_similarity_separates_the_subject_from_plain_stars(evaluator, instances):
    rng = np.random.default_rng(FRESH_SEED)
    stars = np.stack([render_array(sample_scene(rng, shape="star")) for _ in range(32)])
    own = evaluator.subject_similarity(instances, instances)
    other = evaluator.subject_similarity(stars, instances)
    assert own.min() > 0.85 and other.max() < 0.5 and other.mean() < 0.2
    assert evaluator.subject_similarity(np.full((1, 32, 32, 3), 128, np.uint8), instances)[0] == 0.0


def test_parse_prompt():
    assert parse_prompt("a photo of a red circle on a gray background") == {
        "shape": "circle",
        "colour": "red",
        "background": "gray",
        "subject": False,
    }
    assert parse_prompt("a photo of sks star on a black background") == {
        "shape": "star",
        "colour": None,
        "background": "black",
        "subject": True,
    }
    assert parse_prompt("a photo of a star") == {"shape": "star", "colour": None, "background": None, "subject": False}


def test_classifier_training_is_deterministic():
    first, second = (train_classifier(subject_batch, 2, seed=5, steps=3, batch_size=8) for _ in range(2))
    a, b = first.state_dict(), second.state_dict()
    assert all(a[k].equal(b[k]) for k in a)
