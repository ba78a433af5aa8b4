"""The evaluator's script: every subject stays within reach of the base model's VAE; bad folders are refused."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL

from scripts.train_toy_evaluator import main, vae_round_trip
from toyworld.evaluate import ToyEvaluator, as_uint8
from toyworld.paths import BASE_MODEL_DIR
from toyworld.subjects import SUBJECTS


@pytest.fixture(scope="module")
def vae() -> AutoencoderKL:
    return AutoencoderKL.from_pretrained(BASE_MODEL_DIR / "vae", torch_dtype=torch.float32).eval()


@pytest.mark.parametrize("name", SUBJECTS)
def test_the_vae_round_trip_of_the_instance_images_still_scores_as_the_subject(vae, name):
    """The ceiling: every generated image comes out of this decoder, so a subject it cannot reproduce is out of
    any adapter's reach (a fine red/blue checkerboard came back as stripes and scored 0.295)."""
    subject = SUBJECTS[name]
    instances = as_uint8(subject.instance_images())
    decoded = vae_round_trip(instances, vae)
    assert decoded.dtype == np.uint8 and decoded.shape == instances.shape
    assert np.array_equal(decoded, vae_round_trip(instances, vae))  # the posterior's mode: deterministic
    assert 0 < np.abs(decoded.astype(int) - instances).mean() < 20  # a real, lossy round trip
    probability = ToyEvaluator.load().subject_probability(decoded, subject)
    assert probability.mean() >= 0.9 and probability.min() >= 0.5, probability


def test_folders_it_cannot_use_are_refused_before_training(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--base-model", str(tmp_path), "--out", str(tmp_path / "evaluator")])
    assert exit_info.value.code == 2 and "has no vae/ folder" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "evaluator")])
    assert exit_info.value.code == 2 and "no shape.safetensors to keep; add --retrain-shape" in capsys.readouterr().err
    assert not (tmp_path / "evaluator").exists()


def test_keep_cnns_needs_every_file_it_keeps_and_trains_nothing(tmp_path, capsys):
    out = tmp_path / "evaluator"
    out.mkdir()
    (out / "shape.safetensors").write_bytes(b"")
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(out), "--keep-cnns"])
    assert exit_info.value.code == 2
    assert "has no subject.safetensors to keep (--keep-cnns trains nothing)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(out), "--keep-cnns", "--retrain-shape"])
    assert exit_info.value.code == 2 and "cannot be combined with --retrain-shape" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(out), "--keep-cnns", "--steps", "10"])
    assert exit_info.value.code == 2 and "cannot be combined with --steps" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["shape.safetensors"]
