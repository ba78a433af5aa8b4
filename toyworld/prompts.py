"""Fixed prompt sets, shared by the base-model report, tests and benchmarks (`generate` is the library's)."""

from __future__ import annotations

import itertools

from lily_diffusion.images import generate

from .render import BACKGROUNDS, COLOURS, SHAPES

__all__ = ["attribute_prompts", "generate"]


def attribute_prompts(n: int = 64) -> list[str]:
    """Every (shape, colour, background) caption once (48), then again from the start until `n` prompts."""
    combos = [
        f"a photo of a {c} {s} on a {b} background" for b, c, s in itertools.product(BACKGROUNDS, COLOURS, SHAPES)
    ]
    return [combos[i % len(combos)] for i in range(n)]
