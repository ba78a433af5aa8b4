"""The bundled subjects: committed instance images regenerate bit-identically, on two backgrounds only."""

import json
import subprocess
import sys

import numpy as np
import pytest

from toyworld.paths import REPO, SUBJECT_DIR, SUBJECTS_DIR
from toyworld.render import BACKGROUNDS, BASE_PATTERN_PAIRS, COLOURS
from toyworld.subjects import (
    CLASS_PROMPT,
    DEFAULT_SUBJECT,
    INSTANCE_PROMPT,
    SUBJECTS,
    Subject,
    get_subject,
    write_subject_samples,
)


@pytest.mark.parametrize("name", SUBJECTS)
def test_instance_images_regenerate_bit_identically(tmp_path, name):
    written = write_subject_samples(name, tmp_path)
    committed = sorted(SUBJECTS[name].folder.glob("*.png"))
    assert [p.name for p in written] == [p.name for p in committed] and 4 <= len(committed) <= 5
    for new, old in zip(written, committed, strict=True):
        assert new.read_bytes() == old.read_bytes(), new.name
    for file in ("subject.json", "metadata.jsonl"):
        assert (tmp_path / file).read_text() == (SUBJECTS[name].folder / file).read_text()
    assert sorted(p.name for p in SUBJECTS_DIR.iterdir()) == sorted(SUBJECTS)  # no stray folder


def test_registry_mixes_shapes_patterns_and_seen_and_unseen_colours():
    subjects = list(SUBJECTS.values())
    assert len(subjects) >= 4 and len({s.shape for s in subjects}) == len(subjects)
    assert len({s.pattern for s in subjects}) >= 3
    assert sum(s.base_world_colours for s in subjects) >= 2
    assert sum(not set(s.colours) & set(COLOURS) for s in subjects) >= 2  # colours the base world never shows
    assert DEFAULT_SUBJECT.name == "star" and DEFAULT_SUBJECT.folder == SUBJECT_DIR
    assert (INSTANCE_PROMPT, CLASS_PROMPT) == ("a photo of sks star", "a photo of a star")
    assert {s.unseen_background for s in subjects} <= set(BACKGROUNDS)


def test_the_base_world_never_paints_a_subjects_colour_pair():
    """The base world knows every pattern and colour of a base-colour subject, never the subject's combination."""
    base_pairs = {frozenset(pair) for pair in BASE_PATTERN_PAIRS}
    assert all(frozenset(s.colours) not in base_pairs for s in SUBJECTS.values())
    assert all(set(pair) <= set(COLOURS) for pair in base_pairs)


@pytest.mark.parametrize("name", SUBJECTS)
def test_instance_images_show_the_seen_backgrounds_only(name):
    subject = SUBJECTS[name]
    record = json.loads((subject.folder / "subject.json").read_text())
    assert record["instance_prompt"] == f"a photo of sks {subject.shape}" == subject.instance_prompt
    assert record["class_prompt"] == f"a photo of a {subject.shape}" == subject.class_prompt
    assert record["seen_backgrounds"] == list(subject.seen_backgrounds)
    assert record["unseen_background"] == subject.unseen_background not in subject.seen_backgrounds
    images = np.stack([np.asarray(image) for image in subject.instance_images()])
    corners = {tuple(int(v) for v in image[0, 0]) for image in images}  # the exact background colour
    assert corners == {BACKGROUNDS[b] for b in subject.seen_backgrounds}
    assert len({image.tobytes() for image in images}) == len(images)
    rows = [json.loads(line) for line in (subject.folder / "metadata.jsonl").read_text().splitlines()]
    assert [r["file_name"] for r in rows] == record["images"]
    assert {r["text"] for r in rows} == {subject.caption(b) for b in subject.seen_backgrounds}


def test_bad_subjects_are_refused_in_one_sentence(tmp_path):
    with pytest.raises(ValueError, match="unknown subject 'dog'; the bundled subjects are star, "):
        get_subject("dog")
    with pytest.raises(ValueError, match="seen_backgrounds must be two of"):
        Subject("x", "star", "ring", ("red", "blue"), ("white", "white"))
    with pytest.raises(ValueError, match="unknown shape, pattern or colour"):
        Subject("x", "star", "checkerboard", ("red", "blue"), ("white", "gray"))
    result = subprocess.run(
        [sys.executable, "-m", "toyworld.subjects", "--out", str(tmp_path)], cwd=REPO, capture_output=True, text=True
    )
    assert result.returncode == 2 and "--out needs --subject" in result.stderr
    assert not any(tmp_path.iterdir())
