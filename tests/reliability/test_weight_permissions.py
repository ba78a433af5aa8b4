"""Saved weight files get the mode a plain `open()` gives, not the 0o600 of mkstemp or of safetensors >= 0.8."""

from __future__ import annotations

import os
import stat

import pytest
import torch

from lily_diffusion import LilyConfig, add_lily, save_lily_weights


@pytest.fixture
def umask():
    """Set a umask for the test; the previous one comes back afterwards."""
    previous = os.umask(0o022)
    yield lambda value: os.umask(value)
    os.umask(previous)


@pytest.mark.parametrize(("mask", "mode"), [(0o022, 0o644), (0o027, 0o640), (0o002, 0o664), (0o077, 0o600)])
def test_a_new_file_gets_0o666_less_the_umask(unet, tmp_path, umask, mask, mode):
    add_lily(unet, LilyConfig(r=2, num_B=2, target_modules=["to_q"]))
    umask(mask)
    path = save_lily_weights(tmp_path, unet=unet)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temporary file left behind


def test_an_overwritten_file_keeps_its_mode(unet, tmp_path, umask):
    add_lily(unet, LilyConfig(r=2, num_B=2, target_modules=["to_q"]))
    path = save_lily_weights(tmp_path, unet=unet)
    path.chmod(0o604)
    umask(0o077)
    before = path.read_bytes()
    with torch.no_grad():
        unet.lily_adapters["default"].lily_B[0].add_(1.0)
    save_lily_weights(tmp_path, unet=unet)
    assert path.read_bytes() != before
    assert stat.S_IMODE(path.stat().st_mode) == 0o604
