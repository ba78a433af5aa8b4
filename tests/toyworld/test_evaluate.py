"""The evaluator, scored on fresh ground-truth renders it never saw, and on the committed subject images."""

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from toyworld.classifiers import SUBJECT_CLASSES, degrade, shape_batch, subject_batch, to_unit, train_classifier
from toyworld.evaluate import CLASSES_KEY, DEFAULT_DIR, ToyEvaluator, parse_prompt
from toyworld.render import SHAPES, caption, random_scenes, render_array, render_batch, sample_scene
from toyworld.subjects import SUBJECTS

FRESH_SEED = 31337  # neither a training seed nor the report's held-out seed


@pytest.fixture(scope="module")
def evaluator() -> ToyEvaluator:
    return ToyEvaluator.load()


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
    assert np.mean(evaluator.subject_probabilities(images).argmax(axis=1) == labels) >= 0.97


@pytest.mark.parametrize("name", SUBJECTS)
def test_instance_images_are_their_subject_and_plain_shapes_are_not(evaluator, name):
    subject = SUBJECTS[name]
    instances = subject.instance_images()
    assert evaluator.subject_probability(instances, subject).min() >= 0.9
    for other in SUBJECTS.values():
        if other != subject:
            assert evaluator.subject_probability(other.instance_images(), subject).max() < 0.5
    rng = np.random.default_rng(FRESH_SEED)
    plain = np.stack([render_array(sample_scene(rng, shape=subject.shape)) for _ in range(64)])
    assert evaluator.subject_probability(plain, name).max() < 0.5
    assert evaluator.class_preservation(plain, subject) == 1.0
    assert evaluator.class_preservation(instances, subject) == 0.0


@pytest.mark.parametrize("name", SUBJECTS)
def test_subject_similarity_separates_the_subject_from_plain_shapes(evaluator, name):
    subject = SUBJECTS[name]
    rng = np.random.default_rng(FRESH_SEED)
    plain = np.stack([render_array(sample_scene(rng, shape=subject.shape)) for _ in range(32)])
    own = evaluator.subject_similarity(subject.instance_images(), subject)
    other = evaluator.subject_similarity(plain, subject)
    assert own.min() > 0.8 and other.max() < 0.5 and other.mean() < 0.2
    assert evaluator.subject_similarity(np.full((1, 32, 32, 3), 128, np.uint8), subject)[0] == 0.0


def test_background_fidelity_is_split_into_seen_and_unseen(evaluator):
    subject = SUBJECTS["star"]  # seen: white, black; unseen: gray
    rng = np.random.default_rng(FRESH_SEED)
    images = [render_array(subject.scene(rng, b)) for b in ("white", "black", "gray", "gray")]
    prompts = [subject.caption(b) for b in ("white", "white", "gray", "gray")]
    assert evaluator.background_fidelity(images, prompts, subject) == {"seen": 0.5, "unseen": 1.0}
    assert evaluator.background_fidelity(images[:2], prompts[:2], "star") == {"seen": 0.5}
    square = SUBJECTS["square"]  # unseen: white
    assert evaluator.background_fidelity(images[:1], prompts[:1], square) == {"unseen": 1.0}


def test_an_evaluator_for_other_subjects_is_refused(tmp_path):
    folder = tmp_path / "evaluator"
    shutil.copytree(DEFAULT_DIR, folder)
    weights = load_file(folder / "subject.safetensors")
    classes = json.dumps(["none", "star"])
    save_file(weights, folder / "subject.safetensors", metadata={CLASSES_KEY: classes})
    expected = r"knows the subjects \[.star.\], not the bundled .*; retrain it with python -m scripts.train_toy_eval"
    with pytest.raises(ValueError, match=expected):
        ToyEvaluator.load(folder)
    with pytest.raises(ValueError, match="unknown subject 'dog'"):
        ToyEvaluator.load().subject_probability(np.zeros((1, 32, 32, 3), np.uint8), "dog")


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
    two_colour = parse_prompt("a photo of a red and green striped star on a white background")
    assert two_colour == {"shape": "star", "colour": None, "background": "white", "subject": False}


def test_classifier_training_is_deterministic():
    first, second = (
        train_classifier(subject_batch, len(SUBJECT_CLASSES), seed=5, steps=3, batch_size=8) for _ in range(2)
    )
    a, b = first.state_dict(), second.state_dict()
    assert all(a[k].equal(b[k]) for k in a)
