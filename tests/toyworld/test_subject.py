"""The subject's committed instance images regenerate bit-identically, with their prompts beside them."""

import json
from pathlib import Path

import numpy as np
from PIL import Image

from toyworld.render import COLOURS
from toyworld.subject import CLASS_PROMPT, INSTANCE_PROMPT, SUBJECT_COLOURS, write_subject_samples

SAMPLES = Path(__file__).resolve().parents[2] / "samples" / "subject"


def test_instance_images_regenerate_bit_identically(tmp_path):
    written = write_subject_samples(tmp_path)
    committed = sorted(SAMPLES.glob("*.png"))
    assert [p.name for p in written] == [p.name for p in committed] and len(committed) == 5
    for new, old in zip(written, committed, strict=True):
        assert new.read_bytes() == old.read_bytes(), new.name
    for name in ("prompts.json", "metadata.jsonl"):
        assert (tmp_path / name).read_text() == (SAMPLES / name).read_text()


def test_prompts_and_captions():
    prompts = json.loads((SAMPLES / "prompts.json").read_text())
    assert prompts["instance_prompt"] == INSTANCE_PROMPT == "a photo of sks star"
    assert prompts["class_prompt"] == CLASS_PROMPT == "a photo of a star"
    rows = [json.loads(line) for line in (SAMPLES / "metadata.jsonl").read_text().splitlines()]
    assert {r["file_name"] for r in rows} == {p.name for p in SAMPLES.glob("*.png")}
    assert all(r["text"].startswith(INSTANCE_PROMPT + " on a ") for r in rows)
    assert len({r["text"] for r in rows}) == 3  # three different backgrounds


def test_instances_vary_and_use_colours_the_base_world_never_shows():
    images = [np.asarray(Image.open(p).convert("RGB")) for p in sorted(SAMPLES.glob("*.png"))]
    assert all(im.shape == (32, 32, 3) for im in images)
    assert len({im.tobytes() for im in images}) == 5
    assert not set(SUBJECT_COLOURS) & set(COLOURS)
