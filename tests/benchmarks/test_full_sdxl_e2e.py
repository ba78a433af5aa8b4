"""benchmarks.full_sdxl_e2e end to end (slow: select with `python -m pytest -m slow`)."""

import pytest

from benchmarks import full_sdxl_e2e

PHASES = ["build", "lily 1 steps", "lily resume to step 2", "lora 1 steps", "lora resume to step 2",
          "load_lily_weights_and_generate", "lily-grid"]  # fmt: skip


def check(figures, output):
    assert [phase.name for phase in figures["phases"]] == PHASES
    assert figures["lily_file_bytes"] > 0 and figures["lora_file_bytes"] > 0
    assert figures["lily_checkpoints"] == figures["lora_checkpoints"] == ["checkpoint-1", "checkpoint-2"]
    assert figures["class_images"] == 2 and figures["generated"]["pixel_std"] >= 0
    text = output.read_text()
    assert "| lily-grid" in text and "UNet parameters" in text


@pytest.mark.slow
def test_exact_sdxl_through_the_command_lines(tmp_path):
    """The real sizes: ~7 GB of disk in the temp folder and well over 10 GB of memory."""
    output = tmp_path / "full_sdxl_e2e.md"
    figures = full_sdxl_e2e.main(["--steps", "1", "--resolution", "128", "--workdir", str(tmp_path),
                                  "--output", str(output)])  # fmt: skip
    check(figures, output)
    assert figures["parameters"]["unet"] == 2_567_463_684


@pytest.mark.slow
def test_sdxl_family_at_a_32nd_of_the_widths_through_the_command_lines(tmp_path):
    """The same script with every width divided by 32 (a few minutes, under 1 GB)."""
    output = tmp_path / "e2e.md"
    figures = full_sdxl_e2e.main(["--steps", "1", "--resolution", "64", "--divisor", "32", "--workdir",
                                  str(tmp_path), "--output", str(output)])  # fmt: skip
    check(figures, output)
