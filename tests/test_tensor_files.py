"""Adapter files from strangers: a file with more tensors than any adapter is refused from its header, by every
reader of adapter files, before any tensor is read."""

from __future__ import annotations

import time

import pytest
import torch
from safetensors.torch import save_file

from lily_diffusion.diagnostics import LoraFileError, read_lora_file
from lily_diffusion.lycoris_files import LycorisFileError, read_lycoris_file
from lily_diffusion.serialization import FORMAT, FORMAT_VERSION, LilyFileError, read_lily_file
from lily_diffusion.tensor_files import MAX_TENSORS, read_safetensors

READERS = [
    (read_lily_file, LilyFileError),
    (read_lycoris_file, LycorisFileError),
    (read_lora_file, LoraFileError),
]


def many_tensors(path, count: int):
    """A Lily-format file of `count` one-element tensors under keys no adapter has."""
    one = torch.zeros(1)
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION}
    save_file({f"unet.k{index}": one.clone() for index in range(count)}, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def too_many(tmp_path_factory):
    return many_tensors(tmp_path_factory.mktemp("files") / "many.safetensors", MAX_TENSORS + 1)


@pytest.mark.parametrize(("reader", "error"), READERS, ids=lambda value: getattr(value, "__name__", ""))
def test_a_file_of_more_tensors_than_any_adapter_is_refused_by_every_reader(too_many, reader, error):
    with pytest.raises(error, match=rf"holds {MAX_TENSORS + 1:,} tensors, more than any adapter file"):
        reader(too_many)


def test_the_refusal_reads_no_tensor(too_many):
    def never_called(path, metadata, keys):
        raise AssertionError("the header check runs after the count check")

    started = time.perf_counter()
    with pytest.raises(LilyFileError, match="more than any adapter file"):
        read_safetensors(too_many, LilyFileError, never_called)
    header_only = time.perf_counter() - started
    started = time.perf_counter()
    read_safetensors(many_tensors(too_many.with_name("fewer.safetensors"), 20_000))
    reading_a_fifth = time.perf_counter() - started
    # listing 100,001 keys costs less than reading a fifth of them
    assert header_only < reading_a_fifth


def test_a_file_at_the_limit_goes_on_to_the_reader_s_own_checks(tmp_path):
    path = many_tensors(tmp_path / "limit.safetensors", MAX_TENSORS)
    with pytest.raises(LilyFileError, match=r"has unet tensors but no 'lily_config\.unet' metadata"):
        read_lily_file(path)
