"""Prodigy and bitsandbytes' 8-bit AdamW for real: the tiny pipeline trains, checkpoints and resumes with them."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from lily_diffusion.training.args import parse_args
from lily_diffusion.training.errors import TrainingError
from lily_diffusion.training.optim import check_optimizer_backend
from tests.training.test_train_e2e import PROMPT, scalars

bitsandbytes = pytest.importorskip("bitsandbytes")
prodigyopt = pytest.importorskip("prodigyopt")


def tensors(tree: object) -> list[torch.Tensor]:
    """Every tensor in nested dicts."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    return [t for value in tree.values() for t in tensors(value)] if isinstance(tree, dict) else []


REQUIRED = ["--pretrained_model_name_or_path", "m", "--instance_data_dir", "d", "--instance_prompt", "p"]
WEIGHTS = "pytorch_lily_weights.safetensors"


@pytest.mark.parametrize(
    ("flags", "eight_bit"),
    [
        (["--optimizer", "prodigy", "--learning_rate", "1.0", "--prodigy_safeguard_warmup"], False),
        # r=32: each expert pool B [2, 32, 64] has 4096 elements, the size from which bitsandbytes keeps 8-bit state
        (["--use_8bit_adam", "--learning_rate", "1e-2", "--lily_r", "32"], True),
    ],
    ids=["prodigy", "8bit-adamw"],
)
def test_trains_checkpoints_and_resumes_exactly(
    run_cli, base_args, lily_args, subject_dir, tmp_path, flags, eight_bit
):
    common = [*base_args, *lily_args, *flags, "--instance_data_dir", subject_dir, "--instance_prompt", PROMPT,
              "--checkpointing_steps", "1", "--report_to", "tensorboard"]  # fmt: skip
    whole, split = tmp_path / "whole", tmp_path / "split"
    for args in (
        [*common, "--output_dir", whole, "--max_train_steps", "2"],
        [*common, "--output_dir", split, "--max_train_steps", "1"],
        [*common, "--output_dir", split, "--max_train_steps", "2", "--resume_from_checkpoint", "latest"],
    ):
        result = run_cli(args)
        assert result.returncode == 0, result.stderr[-4000:]
    assert f"resuming from {split / 'checkpoint-1'}" in result.stderr
    losses = scalars(whole, "loss")
    assert len(losses) == 2 and np.isfinite(losses).all()
    trained = load_file(str(whole / WEIGHTS))
    pools = [tensor for key, tensor in trained.items() if key.endswith(".lily_B")]
    assert pools and all(pool.abs().max() > 0 for pool in pools)  # B starts at zero: the optimizer moved it
    step_one = load_file(str(split / "checkpoint-1" / WEIGHTS))
    assert any(not torch.equal(step_one[key], trained[key]) for key in trained)  # step 2 moved them again
    resumed = load_file(str(split / WEIGHTS))
    assert resumed.keys() == trained.keys()
    for key, tensor in trained.items():
        torch.testing.assert_close(resumed[key], tensor, rtol=0, atol=0, msg=key)
    state = torch.load(split / "checkpoint-1" / "optimizer.bin", weights_only=False)
    assert state["state"], "the checkpoint holds the optimizer's state"
    if eight_bit:  # 8-bit moments (bitsandbytes nests them in the saved state)
        assert torch.uint8 in {tensor.dtype for tensor in tensors(state["state"])}
    else:  # Prodigy's step-size estimate d is part of each group
        assert all("d" in group for group in state["param_groups"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--optimizer", "prodigy", "--use_8bit_adam"], "--use_8bit_adam needs --optimizer adamw"),
        (["--prodigy_beta3", "0.9"], "--prodigy_beta3 applies only to --optimizer prodigy"),
        (["--prodigy_decouple=false", "--prodigy_use_bias_correction", "false"],
         "--prodigy_decouple and --prodigy_use_bias_correction apply only to --optimizer prodigy"),
        (["--text_encoder_lr", "1e-5"], "--text_encoder_lr applies only with --train_text_encoder"),
        (["--adam_weight_decay_text_encoder", "0.1", "--text_encoder_target_modules", "q_proj"],
         "--adam_weight_decay_text_encoder and --text_encoder_target_modules apply only with --train_text_encoder"),
        (["--optimizer", "prodigy", "--train_text_encoder", "--text_encoder_lr", "1e-5"],
         "--text_encoder_lr does not apply to --optimizer prodigy"),
    ],
)  # fmt: skip
def test_flags_the_optimizer_would_ignore_are_refused(capsys, flags, message):
    with pytest.raises(SystemExit) as exit_info:
        parse_args([*REQUIRED, *flags])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_flags_the_optimizer_uses_are_accepted():
    parse_args([*REQUIRED, "--optimizer", "prodigy", "--prodigy_beta3", "0.9", "--train_text_encoder",
                "--adam_weight_decay_text_encoder", "0.1"])  # fmt: skip
    parse_args([*REQUIRED, "--use_8bit_adam", "--train_text_encoder", "--text_encoder_lr", "1e-5"])


def test_8bit_adamw_runs_on_this_cpu():
    check_optimizer_backend(parse_args([*REQUIRED, "--use_8bit_adam"]), torch.device("cpu"))


def test_a_bitsandbytes_without_a_kernel_for_the_device_is_one_line_before_any_work(monkeypatch):
    """What a bitsandbytes release without a CPU backend does at its first 8-bit step (torch's dispatcher)."""

    def no_kernel(*args, **kwargs):
        raise NotImplementedError(
            "Could not run 'bitsandbytes::optimizer_update_8bit_blockwise' with arguments from the 'CPU' backend.\n"
            "This could be because the operator doesn't exist for this backend."
        )

    monkeypatch.setattr(bitsandbytes.functional, "optimizer_update_8bit_blockwise", no_kernel)
    args = parse_args([*REQUIRED, "--use_8bit_adam"])
    with pytest.raises(TrainingError) as error:
        check_optimizer_backend(args, torch.device("cpu"))
    assert str(error.value) == (
        f"--use_8bit_adam: bitsandbytes {bitsandbytes.__version__} cannot run 8-bit AdamW on cpu "
        "(NotImplementedError: Could not run 'bitsandbytes::optimizer_update_8bit_blockwise' with arguments from "
        "the 'CPU' backend.); install a bitsandbytes release with a cpu backend or leave out --use_8bit_adam"
    )


def test_lora_with_the_text_encoders_trains_resumes_and_loads(
    run_cli, base_args, subject_dir, tiny_sdxl_path, tmp_path
):
    """transformers 5's own add_adapter asks for a peft newer than any release: the text encoders get peft's
    inject_adapter_in_model (found by benchmarks.full_sdxl_e2e, whose LoRA phase trains the text encoders)."""
    from diffusers import StableDiffusionXLPipeline

    out = tmp_path / "out"
    common = [*base_args, "--adapter", "lora", "--rank", "2", "--train_text_encoder", "--text_encoder_lr", "1e-2",
              "--learning_rate", "1e-2", "--instance_data_dir", subject_dir, "--instance_prompt", PROMPT,
              "--output_dir", out, "--checkpointing_steps", "1"]  # fmt: skip
    for extra in (["--max_train_steps", "1"], ["--max_train_steps", "2", "--resume_from_checkpoint", "latest"]):
        result = run_cli([*common, *extra])
        assert result.returncode == 0, result.stderr[-4000:]
    state = load_file(str(out / "pytorch_lora_weights.safetensors"))
    assert {key.split(".")[0] for key in state} == {"unet", "text_encoder", "text_encoder_2"}
    pipe = StableDiffusionXLPipeline.from_pretrained(tiny_sdxl_path)
    pipe.load_lora_weights(out)
    assert any("lora" in name for name, _ in pipe.text_encoder_2.named_parameters())
