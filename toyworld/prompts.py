"""Fixed prompt sets, shared by the base-model report, tests and benchmarks (`generate` is the library's)."""

from __future__ import annotations

import itertools

from lily_diffusion.images import generate

from .render import BACKGROUNDS, BASE_PATTERN_PAIRS, COLOURS, PATTERNS, SHAPES, Scene, caption

__all__ = ["attribute_prompts", "generate", "pattern_prompts"]


def attribute_prompts(n: int = 64) -> list[str]:
    """Every (shape, colour, background) caption once (48), then again from the start until `n` prompts."""
    combos = [
        f"a photo of a {c} {s} on a {b} background" for b, c, s in itertools.product(BACKGROUNDS, COLOURS, SHAPES)
    ]
    return [combos[i % len(combos)] for i in range(n)]


def pattern_prompts(n: int = 48) -> list[tuple[str, str, tuple[str, str], str]]:
    """Every (pattern, base-world colour pair, shape) of the base world once (48), backgrounds in turn, repeated
    until `n`: (prompt, pattern, colours, shape), the prompt the world's own caption ("a photo of a red and green
    striped star on ...")."""
    combos = list(itertools.product(PATTERNS, BASE_PATTERN_PAIRS, SHAPES))
    backgrounds = list(BACKGROUNDS)
    rows = []
    for i in range(n):
        pattern, colours, shape = combos[i % len(combos)]
        scene = Scene(shape, colours, backgrounds[i % len(backgrounds)], 0.0, 0.0, 0.0, pattern)
        rows.append((caption(scene), pattern, colours, shape))
    return rows
