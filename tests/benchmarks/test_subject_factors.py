"""Subject variants (shape x pattern x colours) and their table."""

from __future__ import annotations

import pytest

from benchmarks.subject_factors import VARIANTS, parse_args, render, variant_subject
from toyworld.compare import RunSpec
from toyworld.subjects import SUBJECTS


def test_a_variant_is_seen_on_its_shapes_bundled_backgrounds_and_asked_on_the_third():
    variant = variant_subject("square", "stripes", "orange", "purple")
    assert (variant.name, variant.pattern, variant.colours) == (
        "square-stripes-orange-purple",
        "stripes",
        ("orange", "purple"),
    )
    assert variant.seen_backgrounds == SUBJECTS["square"].seen_backgrounds
    assert variant.unseen_background == SUBJECTS["square"].unseen_background
    assert len({variant_subject(*v).name for v in VARIANTS}) == len(VARIANTS)


def test_variants_are_checked_before_any_work(capsys):
    assert parse_args(["--work_dir", "w", "--variants", "star-halves-red-blue"]).variants == [
        ("star", "halves", "red", "blue")
    ]
    for bad in ("star-plaid-red-blue", "hexagon-halves-red-blue", "star-halves-red", "star-halves-red-mauve"):
        with pytest.raises(SystemExit):
            parse_args(["--work_dir", "w", "--variants", bad])
        assert "expected SHAPE-PATTERN-COLOUR-COLOUR" in capsys.readouterr().err


def test_table_gives_each_seed_and_the_means():
    spec = RunSpec("lora", 2e-3, False, 0, 2400, extra_flags=("--lr_scheduler=cosine",))
    table = {
        "square-halves-red-blue": {
            0: {"similarity": 0.8, "background_seen": 1.0, "background_unseen": 0.5},
            1: {"similarity": 0.6, "background_seen": 0.5, "background_unseen": 0.0},
        }
    }
    text = render(table, spec, "footer\n")
    assert "| square-halves-red-blue | 2 | 0.800, 0.600 | 0.700 | 0.75 | 0.25 |" in text
    assert "lr 0.002 cosine, 2400 steps" in text and text.endswith("footer\n")
