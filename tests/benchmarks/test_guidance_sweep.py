"""benchmarks/guidance_sweep.py: re-scoring a finished benchmark's adapters at other guidance scales."""

from __future__ import annotations

import json

import pytest

from benchmarks import guidance_sweep

RUN = "circle-loha-budget4-lr0.006-cosine-noprior-seed1"  # a committed run of the full benchmark


def test_arguments_are_checked_before_any_work(tmp_path, capsys):
    assert guidance_sweep.parse_args(["--guidance_scales", "5", "2", "5"]).guidance_scales == [2.0, 5.0]
    for bad, message in (
        (["--guidance_scales", "0.5"], "--guidance_scales must be numbers from 1 to 100"),
        (["--guidance_scales", "nan"], "--guidance_scales must be numbers from 1 to 100"),
        (["--benchmark", str(tmp_path / "none.json")], "is not a file"),
        (["--jobs", "0"], "--budget and --jobs must be at least 1"),
        (["--budget", "0"], "--budget and --jobs must be at least 1"),
    ):
        with pytest.raises(SystemExit):
            guidance_sweep.parse_args(bad)
        assert message in capsys.readouterr().err


def test_sweep_reproduces_the_benchmark_at_its_guidance_and_resumes_from_its_cache(tmp_path):
    committed = json.loads(guidance_sweep.BENCHMARK.read_text())
    record = next(r for r in committed["runs"] if r["name"] == RUN)
    at = committed["plan"]["guidance_scale"]  # the guidance the benchmark scored its runs at
    benchmark = tmp_path / "benchmark.json"
    runs = [record, {**record, "name": "elsewhere", "budget_rank": 1}]
    benchmark.write_text(json.dumps({"plan": committed["plan"], "runs": runs}))
    args = ["--benchmark", str(benchmark), "--subjects", "circle", "--guidance_scales", "2", f"{at:g}", "--jobs", "1"]
    args += ["--cache_dir", str(tmp_path / "cache"), "--results", str(tmp_path / "sweep.md")]
    rows = guidance_sweep.main(args)
    # the base model and the one run at the budget (not the run at another budget), at each guidance
    assert [(r["method"], r["guidance"]) for r in rows] == [
        ("base model", 2.0),
        ("base model", at),
        ("loha", 2.0),
        ("loha", at),
    ]
    as_benchmarked = rows[3]["scores"]
    for key in ("subject", "similarity", "background_seen", "background_unseen", "class_preservation"):
        assert as_benchmarked[key] == pytest.approx(record["scores"][key], abs=1e-3)  # the benchmark's own scores
    assert rows[2]["scores"] != as_benchmarked  # guidance changes the images
    for scores in (rows[2]["scores"], as_benchmarked):
        mean = sum(scores[f"subject_{b}"] for b in ("white", "gray", "black")) / 3
        assert scores["subject"] == pytest.approx(mean, abs=1e-6)
    text = (tmp_path / "sweep.md").read_text()
    assert "## circle (seen backgrounds: white, black)" in text and "(`benchmark.json`, every seed)" in text
    assert f"the benchmark scored them at {at:g})" in text
    assert "| LoHa | 2 | " in text and f"| LoHa | {at:g} | " in text and f"| base model | {at:g} | " in text
    assert json.loads((tmp_path / "sweep.json").read_text()) == rows
    cached = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()}
    assert len(cached) == 4
    notes = f"{guidance_sweep.NOTES_HEADING}\n\nWritten by hand.\n"
    (tmp_path / "sweep.md").write_text(text + "\n" + notes)
    assert guidance_sweep.main(args) == rows  # every score read back from the cache, none scored again
    assert (tmp_path / "sweep.md").read_text().endswith("\n" + notes)  # the hand-written section is kept
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "cache").iterdir()} == cached
