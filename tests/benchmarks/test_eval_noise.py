"""The split of a score's spread into evaluation noise (seed sets) and training-seed spread."""

from __future__ import annotations

import math
import statistics

import pytest

from benchmarks.eval_noise import group_of, parse_args, seed_sets, spread


def test_seed_sets_start_with_the_benchmarks_own_and_never_overlap():
    sets = seed_sets(3)
    assert sets == [(0, 1, 2, 3), (100, 101, 102, 103), (104, 105, 106, 107)]
    assert len({seed for s in sets for seed in s}) == 12


def test_group_is_the_run_without_its_training_seed():
    assert group_of("square-lora-budget4-lr0.001-noprior-seed12") == "square-lora-budget4-lr0.001-noprior"
    assert group_of("seed-lily-seed0") == "seed-lily"


def test_spread_separates_seed_set_noise_from_training_seeds():
    scores = {
        "square-lora-seed0": [0.8, 0.6],  # sd 0.1414
        "square-lora-seed1": [0.2, 0.2],  # sd 0
        "square-lily-seed0": [0.5, 0.7],  # sd 0.1414, a group of one: no training spread
    }
    result = spread(scores)
    assert result.evaluation == pytest.approx((0.1414214 * 2) / 3, abs=1e-6)
    assert result.training == pytest.approx(statistics.stdev([0.7, 0.2]))


def test_no_group_with_two_runs_gives_nan_and_one_seed_set_is_refused():
    assert math.isnan(spread({"a-seed0": [0.1, 0.3], "b-seed0": [0.5, 0.5]}).training)
    with pytest.raises(ValueError, match="two or more seed sets"):
        spread({"a-seed0": [0.1]})


def test_cli_refuses_one_set_and_missing_folders(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args(["--runs", str(tmp_path), "--sets", "1"])
    assert "at least 2" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--runs", str(tmp_path / "nothing")])
    assert "not run folders" in capsys.readouterr().err
