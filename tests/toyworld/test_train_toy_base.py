"""scripts/train_toy_base.py: a run stopped and resumed ends with exactly the weights of an uninterrupted one."""

import importlib.util
import json
import sys
from pathlib import Path

from safetensors.torch import load_file

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "train_toy_base.py"


def _script():
    spec = importlib.util.spec_from_file_location("train_toy_base", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up here
    spec.loader.exec_module(module)
    return module


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
    script = _script()
    whole = script.main(script.parse_args(_args(tmp_path / "whole")))
    assert whole == tmp_path / "whole" / "pipe"

    resumed = tmp_path / "resumed"
    assert script.main(script.parse_args(_args(resumed, "--stop-after", "1"))) is None  # stops inside the VAE
    assert script.main(script.parse_args(_args(resumed, "--stop-after", "2"))) is None  # VAE done, UNet step 1
    assert not (resumed / "pipe").exists()
    assert script.main(script.parse_args(_args(resumed))) == resumed / "pipe"

    files = sorted(p.relative_to(whole) for p in whole.rglob("*.safetensors"))
    assert len(files) == 4  # unet, vae, text_encoder, text_encoder_2
    for name in files:
        a, b = load_file(whole / name), load_file(resumed / "pipe" / name)
        assert a.keys() == b.keys()
        assert all(a[k].dtype == b[k].dtype and a[k].equal(b[k]) for k in a), name
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["minutes"] > 0 and summary["cpu_minutes"] > 0
