"""Flags, the TOML/YAML config file, and one-line errors for bad flags."""

from __future__ import annotations

import pytest

from lily_diffusion.config import LilyConfig
from lily_diffusion.training.args import build_parser, parse_args

REQUIRED = ["--pretrained_model_name_or_path", "model", "--instance_data_dir", "data", "--instance_prompt", "sks"]


def test_defaults_match_the_diffusers_script():
    args = parse_args(REQUIRED)
    assert args.adapter == "lily"
    assert (args.resolution, args.train_batch_size, args.learning_rate, args.rank) == (1024, 4, 1e-4, 4)
    assert (args.lr_scheduler, args.lr_warmup_steps, args.checkpointing_steps) == ("constant", 500, 500)
    assert (args.optimizer, args.adam_weight_decay, args.text_encoder_lr) == ("adamw", 1e-4, 5e-6)
    assert args.report_to == "tensorboard" and args.mixed_precision is None
    defaults = LilyConfig()  # the Lily flags default to LilyConfig's own values, so --help can show them
    assert (args.lily_r, args.lily_stride_A, args.lily_num_B) == (defaults.r, defaults.stride_A, defaults.num_B)
    assert (args.lily_scaling, args.lily_routing, args.target_modules) == (
        1.0,
        "sample",
        list(defaults.target_modules),
    )


def test_every_diffusers_flag_is_accepted():
    diffusers_flags = """pretrained_model_name_or_path pretrained_vae_model_name_or_path revision variant dataset_name
        dataset_config_name instance_data_dir cache_dir image_column caption_column repeats class_data_dir
        instance_prompt class_prompt validation_prompt num_validation_images validation_epochs do_edm_style_training
        with_prior_preservation prior_loss_weight num_class_images output_dir output_kohya_format seed resolution
        center_crop random_flip train_text_encoder train_batch_size sample_batch_size num_train_epochs max_train_steps
        checkpointing_steps checkpoints_total_limit resume_from_checkpoint gradient_accumulation_steps
        gradient_checkpointing learning_rate text_encoder_lr scale_lr lr_scheduler snr_gamma lr_warmup_steps
        lr_num_cycles lr_power dataloader_num_workers optimizer use_8bit_adam adam_beta1 adam_beta2 prodigy_beta3
        prodigy_decouple adam_weight_decay adam_weight_decay_text_encoder adam_epsilon prodigy_use_bias_correction
        prodigy_safeguard_warmup max_grad_norm push_to_hub hub_token hub_model_id logging_dir allow_tf32 report_to
        mixed_precision prior_generation_precision local_rank enable_xformers_memory_efficient_attention rank
        use_dora image_interpolation_mode""".split()
    ours = {a.dest for a in build_parser()._actions}
    assert sorted(set(diffusers_flags) - ours) == []


def test_diffusers_style_values_parse():
    args = parse_args([
        *REQUIRED, "--optimizer", "Prodigy", "--prodigy_decouple=False", "--prodigy_safeguard_warmup",
        "--mixed_precision", "bf16", "--target_modules", "to_q", "to_v", "--lr_scheduler", "cosine",
    ])  # fmt: skip
    assert args.optimizer == "prodigy"
    assert args.prodigy_decouple is False and args.prodigy_safeguard_warmup is True
    assert args.target_modules == ["to_q", "to_v"] and args.lr_scheduler == "cosine"


def test_toml_config_with_command_line_override(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text(
        'pretrained_model_name_or_path = "model"\ninstance_data_dir = "data"\ninstance_prompt = "sks"\n'
        'learning_rate = 3e-4\nlily_r = 16\ntarget_modules = ["to_q", "to_k"]\nrandom_flip = true\n'
        'train_text_encoder = false\noptimizer = "prodigy"\nprodigy_decouple = false\n'
    )
    args = parse_args(["--config_file", str(config), "--lily_r", "8"])
    assert args.lily_r == 8  # the command line wins
    assert args.learning_rate == 3e-4 and args.target_modules == ["to_q", "to_k"]
    assert args.random_flip is True and args.train_text_encoder is False and args.prodigy_decouple is False


def test_yaml_config_values_are_typed_by_the_parser(tmp_path):
    config = tmp_path / "run.yaml"
    # YAML reads `1e-4` as a string; argparse's type turns it into a float.
    config.write_text("instance_prompt: sks\nlearning_rate: 1e-4\nmax_train_steps: 7\nadapter: LoRA\n")
    cli = ["--config_file", str(config), "--pretrained_model_name_or_path", "m", "--instance_data_dir", "d"]
    args = parse_args(cli)
    assert args.learning_rate == pytest.approx(1e-4) and args.max_train_steps == 7 and args.adapter == "lora"


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--instance_data_dir", "d", "--instance_prompt", "p"], "--pretrained_model_name_or_path is required"),
        ([*REQUIRED, "--with_prior_preservation", "--class_data_dir", "c"], "needs --class_prompt"),
        ([*REQUIRED, "--with_prior_preservation", "--class_prompt", "c"], "needs --class_data_dir"),
        ([*REQUIRED, "--lily_r", "0"], "--lily_r must be at least 1"),
        ([*REQUIRED, "--adapter", "boft"], "invalid choice"),
        ([*REQUIRED, "--learning_rate", "fast"], "invalid float value"),
        (
            [*REQUIRED, "--match_lora_budget", "4", "--adapter", "lora"],
            "--match_lora_budget needs --adapter lily, dora, lokr or loha",
        ),
        ([*REQUIRED, "--use_dora"], "--use_dora needs --adapter lora or dora"),
        (
            [*REQUIRED, "--adapter", "loha", "--lokr_decompose_factor", "4"],
            "--lokr_decompose_factor needs --adapter lokr",
        ),
        ([*REQUIRED, "--adapter", "lokr", "--lokr_decompose_factor", "0"], "must be -1 or at least 1, got 0"),
        ([*REQUIRED, "--adapter", "lokr", "--lora_dropout", "0.1"], "--lora_dropout does not apply to --adapter lokr"),
        (
            [*REQUIRED, "--adapter", "loha", "--rank", "2", "--match_lora_budget", "4"],
            "--rank and --match_lora_budget both set the rank: give one of them",
        ),
        ([*REQUIRED, "--do_edm_style_training"], "not supported"),
        ([*REQUIRED, "--lora_dropout", "1.5"], "--lora_dropout must be in [0, 1)"),
    ],
)
def test_bad_flags_give_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("bad.toml", "learning_rate = [", "cannot parse config file"),
        ("bad.yaml", "- just\n- a list\n", "must hold a table"),
        ("unknown.yaml", "not_a_flag: 1\n", "unknown key 'not_a_flag'"),
        ("flag.yaml", "random_flip: maybe\n", "random_flip in"),
        ("list.yaml", "learning_rate: [1, 2]\n", "takes one value"),
        ("run.json", "{}", "must end in .toml, .yaml or .yml"),
    ],
)
def test_bad_config_files_give_one_line(tmp_path, capsys, name, text, message):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(SystemExit):
        parse_args([*REQUIRED, "--config_file", str(path)])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_missing_config_file(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_args([*REQUIRED, "--config_file", str(tmp_path / "nope.toml")])
    assert "does not exist" in capsys.readouterr().err


def test_help_renders_with_every_lily_flag():
    text = build_parser().format_help()
    for flag in ("--adapter", "--lily_r", "--lily_stride_A", "--lily_num_B", "--lily_scaling", "--lily_routing",
                 "--target_modules", "--match_lora_budget", "--config_file"):  # fmt: skip
        assert flag in text


def test_every_flag_is_in_exactly_one_options_group():
    from dataclasses import fields

    from lily_diffusion.training.options import GROUP_TYPES

    names = [field.name for group in GROUP_TYPES for field in fields(group)]
    flags = {action.dest for action in build_parser()._actions if action.dest != "help"}
    assert len(names) == len(set(names)) and set(names) == flags
