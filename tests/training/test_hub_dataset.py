"""--dataset_name: images and captions from a datasets-library dataset (a local image folder here)."""

from __future__ import annotations

import importlib.util
import json

import pytest
from PIL import Image

from lily_diffusion.training.errors import TrainingError
from lily_diffusion.training.hub_dataset import load_dataset_records


def test_missing_datasets_library_is_a_clear_error(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *rest: None if name == "datasets" else real(name))
    with pytest.raises(TrainingError, match="pip install datasets"):
        load_dataset_records("user/dogs", None, None, "image", None, "a photo of sks dog")


def test_image_folder_dataset_with_captions(tmp_path):
    pytest.importorskip("datasets")
    folder = tmp_path / "dogs"
    folder.mkdir()
    lines = []
    for i, size in enumerate([(20, 30), (24, 24)]):
        Image.new("RGBA", size, (255, 0, 0, 255)).save(folder / f"{i}.png")
        lines.append(json.dumps({"file_name": f"{i}.png", "caption": f"sks dog number {i}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    cache = str(tmp_path / "cache")
    records = load_dataset_records(str(folder), None, cache, "image", "caption", "a photo of sks dog")
    assert sorted(r.prompt for r in records) == ["sks dog number 0", "sks dog number 1"]
    assert sorted(r.size for r in records) == [(24, 24), (30, 20)]
    assert all(r.load().mode == "RGB" and r.path is None for r in records)
    uncaptioned = load_dataset_records(str(folder), None, cache, "image", None, "a photo of sks dog")
    assert {r.prompt for r in uncaptioned} == {"a photo of sks dog"}
    with pytest.raises(TrainingError, match="--caption_column 'text' is not a column"):
        load_dataset_records(str(folder), None, cache, "image", "text", "p")
