"""Deterministic seeds derived from (run seed, purpose, step, ...), so resuming replays the same randomness."""

from __future__ import annotations

import hashlib

import torch


def derive_seed(seed: int, *parts: object) -> int:
    """A 63-bit seed that depends only on `seed` and `parts` (stable across processes and Python runs)."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little") & ((1 << 63) - 1)


def make_generator(device: torch.device | str, seed: int, *parts: object) -> torch.Generator:
    """A torch.Generator on `device` seeded with `derive_seed(seed, *parts)`."""
    generator = torch.Generator(device=device)
    generator.manual_seed(derive_seed(seed, *parts))
    return generator
