"""Image reading (any mode, EXIF), captions, crops and micro-conditioning, sampling, batching."""

from __future__ import annotations

import logging
import random

import numpy as np
import pytest
import torch
from PIL import Image

from lily_diffusion.training.data import (
    DreamBoothDataset,
    EpochShuffleSampler,
    ImageRecord,
    check_folder,
    collate_examples,
    load_class_records,
    load_instance_records,
    open_rgb,
    prepare_image,
    read_captions,
    scan_images,
    to_rgb,
)
from lily_diffusion.training.errors import TrainingError


def test_alpha_is_composited_over_white():
    rgba = Image.new("RGBA", (2, 1))
    rgba.putpixel((0, 0), (255, 0, 0, 0))  # fully transparent red -> white
    rgba.putpixel((1, 0), (255, 0, 0, 128))  # half red over white
    out = np.asarray(to_rgb(rgba))
    assert out[0, 0].tolist() == [255, 255, 255]
    assert out[0, 1, 0] == 255 and abs(int(out[0, 1, 1]) - 127) <= 1


def test_palette_transparency_and_gray_modes():
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 200, 100, 50] + [0] * 762)
    palette.putpixel((0, 0), 0)
    palette.putpixel((1, 0), 1)
    palette.info["transparency"] = 0
    assert np.asarray(to_rgb(palette)).tolist() == [[[255, 255, 255], [200, 100, 50]]]
    assert np.asarray(to_rgb(Image.new("L", (1, 1), 77))).tolist() == [[[77, 77, 77]]]
    cmyk = to_rgb(Image.new("CMYK", (1, 1), (0, 255, 255, 0)))
    assert cmyk.mode == "RGB" and np.asarray(cmyk)[0, 0].tolist() == [255, 0, 0]


def test_high_bit_depth_is_scaled_to_8_bit():
    sixteen = Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16))
    assert sixteen.mode.startswith("I;16")
    assert np.asarray(to_rgb(sixteen))[0, :, 0].tolist() == [0, 100, 255]
    floats = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert np.asarray(to_rgb(floats))[0, :, 0].tolist() == [0, 128, 255]


def test_exif_orientation_is_applied(odd_images_dir):
    upright = open_rgb(odd_images_dir / "rotated.jpg")
    assert upright.size == (20, 24)  # stored 24x20 with orientation 6
    reference = np.asarray(open_rgb(odd_images_dir / "gray.png").convert("RGB"), dtype=float)
    assert np.abs(np.asarray(upright.convert("L").convert("RGB"), dtype=float) - reference).mean() < 20


def test_scan_skips_unreadable_files_with_a_warning(odd_images_dir, caplog):
    with caplog.at_level(logging.WARNING):
        readable, skipped = scan_images(odd_images_dir, "instance")
    assert skipped == ["corrupt.png"]
    assert sorted(p.name for p, _ in readable) == [
        "cmyk.jpg", "gray.png", "gray16.png", "palette.png", "rgba.png", "rotated.jpg",
    ]  # fmt: skip
    assert all(size == (24, 20) for _, size in readable)  # (height, width), upright
    assert "corrupt.png" in caplog.text and "notes.md" not in caplog.text


def test_captions_from_metadata_then_txt_then_instance_prompt(captioned_dir):
    records = load_instance_records(captioned_dir, "a photo of sks", "text")
    prompts = {r.path.name: r.prompt for r in records}
    assert prompts == {"a.png": "a photo of sks star", "b.png": "a photo of sks circle", "c.png": "a photo of sks"}


def test_without_caption_column_every_image_takes_the_instance_prompt_like_diffusers(captioned_dir):
    records = load_instance_records(captioned_dir, "a photo of sks", None)
    assert {r.path.name: r.prompt for r in records} == dict.fromkeys(("a.png", "b.png", "c.png"), "a photo of sks")


def test_caption_column_errors(tmp_path):
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n{broken\n')
    with pytest.raises(TrainingError, match="line 2: not valid JSON"):
        read_captions(tmp_path, None)
    (tmp_path / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "x"}\n')
    with pytest.raises(TrainingError, match="no caption column 'caption'"):
        read_captions(tmp_path, "caption")
    assert read_captions(tmp_path, "text") == {"a.png": "x"}


def test_folder_checks(tmp_path):
    with pytest.raises(TrainingError, match="does not exist"):
        check_folder(tmp_path / "missing", "--instance_data_dir")
    (tmp_path / "file").write_text("x")
    with pytest.raises(TrainingError, match="is not a folder"):
        check_folder(tmp_path / "file", "--instance_data_dir")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrainingError, match="is empty"):
        check_folder(tmp_path / "empty", "--instance_data_dir")


def rows_image(height: int, width: int) -> Image.Image:
    """Red channel = row index, green = column index, so a crop can be located exactly."""
    rows, cols = np.meshgrid(np.arange(height), np.arange(width), indexing="ij")
    return Image.fromarray(np.stack([rows, cols, np.zeros_like(rows)], axis=-1).astype(np.uint8))


def to_uint8(pixels: torch.Tensor) -> np.ndarray:
    return np.rint((pixels.permute(1, 2, 0).numpy() + 1.0) * 127.5).astype(int)


def test_center_crop_and_micro_conditioning():
    prepared = prepare_image(rows_image(32, 16), 16, center_crop=True, flip=False, rng=random.Random(0))
    assert prepared.original_size == (32, 16) and prepared.crop_top_left == (8, 0)
    assert prepared.pixels.shape == (3, 16, 16) and prepared.pixels.min() >= -1 and prepared.pixels.max() <= 1
    assert to_uint8(prepared.pixels)[:, 0, 0].tolist() == list(range(8, 24))


def test_resize_keeps_the_aspect_and_records_the_real_size():
    prepared = prepare_image(Image.new("RGB", (80, 40)), 16, center_crop=True, flip=False, rng=random.Random(0))
    assert prepared.original_size == (40, 80) and prepared.crop_top_left == (0, 8)  # resized to 32x16


def test_random_crop_is_where_it_says_and_flip_mirrors():
    for seed in range(5):
        prepared = prepare_image(rows_image(16, 40), 16, center_crop=False, flip=False, rng=random.Random(seed))
        top, left = prepared.crop_top_left
        assert top == 0 and 0 <= left <= 24
        assert to_uint8(prepared.pixels)[0, :, 1].tolist() == list(range(left, left + 16))
    flipped = prepare_image(rows_image(16, 16), 16, center_crop=True, flip=True, rng=random.Random(0))
    assert to_uint8(flipped.pixels)[0, :, 1].tolist() == list(range(15, -1, -1))


def test_sampler_is_a_pure_function_of_seed_and_epoch():
    sampler = EpochShuffleSampler(10, seed=3)
    first = list(sampler)
    assert sorted(i for i, _ in first) == list(range(10)) and {e for _, e in first} == {0}
    assert list(sampler) == first
    sampler.use_epoch(1)
    second = list(sampler)
    assert [i for i, _ in second] != [i for i, _ in first] and {e for _, e in second} == {1}
    assert list(EpochShuffleSampler(10, seed=3)) == first


def _records(folder, names, prompt):
    return [ImageRecord(folder / n, (0, 0), prompt) for n in names]


def test_dataset_with_prior_preservation_batches_instances_then_classes(tmp_path):
    for name, size in (("i0.png", (20, 30)), ("i1.png", (16, 16)), ("c0.png", (24, 16))):
        Image.new("RGB", size).save(tmp_path / name)
    dataset = DreamBoothDataset(
        _records(tmp_path, ["i0.png", "i1.png"], "sks"), _records(tmp_path, ["c0.png"], "class"),
        resolution=16, center_crop=True, random_flip=False, repeats=2, seed=0,
    )  # fmt: skip
    assert len(dataset) == 4  # 2 images x 2 repeats, more than 1 class image
    batch = collate_examples([dataset[(0, 0)], dataset[(1, 0)]])
    assert batch["prompts"] == ["sks", "sks", "class", "class"]
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    assert batch["original_sizes"].tolist() == [[30, 20], [16, 16], [16, 24], [16, 24]]
    assert batch["crop_top_lefts"].tolist() == [[4, 0], [0, 0], [0, 4], [0, 4]]  # 20x30 -> 16x24


def test_augmentation_is_reproducible_per_epoch(tmp_path):
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (16, 32, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    dataset = DreamBoothDataset(
        _records(tmp_path, ["a.png"], "p"), None, 16, center_crop=False, random_flip=True, repeats=1, seed=1
    )
    same = [dataset[(0, 0)]["instance"].prepared for _ in range(2)]
    assert torch.equal(same[0].pixels, same[1].pixels) and same[0].crop_top_left == same[1].crop_top_left
    crops = {dataset[(0, epoch)]["instance"].prepared.crop_top_left for epoch in range(8)}
    assert len(crops) > 1  # other epochs see other crops


def test_latent_cache_serves_encoded_moments(tmp_path):
    Image.new("RGB", (16, 24), (255, 0, 0)).save(tmp_path / "a.png")
    dataset = DreamBoothDataset(
        _records(tmp_path, ["a.png"], "p"), None, 16, center_crop=True, random_flip=False, repeats=3, seed=0
    )
    calls = []

    def encode(pixels: torch.Tensor) -> torch.Tensor:
        calls.append(pixels.shape[0])
        return pixels.mean(dim=(1, 2, 3), keepdim=True).expand(-1, 8, 2, 2)

    dataset.build_latent_cache(encode, batch_size=2)
    assert calls == [2, 1]  # every repeat slot once
    batch = collate_examples([dataset[(i, 5)] for i in range(3)])
    assert "pixel_values" not in batch and batch["latent_moments"].shape == (3, 8, 2, 2)
    assert torch.allclose(batch["latent_moments"][:, 0], torch.full((3, 2, 2), -1 / 3))  # red: (1 - 1 - 1) / 3
    assert batch["original_sizes"].tolist() == [[24, 16]] * 3 and batch["crop_top_lefts"].tolist() == [[4, 0]] * 3


def test_class_records_are_limited(tmp_path):
    for i in range(3):
        Image.new("RGB", (8, 8)).save(tmp_path / f"{i}.png")
    records = load_class_records(tmp_path, "a dog", limit=2)
    assert [r.path.name for r in records] == ["0.png", "1.png"] and {r.prompt for r in records} == {"a dog"}
