"""A regex from a file's metadata (or a user) cannot hang the loader, exhaust memory, or change meaning."""

from __future__ import annotations

import json
import re
import time

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors.torch import save_file

from lily_diffusion import LilyConfig, load_lily_weights
from lily_diffusion.serialization import CONFIG_KEY_PREFIX, FORMAT, FORMAT_VERSION
from lily_diffusion.sharing import build_layout

# Catastrophic for Python's `re` (issue 9: still running after 180 s).
ISSUE_PATTERN = r"(\w+\.?)+\.zzz"
# Catastrophic for the `regex` package too: the conditional group defeats its repeat guards.
BACKTRACKING_PATTERN = r"(?:(\w+)\.?(?(1)|x))+[!?]"


def timed(function, *args):
    start = time.monotonic()
    with pytest.raises(ValueError) as caught:
        function(*args)
    return str(caught.value), time.monotonic() - start


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules"])
def test_a_malformed_regex_is_refused_in_one_line(field):
    with pytest.raises(ValueError) as caught:
        LilyConfig(**{field: "("})
    reason = "missing ), unterminated subpattern at position 0"
    assert str(caught.value) == f"LilyConfig.{field} is not a valid regular expression ({reason}): '('."


@pytest.mark.parametrize(
    ("pattern", "message"),
    [
        ("a{4294967294}", r"expands to 4,294,967,294 items through its counted repeats \(at most 20,000\)"),
        ("((a{99}){99}){99}", r"expands to 980,199 items"),  # 99 * (1 + 99 * (1 + 99))
        (r"(?:to_q){e<=1}", r"has a '\{' that is not part of a \{m,n\} repeat"),
        ("to_q|" * 500, "is 2500 characters long; at most 2000 are allowed"),
        ("(" * 600 + ")" * 600, "nests groups too deeply"),
    ],
)
def test_patterns_that_would_exhaust_memory_or_change_meaning_are_refused_at_once(pattern, message):
    text, seconds = timed(LilyConfig, 4, 1, 2, 1.0, pattern)
    assert re.search(message, text) and "\n" not in text
    assert seconds < 1.0


def test_the_issue_pattern_ends_quickly_with_a_clear_error(unet):
    text, seconds = timed(build_layout, unet, LilyConfig(target_modules=ISSUE_PATTERN))
    assert "matches no module of UNet2DConditionModel" in text
    assert seconds < 3.0


def test_catastrophic_backtracking_is_stopped_by_the_time_budget(unet):
    text, seconds = timed(build_layout, unet, LilyConfig(target_modules=BACKTRACKING_PATTERN))
    assert text == (
        f"LilyConfig.target_modules regex {BACKTRACKING_PATTERN!r} took over 2 s to match the model's module names "
        "(catastrophic backtracking); simplify it or give a list of module-name suffixes."
    )
    assert 2.0 <= seconds < 6.0
    text, _ = timed(build_layout, unet, LilyConfig(target_modules=["to_q"], exclude_modules=BACKTRACKING_PATTERN))
    assert text.startswith("LilyConfig.exclude_modules regex")


def crafted_file(path, target_modules):
    """A lily_diffusion file whose metadata carries `target_modules`, written without our saver."""
    config = {**LilyConfig(r=2, num_B=2).to_dict(), "target_modules": target_modules}
    metadata = {"format": FORMAT, "format_version": FORMAT_VERSION, CONFIG_KEY_PREFIX + "unet": json.dumps(config)}
    save_file({"unet.down_blocks.1.lily_A.weight": torch.zeros(2, 64)}, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(
    ("pattern", "message"),
    [(BACKTRACKING_PATTERN, "took over 2 s to match the model's module names"), (ISSUE_PATTERN, "matches no module")],
)
def test_load_lily_weights_of_a_crafted_file_fails_in_seconds(tiny_sdxl_dir, tmp_path, pattern, message):
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_dir)
    path = crafted_file(tmp_path / "crafted.safetensors", pattern)
    text, seconds = timed(load_lily_weights, pipe, path)
    assert text.startswith("The unet adapter does not fit UNet2DConditionModel: LilyConfig.target_modules")
    assert repr(pattern) in text and message in text
    assert seconds < 8.0
    assert not hasattr(pipe.unet, "lily_adapters")


def test_normal_patterns_select_exactly_what_python_re_selects(unet):
    target, exclude = r".*attn[12]\.to_(q|out\.0)", r"down_blocks\.\d+\..*attn2.*"
    layout = build_layout(unet, LilyConfig(target_modules=target, exclude_modules=exclude))
    expected = [
        path
        for path, _ in unet.named_modules()
        if re.fullmatch(target, path) and not re.fullmatch(exclude, path)  # what peft computes
    ]
    assert sorted(layout.slots) == sorted(expected) and len(expected) > 4


def test_a_huge_suffix_list_costs_no_more_than_a_short_one(unet):
    junk = [f"module_{index}" for index in range(200_000)]
    start = time.monotonic()
    layout = build_layout(unet, LilyConfig(target_modules=[*junk, "to_q"]))
    assert time.monotonic() - start < 3.0
    assert list(layout.slots) == list(build_layout(unet, LilyConfig(target_modules=["to_q"])).slots)
