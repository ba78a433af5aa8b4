"""Reading a safetensors file that may come from a stranger: bounded work, one clear error, nothing executed."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

# More tensors than any adapter file has (Lily or LoRA on every attention projection of SDXL's UNet and both text
# encoders is a few thousand): a file past it is refused from its header, before any tensor is read.
MAX_TENSORS = 100_000

HeaderCheck = Callable[[Path, dict[str, str], list[str]], None]


def read_safetensors(
    path: Path, error: type[ValueError] = ValueError, check_header: HeaderCheck | None = None
) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """A safetensors file's metadata and tensors. Raises `error` in one sentence for an unreadable file or one of
    more than `MAX_TENSORS` tensors, and lets `check_header(path, metadata, keys)` refuse the file, all before any
    tensor is read."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
            keys = list(handle.keys())
            if len(keys) > MAX_TENSORS:
                raise error(
                    f"{path} holds {len(keys):,} tensors, more than any adapter file ({MAX_TENSORS:,} at most)."
                )
            if check_header is not None:
                check_header(path, metadata, keys)
            return metadata, {key: handle.get_tensor(key) for key in keys}
    except (SafetensorError, OSError) as reason:
        raise error(f"{path} is not a readable safetensors file (truncated or corrupt?): {reason}") from None
