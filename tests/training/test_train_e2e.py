"""End to end: `accelerate launch train_dreambooth_lily.py` on the tiny SDXL pipeline, then load the result."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from lily_diffusion import load_lily_weights
from lily_diffusion.backends import get_backend

PROMPT = "a photo of sks square"


def generate(pipe: StableDiffusionXLPipeline, seed: int = 0) -> np.ndarray:
    """One 16x16 image as floats, from a fixed seed."""
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    image = pipe(PROMPT, num_inference_steps=2, height=16, width=16, generator=generator, output_type="np").images
    return image[0]


def tensorboard(output_dir: Path) -> EventAccumulator:
    """The run's TensorBoard logs."""
    events = EventAccumulator(str(output_dir / "logs" / "dreambooth-lily"))
    events.Reload()
    return events


def scalars(output_dir: Path, tag: str) -> list[float]:
    """A scalar series from the run's TensorBoard logs."""
    return [event.value for event in tensorboard(output_dir).Scalars(tag)]


def test_lily_training_end_to_end(run_cli, base_args, lily_args, odd_images_dir, tiny_sdxl_path, tmp_path):
    out = tmp_path / "out"
    result = run_cli([
        *base_args, *lily_args,
        "--instance_data_dir", odd_images_dir, "--instance_prompt", PROMPT, "--output_dir", out,
        "--max_train_steps", "4", "--learning_rate", "1e-2", "--random_flip",
        "--validation_prompt", PROMPT, "--num_validation_images", "2", "--validation_steps", "2",
        "--report_to", "tensorboard",
    ])  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    # the corrupt file is skipped with a warning naming it; the other six odd images are used
    assert "skipping unreadable instance file" in result.stderr and "corrupt.png" in result.stderr
    assert "6 instance images" in result.stderr
    assert json.loads((out / "training_args.json").read_text())["max_train_steps"] == 4
    assert {p.name for p in (out / "validation").iterdir()} == {"step_000002.png", "step_000004.png", "final.png"}
    grid = Image.open(out / "validation" / "step_000004.png")
    assert grid.width >= 2 * 16 and grid.height > 16  # two images under a label band
    events = tensorboard(out)
    losses = [event.value for event in events.Scalars("loss")]
    assert len(losses) == 4 and all(np.isfinite(losses))
    assert {"validation", "test"} <= set(events.Tags()["images"])  # step grids and the reloaded final one

    weights = out / "pytorch_lily_weights.safetensors"
    with safe_open(str(weights), framework="pt") as handle:
        assert handle.metadata()["format"] == "lily_diffusion"
        keys = list(handle.keys())
    assert keys and all(k.startswith("unet.") for k in keys)
    pools = [t for k, t in load_file(str(weights)).items() if k.endswith(".lily_B")]
    assert pools and all(p.abs().max() > 0 for p in pools)  # B starts at zero: it was trained

    base = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    before = generate(base)
    load_lily_weights(base, out)
    after = generate(base)
    assert after.shape == (16, 16, 3) and np.isfinite(after).all()
    assert np.abs(after - before).max() > 1e-4  # the adapter changes the output


def test_lora_training_from_yaml_config(run_cli, base_args, subject_dir, tiny_sdxl_path, tmp_path):
    out = tmp_path / "out"
    config = tmp_path / "train.yaml"
    config.write_text(
        "adapter: lora\nrank: 2\nlora_alpha: 4\nmax_train_steps: 50\nlearning_rate: 1e-2\n"
        f"instance_prompt: {PROMPT}\ncenter_crop: true\ncache_latents: true\n"
    )
    result = run_cli([
        *base_args, "--config_file", config, "--max_train_steps", "2",
        "--instance_data_dir", subject_dir, "--output_dir", out,
    ])  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    saved_args = json.loads((out / "training_args.json").read_text())
    assert saved_args["max_train_steps"] == 2  # the command line overrides the file
    assert saved_args["adapter"] == "lora" and saved_args["rank"] == 2
    assert saved_args["center_crop"] is True and saved_args["cache_latents"] is True
    assert (out / "pytorch_lora_weights.safetensors").is_file()
    assert not (out / "pytorch_lily_weights.safetensors").exists()
    card = (out / "README.md").read_text()  # the model card, LoRA flavour
    assert "- lora\n" in card and f"pipe.load_lora_weights({str(out.resolve())!r})" in card
    assert '{"rank": 2}' in card

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    before = generate(pipe)
    pipe.load_lora_weights(out)
    config_loaded = pipe.unet.peft_config["default_0"]
    assert config_loaded.r == 2 and config_loaded.lora_alpha == 4
    after = generate(pipe)
    assert np.isfinite(after).all() and np.abs(after - before).max() > 1e-4


@pytest.mark.parametrize("adapter", ["lora", "dora"])
def test_lora_beyond_attention_loads_every_trained_layer(
    run_cli, base_args, subject_dir, tiny_sdxl_path, tmp_path, adapter
):
    # diffusers renames only the attention projections of a UNet LoRA; a file mixing its names with peft's for
    # proj_in / ff layers loads through `load_lora_weights` with the attention layers silently left untrained
    out = tmp_path / "out"
    targets = r".*(to_q|to_k|to_v|to_out\.0|ff\.net\.0\.proj|ff\.net\.2|proj_in|proj_out)$"
    result = run_cli([
        *base_args, "--adapter", adapter, "--rank", "2", "--max_train_steps", "2", "--learning_rate", "1e-2",
        "--target_modules", targets, "--instance_prompt", PROMPT, "--instance_data_dir", subject_dir,
        "--output_dir", out, "--output_kohya_format" if adapter == "lora" else "--cache_latents",
    ])  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    saved = load_file(out / "pytorch_lora_weights.safetensors")
    ups = {k.removesuffix(".lora.up.weight"): v for k, v in saved.items() if k.endswith(".lora.up.weight")}
    assert not [k for k in saved if ".lora_A." in k or ".lora_B." in k]  # one naming for every layer
    kinds = {name.rsplit(".", 1)[-1] if "ff.net" not in name else "ff" for name in ups}
    assert kinds >= {"to_q", "to_k", "to_v", "0", "ff", "proj_in", "proj_out"}

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    pipe.load_lora_weights(out)
    loaded = {
        f"unet.{name}": module.lora_B["default_0"].weight
        for name, module in pipe.unet.named_modules()
        if hasattr(module, "lora_B") and "default_0" in module.lora_B
    }
    assert loaded.keys() == ups.keys()  # every trained layer has its LoRA ...
    assert all(torch.equal(loaded[name], up) for name, up in ups.items())  # ... with the trained weights
    assert all(up.abs().max() > 0 for up in ups.values())  # trained: B left its zero init everywhere
    if adapter == "lora":
        assert len(load_file(out / "pytorch_lora_weights_kohya.safetensors")) >= 2 * len(ups)


def test_lily_text_encoders_captions_bf16(run_cli, base_args, lily_args, captioned_dir, tiny_sdxl_path, tmp_path):
    out = tmp_path / "out"
    result = run_cli([
        *base_args, *lily_args,
        "--instance_data_dir", captioned_dir, "--caption_column", "text", "--instance_prompt", PROMPT,
        "--output_dir", out, "--max_train_steps", "2", "--learning_rate", "1e-2", "--train_text_encoder",
        "--text_encoder_lr", "1e-2",
        "--dataloader_num_workers", "1", "--mixed_precision", "bf16", "--gradient_checkpointing",
        "--validation_prompt", PROMPT, "--num_validation_images", "1",
    ])  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "3 instance images, 2 with their own caption" in result.stderr
    assert "Mixed precision type: bf16" in result.stderr
    assert (out / "validation" / "final.png").is_file()
    tensors = load_file(str(out / "pytorch_lily_weights.safetensors"))
    assert {t.dtype for t in tensors.values()} == {torch.float32}  # trainable weights stay fp32 under bf16
    for component in ("unet", "text_encoder", "text_encoder_2"):
        pools = [t for k, t in tensors.items() if k.startswith(f"{component}.") and k.endswith(".lily_B")]
        assert pools and any(p.abs().max() > 0 for p in pools), component

    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    load_lily_weights(pipe, out)
    assert all(hasattr(getattr(pipe, c), "lily_adapters") for c in ("unet", "text_encoder", "text_encoder_2"))
    assert np.isfinite(generate(pipe)).all()


def test_prior_preservation_generates_missing_class_images(run_cli, base_args, lily_args, subject_dir, tmp_path):
    out, class_dir = tmp_path / "out", tmp_path / "class"
    class_dir.mkdir()
    Image.new("RGB", (20, 20), (128, 128, 128)).save(class_dir / "existing.png")
    result = run_cli([
        *base_args, *lily_args,
        "--instance_data_dir", subject_dir, "--instance_prompt", PROMPT, "--output_dir", out,
        "--with_prior_preservation", "--class_data_dir", class_dir, "--class_prompt", "a photo of square",
        "--num_class_images", "3", "--sample_batch_size", "2", "--max_train_steps", "2",
        "--gradient_accumulation_steps", "2", "--snr_gamma", "5", "--noise_offset", "0.05",
    ])  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Generating class images" in result.stderr
    generated = sorted(p for p in class_dir.iterdir() if p.name != "existing.png")
    assert [p.name.split("-")[0] for p in generated] == ["1", "2"]
    assert all(Image.open(p).size == (16, 16) for p in generated)
    assert (out / "pytorch_lily_weights.safetensors").is_file()


def _train(run_cli, args: list, out: Path, steps: int, extra: tuple = ()) -> None:
    result = run_cli([*args, "--output_dir", out, "--max_train_steps", str(steps), *extra])
    assert result.returncode == 0, result.stderr[-4000:]


# Each adapter kind with small settings (LoKr split 2 x 32 on the tiny model's 64-wide layers: a low-rank w2).
KIND_FLAGS = {
    "lora": ["--adapter", "lora", "--rank", "2"],
    "dora": ["--adapter", "dora", "--rank", "2"],
    "lokr": ["--adapter", "lokr", "--rank", "3", "--lokr_decompose_factor", "2"],
    "loha": ["--adapter", "loha", "--rank", "2"],
}


@pytest.mark.parametrize("kind", ["lily", *KIND_FLAGS])
def test_checkpoint_limit_and_resume_give_the_same_weights(
    run_main, base_args, lily_args, subject_dir, tmp_path, kind
):
    """Six steps straight, or three, then three more resumed from the checkpoint: the same weights, for each kind
    (in-process runs: the subprocess path is covered by the other tests)."""
    args = [
        *base_args, *(lily_args if kind == "lily" else KIND_FLAGS[kind]),
        "--instance_data_dir", subject_dir, "--instance_prompt", PROMPT,
        "--learning_rate", "1e-2", "--random_flip", "--train_batch_size", "1", "--checkpointing_steps", "3",
    ]  # fmt: skip
    weight_name = get_backend(kind).weight_name
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_main([*args, "--output_dir", straight, "--max_train_steps", "6", "--checkpoints_total_limit", "1"])
    assert sorted(p.name for p in straight.glob("checkpoint-*")) == ["checkpoint-6"]  # checkpoint-3 was pruned
    run_main([*args, "--output_dir", resumed, "--max_train_steps", "3"])
    assert sorted(p.name for p in resumed.glob("checkpoint-*")) == ["checkpoint-3"]
    at_three = load_file(str(resumed / "checkpoint-3" / weight_name))
    run_main([*args, "--output_dir", resumed, "--max_train_steps", "6", "--resume_from_checkpoint", "latest"])

    a = load_file(str(straight / weight_name))
    b = load_file(str(resumed / weight_name))
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key  # bit for bit
    assert max((a[k] - at_three[k]).abs().max() for k in a) > 1e-4  # steps 4-6 really trained
    checkpoint = load_file(str(straight / "checkpoint-6" / weight_name))
    assert all(torch.equal(checkpoint[k], a[k]) for k in a)


def test_two_processes_save_one_file(run_cli, base_args, lily_args, subject_dir, tmp_path):
    out = tmp_path / "out"
    result = run_cli(
        [
            *base_args, *lily_args, "--instance_data_dir", subject_dir, "--instance_prompt", PROMPT,
            "--output_dir", out, "--max_train_steps", "3", "--checkpointing_steps", "2", "--train_batch_size", "1",
            "--train_text_encoder", "--learning_rate", "1e-2",
        ],
        num_processes=2,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Num processes: 2" in result.stderr and "MULTI_CPU" in result.stderr
    assert [p.name for p in out.glob("*.safetensors")] == ["pytorch_lily_weights.safetensors"]
    checkpoint = out / "checkpoint-2"
    assert (checkpoint / "random_states_0.pkl").is_file() and (checkpoint / "random_states_1.pkl").is_file()
    assert [p.name for p in checkpoint.glob("*.safetensors")] == ["pytorch_lily_weights.safetensors"]
    tensors = load_file(str(out / "pytorch_lily_weights.safetensors"))
    assert {k.split(".")[0] for k in tensors} == {"unet", "text_encoder", "text_encoder_2"}
    assert all(torch.isfinite(t).all() for t in tensors.values())


def test_training_reduces_the_loss(run_cli, base_args, subject_dir, tmp_path):
    """Same seed, so both runs see identical batches, noise and timesteps: only the learning rate differs.
    Lily with its default configuration (r=32, stride_A=10, num_B=8)."""
    common = [
        *base_args, "--instance_data_dir", subject_dir, "--instance_prompt", PROMPT,
        "--train_batch_size", "4", "--report_to", "tensorboard",
    ]  # fmt: skip
    _train(run_cli, common, tmp_path / "trained", 24, ("--learning_rate", "1e-2"))
    _train(run_cli, common, tmp_path / "frozen", 24, ("--learning_rate", "0"))
    trained = np.array(scalars(tmp_path / "trained", "loss"))
    frozen = np.array(scalars(tmp_path / "frozen", "loss"))
    assert len(trained) == len(frozen) == 24
    assert trained[-8:].mean() < trained[:8].mean()
    assert (trained[-8:] / frozen[-8:]).mean() < 0.95  # step for step, the trained adapter predicts better


def test_non_finite_loss_stops_and_keeps_the_last_checkpoint(run_cli, base_args, lily_args, subject_dir, tmp_path):
    out = tmp_path / "out"
    result = run_cli([
        *base_args, *lily_args, "--instance_data_dir", subject_dir, "--instance_prompt", PROMPT,
        "--output_dir", out, "--max_train_steps", "5", "--checkpointing_steps", "1", "--learning_rate", "1e30",
    ])  # fmt: skip
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last_line = result.stderr.strip().splitlines()[-1]
    assert last_line.startswith("error: non-finite loss") and "checkpoint-1" in last_line
    assert not (out / "pytorch_lily_weights.safetensors").exists()
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-1"]
    tensors = load_file(str(out / "checkpoint-1" / "pytorch_lily_weights.safetensors"))
    assert all(torch.isfinite(t).all() for t in tensors.values())
