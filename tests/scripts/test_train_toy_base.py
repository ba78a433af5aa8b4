"""scripts.train_toy_base: a run stopped and resumed ends with exactly the weights of an uninterrupted one."""

import json
from pathlib import Path

import pytest
from safetensors.torch import load_file

from scripts.train_toy_base import main, parse_args


def _args(folder: Path, *extra: str) -> list[str]:
    return [
        "--output-dir",
        str(folder),
        "--save-dir",
        str(folder / "pipe"),
        "--vae-steps",
        "2",
        "--unet-steps",
        "3",
        "--batch-size",
        "2",
        "--vae-batch-size",
        "2",
        "--checkpoint-every",
        "10",
        "--unet-channels",
        "32",
        "64",
        "--warmup-steps",
        "1",
        "--scale-samples",
        "16",
        "--num-threads",
        "1",
        *extra,
    ]


def test_stop_and_resume_is_bit_identical_to_one_run(tmp_path):
    whole = main(parse_args(_args(tmp_path / "whole")))
    assert whole == tmp_path / "whole" / "pipe"

    resumed = tmp_path / "resumed"
    assert main(parse_args(_args(resumed, "--stop-after", "1"))) is None  # stops inside the VAE
    assert main(parse_args(_args(resumed, "--stop-after", "2"))) is None  # VAE done, UNet step 1
    assert not (resumed / "pipe").exists()
    assert main(parse_args(_args(resumed))) == resumed / "pipe"

    files = sorted(p.relative_to(whole) for p in whole.rglob("*.safetensors"))
    assert len(files) == 4  # unet, vae, text_encoder, text_encoder_2
    for name in files:
        a, b = load_file(whole / name), load_file(resumed / "pipe" / name)
        assert a.keys() == b.keys()
        assert all(a[k].dtype == b[k].dtype and a[k].equal(b[k]) for k in a), name
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["minutes"] > 0 and summary["cpu_minutes"] > 0


def test_vae_from_a_saved_pipeline_skips_stage_one_and_keeps_that_vae(tmp_path):
    first = main(parse_args(_args(tmp_path / "first")))
    second = main(parse_args(_args(tmp_path / "second", "--vae-from", str(first))))
    assert not (tmp_path / "second" / "vae_state.pt").exists()
    a, b = (load_file(folder / "vae" / "diffusion_pytorch_model.safetensors") for folder in (first, second))
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)
    configs = (json.loads((folder / "vae" / "config.json").read_text()) for folder in (first, second))
    scaling = [config["scaling_factor"] for config in configs]
    assert len(set(scaling)) == 1
    summary = json.loads((tmp_path / "second" / "summary.json").read_text())
    assert summary["vae_minutes"] == 0 and summary["unet_minutes"] > 0


def test_bad_options_are_refused_in_one_sentence_before_any_work(tmp_path, capsys):
    for extra in (["--patterned-fraction", "1.5"], ["--vae-from", str(tmp_path / "nothing")]):
        with pytest.raises(SystemExit) as stop:
            parse_args(_args(tmp_path / "out", *extra))
        assert stop.value.code == 2
        assert ": error: --" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not (tmp_path / "out").exists()
