"""Hostile files for the stress cases: broken or malicious adapter files, image bombs, odd images, broken base models.

Each maker writes one file (or folder) at the path it is given, from a good file where it needs one; none reads
anything but its arguments.
"""

from __future__ import annotations

import json
import shutil
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

Tensors = dict[str, torch.Tensor]
Metadata = dict[str, str]
UNET_CONFIG_KEY = "lily_config.unet"


# Adapter (safetensors) files.


def read_safetensors(path: Path) -> tuple[Tensors, Metadata]:
    """Every tensor and the metadata of a safetensors file."""
    with safe_open(str(path), framework="pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}  # noqa: SIM118 (a safe_open handle)
        return tensors, dict(handle.metadata() or {})


def rewrite(
    source: Path,
    target: Path,
    tensors: Callable[[Tensors], Tensors] = lambda t: t,
    metadata: Callable[[Metadata], Metadata] = lambda m: m,
) -> Path:
    """`source` written again at `target` with its tensors and metadata passed through the given edits."""
    found, meta = read_safetensors(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors(dict(found)), str(target), metadata=metadata(dict(meta)))
    return target


def edit_config(**changes: object) -> Callable[[Metadata], Metadata]:
    """A metadata edit that sets fields of the UNet's Lily config (raw JSON text where a value is `RawJson`)."""

    def apply(meta: Metadata) -> Metadata:
        config = json.loads(meta[UNET_CONFIG_KEY])
        config.update(changes)
        meta[UNET_CONFIG_KEY] = json.dumps(config)
        return meta

    return apply


def set_metadata(key: str, value: str | None) -> Callable[[Metadata], Metadata]:
    """A metadata edit that sets (or, with None, removes) one entry."""

    def apply(meta: Metadata) -> Metadata:
        if value is None:
            meta.pop(key, None)
        else:
            meta[key] = value
        return meta

    return apply


def first_tensor(edit: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[Tensors], Tensors]:
    """A tensors edit applied to the first tensor (in key order)."""

    def apply(tensors: Tensors) -> Tensors:
        key = sorted(tensors)[0]
        tensors[key] = edit(tensors[key]).contiguous()
        return tensors

    return apply


def poison(value: float) -> Callable[[torch.Tensor], torch.Tensor]:
    """One element of the tensor set to `value` (NaN, infinity)."""

    def apply(tensor: torch.Tensor) -> torch.Tensor:
        tensor = tensor.clone()
        tensor.view(-1)[0] = value
        return tensor

    return apply


def truncated(source: Path, target: Path, keep: float = 0.5) -> Path:
    """The first `keep` of `source`'s bytes (an interrupted download)."""
    data = source.read_bytes()
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data[: int(len(data) * keep)])
    return target


def raw_safetensors(target: Path, header: bytes, claimed_length: int | None = None, body: bytes = b"") -> Path:
    """A file with safetensors' layout (8-byte little-endian header length, JSON header, data) built by hand."""
    length = len(header) if claimed_length is None else claimed_length
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(struct.pack("<Q", length) + header + body)
    return target


def huge_shape_header(target: Path) -> Path:
    """A header that claims a 10^12-element tensor in a file of a few hundred bytes."""
    header = {
        "__metadata__": {"format": "lily_diffusion", "format_version": "1"},
        "unet.x.lily_A.weight": {"dtype": "F32", "shape": [1000000, 1000000], "data_offsets": [0, 4 * 10**12]},
    }
    return raw_safetensors(target, json.dumps(header).encode(), body=b"\0" * 64)


def pickle_file(source: Path, target: Path) -> Path:
    """The tensors of `source` saved with `torch.save` (a pickle, which can run code when loaded)."""
    tensors, _ = read_safetensors(source)
    target.parent.mkdir(parents=True, exist_ok=True)
    torch.save(tensors, target)
    return target


def deeply_nested_json(depth: int = 100_000) -> str:
    """Valid JSON nested `depth` deep: Python's json module recurses once per level."""
    return "[" * depth + "]" * depth


# Images.


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_header_bomb(target: Path, width: int, height: int) -> Path:
    """A PNG of a few dozen bytes whose header claims `width` x `height` pixels (data for one row only)."""
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    data = zlib.compress(b"\0" * (1 + 3 * min(width, 64)))
    png = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", header) + _png_chunk(b"IDAT", data) + _png_chunk(b"IEND", b"")
    target.write_bytes(png)
    return target


def gif_header_bomb(target: Path, width: int = 65535, height: int = 65535) -> Path:
    """A GIF of a few dozen bytes whose screen and frame claim `width` x `height` pixels."""
    screen = b"GIF89a" + struct.pack("<HHBBB", width, height, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff"
    frame = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0) + b"\x02\x02\x44\x01\x00"
    target.write_bytes(screen + frame + b"\x3b")
    return target


def jpeg_with_size(target: Path, width: int, height: int) -> Path:
    """A small real JPEG whose frame header is patched to claim `width` x `height` pixels."""
    Image.new("RGB", (16, 16), (200, 30, 30)).save(target, format="JPEG")
    data = bytearray(target.read_bytes())
    start = data.index(b"\xff\xc0")
    data[start + 5 : start + 9] = struct.pack(">HH", height, width)
    target.write_bytes(bytes(data))
    return target


def bmp_header_bomb(target: Path, width: int = 100_000, height: int = 100_000) -> Path:
    """A BMP header that claims `width` x `height` 24-bit pixels, with a few bytes of data."""
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0, 0, 2835, 2835, 0, 0)
    body = b"\0" * 64
    file_header = b"BM" + struct.pack("<IHHI", 14 + len(info) + len(body), 0, 0, 14 + len(info))
    target.write_bytes(file_header + info + body)
    return target


def subject_like(size: tuple[int, int] = (24, 20)) -> Image.Image:
    """A red square on blue, `size` = (width, height)."""
    width, height = size
    array = np.zeros((height, width, 3), dtype=np.uint8)
    array[...] = (30, 60, 200)
    array[height // 4 : height // 4 + max(1, height // 2), width // 4 : width // 4 + max(1, width // 2)] = (
        230,
        30,
        30,
    )
    return Image.fromarray(array)


def odd_image(target: Path, kind: str) -> Path:
    """One unusual but valid image: 16-bit, CMYK, palette with transparency, animated GIF, multi-page TIFF, float
    TIFF with NaN, 1 pixel, a broken EXIF orientation."""
    image = subject_like()
    if kind == "gray16":
        array = (np.asarray(image.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
        Image.fromarray(array).save(target)
    elif kind == "cmyk":
        image.convert("CMYK").save(target, format="JPEG")
    elif kind == "palette_alpha":
        image.convert("P").save(target, transparency=0)
    elif kind == "animated":
        frames = [image, image.rotate(90), image.rotate(180)]
        frames[0].save(target, save_all=True, append_images=frames[1:], duration=50, loop=0)
    elif kind == "multipage":
        image.save(target, save_all=True, append_images=[image.rotate(90)])
    elif kind == "float_nan":
        array = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
        array[0, 0] = np.nan
        Image.fromarray(array, "F").save(target)
    elif kind == "one_pixel":
        Image.new("RGB", (1, 1), (230, 30, 30)).save(target)
    elif kind == "bad_orientation":
        exif = Image.Exif()
        exif[0x0112] = 9  # orientations go from 1 to 8
        image.save(target, exif=exif.tobytes())
    elif kind == "garbage_exif":
        image.save(target, format="JPEG", exif=b"Exif\x00\x00" + b"MM\x00\x2a\x00\x00\x00\x08" + b"\xff" * 40)
    else:
        raise ValueError(kind)
    return target


def truncated_image(target: Path) -> Path:
    """A PNG of noise (incompressible) cut after a third of its bytes."""
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    Image.fromarray(noise).save(target)
    return truncated(target, target, keep=1 / 3)


def image_folder(target: Path, subject: Path, extra: dict[str, Callable[[Path], object]], keep: int = 2) -> Path:
    """`keep` of the subject images, plus a file made by each `extra[name](path)`."""
    target.mkdir(parents=True, exist_ok=True)
    for image in sorted(subject.glob("*.png"))[:keep]:
        shutil.copy(image, target / image.name)
    for name, make in extra.items():
        make(target / name)
    return target


# Base models.


def base_copy(base: Path, target: Path, copied: tuple[str, ...] = ()) -> Path:
    """A pipeline folder whose components link to `base`'s, except the `copied` ones (files, or component folders)
    which are real copies a case may then break."""
    target.mkdir(parents=True, exist_ok=True)
    for entry in base.iterdir():
        if entry.name in copied:
            if entry.is_dir():
                shutil.copytree(entry, target / entry.name)
            else:
                shutil.copy(entry, target / entry.name)
        else:
            (target / entry.name).symlink_to(entry.resolve())
    return target
