"""benchmarks/subject_driven.py end to end in its smallest form: parallel runs, the tables, the plot, resuming."""

import json
import re

import pytest

from benchmarks import subject_driven

SCORE_HEADERS = [
    "subject fidelity",
    "subject similarity",
    "prompt fidelity, seen backgrounds",
    "prompt fidelity, unseen background",
    "class preservation",
]


def table_rows(report):
    table = report.split("\n\n")[2]  # title, settings, then the headline table
    lines = table.splitlines()
    header = [cell.strip() for cell in lines[0].strip("|").split("|")]
    return header, [[cell.strip() for cell in line.strip("|").split("|")] for line in lines[2:]]


def test_quick_benchmark_runs_in_parallel_writes_its_tables_and_resumes(tmp_path):
    work_dir, results = tmp_path / "runs", tmp_path / "out" / "subject_driven.md"
    flags = ["--quick", "--steps", "3", "--inference_steps", "2", "--jobs", "2", "--work_dir", str(work_dir)]
    report = subject_driven.main([*flags, "--results", str(results)])

    header, rows = table_rows(report)
    assert header == ["method", "budget (LoRA rank)", "lr", "prior", "params", *SCORE_HEADERS, "n"]
    assert [row[0] for row in rows] == ["base model (no training)", "Lily", "LoRA"]
    for row in rows[1:]:
        assert row[1:4] == ["4", "0.003", "off"] and row[-1] == "1"
        values = [float(cell.removesuffix(" (n=1)")) for cell in row[5:-1]]
        assert all(-1.0 <= v <= 1.0 for v in values)  # similarity is a cosine
        assert all(0.0 <= v <= 1.0 for i, v in enumerate(values) if i != 1)  # the others are fractions
    assert int(rows[1][4].replace(",", "")) <= int(rows[2][4].replace(",", "")) == 32768
    assert "- budget of LoRA rank 4: Lily (32,000 params" in report and "sign test p = " in report
    assert "### subject star" in report and "2 training processes with one torch thread each" in report
    assert results.read_text() == report
    data = json.loads(results.with_suffix(".json").read_text())
    assert [(r["method"], r["subject"], r["budget_rank"]) for r in data["runs"]] == [
        ("lily", "star", 4),
        ("lora", "star", 4),
    ]
    assert (results.parent / "subject_driven_params.png").stat().st_size > 1000
    assert len(list((work_dir / "scores").glob("*.json"))) == 3  # the base model and the two runs

    # a second start with the same work_dir is refused without --resume, and with it reuses every score
    with pytest.raises(SystemExit):
        subject_driven.main([*flags, "--results", str(results)])
    adapter = next((work_dir / "lily-lr0.003-noprior-seed0").glob("*.safetensors"))
    trained_at = adapter.stat().st_mtime_ns
    again = subject_driven.main([*flags, "--resume", "--results", str(tmp_path / "again.md")])
    assert adapter.stat().st_mtime_ns == trained_at  # not trained again
    assert table_rows(again) == table_rows(report)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--resume"], "--resume needs --work_dir"),
        (["--jobs", "0"], "--jobs must be at least 1"),
        (["--steps", "0"], "--steps must be at least 1"),
        (["--inference_steps", "0"], "--inference_steps must be at least 1"),
        (["--learning_curve", "no/such/curve.json"], "is not a file"),
    ],
)
def test_bad_flags_are_refused_in_one_line(flags, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        subject_driven.parse_args(flags)
    assert exit_info.value.code == 2
    assert re.search(re.escape(message), capsys.readouterr().err)
