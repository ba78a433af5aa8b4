"""The README demo (`python -m toyworld.demo`) end to end, in a reduced form."""

import sys

from PIL import Image

from toyworld import compare, demo
from toyworld.methods import RECIPE


def test_demo_trains_both_adapters_and_writes_the_grid_and_the_table(tmp_path):
    output_dir = demo.main(
        ["--output_dir", str(tmp_path / "demo"), "--steps", "6", "--eval_seeds", "1", "--inference_steps", "3"]
    )
    table = (output_dir / "scores.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split("|")[1].strip() for row in rows[1:]] == ["base model (no training)", "lily", "lora"]
    # the benchmark's recipe for each (toyworld.methods.RECIPE)
    for row, method in zip(rows[2:], ("lily", "lora"), strict=True):
        assert f"| {RECIPE[method].learning_rate:g} | off |" in row  # both without prior unless asked
    grid = Image.open(output_dir / "grid.png")
    # columns: base, Lily, LoRA (64 px cells) beside a label column; rows: the subject and the class prompt
    assert grid.width > 3 * 64 and grid.height > 2 * 64
    lily = RECIPE["lily"].learning_rate
    assert (output_dir / "runs" / f"star-lily-budget4-lr{lily:g}-cosine-noprior-seed0").is_dir()


def test_training_output_is_reduced_to_a_progress_bar_and_kept_for_errors():
    script = "import sys; print('Steps:  50%|#| 1/2 [00:01<00:01]'); print('boom', file=sys.stderr); sys.exit(3)"
    returncode, tail = compare.run_with_progress([sys.executable, "-c", script], "failing", 2)
    assert returncode == 3
    assert tail == ["boom\n"]
