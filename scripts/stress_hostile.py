"""More hostile inputs in the spirit of issue 9: a bad value for every numeric flag of the training script and
lily-grid, and bad files of every kind they load (adapter files, checkpoints, config files, captions, images, base
models). Same `Case`/`Step` data as `stress_cases`."""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

from . import stress_files as files
from .stress_cases import (
    FIRST_IMAGE,
    FIRST_IMAGE_STEM,
    LILY,
    Case,
    Fixtures,
    all_of,
    copy_run,
    grid,
    images,
    lily_variant,
    load,
    made,
    refuse_train,
    train,
    write,
)

HUGE_INT = "100000000000000000000"  # 10**20
BACKTRACKING = r"(?:(\w+)\.?(?(1)|x))+[!?]"  # exponential matching time on module names, even for `regex`
INT_VALUES = ("abc", "1.5", "-1", "0", HUGE_INT)
FLOAT_VALUES = ("abc", "nan", "inf", "-1", "0", "1e39")
# Where a value other than a positive integer / non-negative float is valid.
INT_ZERO_OK = frozenset({"num_class_images", "dataloader_num_workers", "lr_warmup_steps", "seed", "validation_seed"})
INT_NEGATIVE_OK = frozenset({"local_rank"})
FLOAT_NEGATIVE_OK = frozenset({"lily_scaling"})
FLOAT_ZERO_REFUSED = frozenset({"snr_gamma", "lily_scaling"})
HUGE_REFUSED = frozenset({"seed", "validation_seed"})
# A huge value asks for a long run, which is not a fault: not tried.
HUGE_NOT_TRIED = frozenset({"max_train_steps"})


def numeric_flags() -> list[tuple[str, str]]:
    """(flag name, 'int' or 'float') for every flag of the training script that takes one number."""
    from lily_diffusion.training.args import build_parser

    found = []
    for action in build_parser()._actions:
        if not action.option_strings or action.nargs not in (None, "?"):
            continue
        default = action.default
        if action.type is float or (isinstance(default, float) and action.type is None):
            found.append((action.dest, "float"))
        elif action.type is int or (
            isinstance(default, int) and not isinstance(default, bool) and action.type is None
        ):
            found.append((action.dest, "int"))
    return found


def _expectation(name: str, kind: str, value: str) -> str:
    """What a bad value of a flag must lead to: 'refuse', 'ok', or 'either' (a one-line refusal or a quick run)."""
    if value in ("abc", "1.5", "nan", "inf", "1e39"):
        return "refuse"
    if value == "-1":
        return "ok" if name in (INT_NEGATIVE_OK | FLOAT_NEGATIVE_OK) else "refuse"
    if value == "0":
        if kind == "int":
            return "ok" if name in INT_ZERO_OK | INT_NEGATIVE_OK else "refuse"
        return "refuse" if name in FLOAT_ZERO_REFUSED else "either"
    return "refuse" if name in HUGE_REFUSED else "either"  # 10**20


INT_MAX = "2147483647"  # the largest value the count flags take: a memory bomb where a flag sizes something
INT_MAX_TRIED = ("repeats", "lily_r", "lily_num_B", "lily_stride_A", "match_lora_budget", "train_batch_size",
                 "gradient_accumulation_steps", "checkpointing_steps", "checkpoints_total_limit",
                 "local_rank")  # fmt: skip
EMPTY_TRIED = ("output_dir", "instance_data_dir", "class_data_dir", "pretrained_vae_model_name_or_path",
               "resume_from_checkpoint", "config_file", "logging_dir", "cache_dir", "dataset_name")  # fmt: skip


def flag_cases() -> list[Case]:
    """Every numeric training flag with each value of INT_VALUES / FLOAT_VALUES; a refusal must name the flag."""
    cases = []
    for name, kind in numeric_flags():
        for value in INT_VALUES if kind == "int" else FLOAT_VALUES:
            if value == HUGE_INT and name in HUGE_NOT_TRIED:
                continue
            expect = _expectation(name, kind, value)
            says = (f"--{name}",) if expect == "refuse" else ()
            step = train(f"--{name}", value, expect=expect, says=says, makes=())
            cases.append(Case(f"--{name} {value}", "flags", (step,)))
    for name in INT_MAX_TRIED:
        cases.append(Case(f"--{name} {INT_MAX}", "flags", (train(f"--{name}", INT_MAX, expect="either", makes=()),)))
    for name in EMPTY_TRIED:
        cases.append(Case(f"--{name} ''", "flags", (refuse_train(f"--{name}", "", says=(f"--{name}",)),)))
    cases.append(Case(f"--adapter lora --rank {INT_MAX}", "flags",
                      (train("--adapter", "lora", "--rank", INT_MAX, expect="either", makes=()),)))  # fmt: skip
    return cases + choice_flag_cases() + grid_flag_cases()


def choice_flag_cases() -> list[Case]:
    """Flags that take a word or switch a feature on, with values and features this machine does not have."""
    prior = ("--with_prior_preservation", "--class_prompt", "a photo of a star", "--class_data_dir", "{case}/class")
    validation = ("--validation_prompt", "a photo of sks star", "--num_validation_inference_steps", "2")
    rows = [
        ("--mixed_precision fp8", refuse_train("--mixed_precision", "fp8", says=("--mixed_precision",))),
        ("--lr_scheduler nope", refuse_train("--lr_scheduler", "nope", says=("--lr_scheduler",))),
        ("--adapter dora", refuse_train("--adapter", "dora", says=("--adapter",))),
        ("--optimizer sgd", refuse_train("--optimizer", "sgd", says=("--optimizer",))),
        ("--prodigy_decouple maybe", refuse_train("--prodigy_decouple", "maybe", says=("--prodigy_decouple",))),
        ("--report_to nonsense", refuse_train("--report_to", "nonsense", says=("nonsense",))),
        ("--report_to ''", train("--report_to", "")),
        ("--mixed_precision fp16 on CPU", train("--mixed_precision", "fp16", expect="either")),
        ("--mixed_precision bf16 on CPU", train("--mixed_precision", "bf16")),
        ("--optimizer prodigy", train("--optimizer", "prodigy", expect="either", makes=())),
        ("--use_8bit_adam", train("--use_8bit_adam", expect="either", makes=())),
        ("--enable_xformers_memory_efficient_attention",
         refuse_train("--enable_xformers_memory_efficient_attention", says=("xformers",))),
        ("--lr_scheduler piecewise_constant", refuse_train("--lr_scheduler", "piecewise_constant")),
        ("--do_edm_style_training", refuse_train("--do_edm_style_training", says=("edm",))),
        ("--instance_prompt ''", refuse_train("--instance_prompt", "", says=("--instance_prompt",))),
        ("no --instance_prompt", refuse_train(without=("--instance_prompt",), says=("--instance_prompt",))),
        ("no --pretrained_model_name_or_path",
         refuse_train(without=("--pretrained_model_name_or_path",), says=("--pretrained_model_name_or_path",))),
        ("--dataset_name and --instance_data_dir", refuse_train("--dataset_name", "x/y")),
        ("--dataset_name offline",
         refuse_train("--dataset_name", "someone/no-such-set", without=("--instance_data_dir",))),
        ("--caption_column without metadata.jsonl",
         refuse_train("--caption_column", "text", "--instance_data_dir", "{lily_run}", says=("--caption_column",))),
        ("--class_data_dir is --instance_data_dir",
         refuse_train("--with_prior_preservation", "--class_prompt", "a star", "--class_data_dir", "{subject}")),
        ("--use_dora with lily", refuse_train("--use_dora", says=("--use_dora",))),
        ("--match_lora_budget with lora", refuse_train("--adapter", "lora", "--match_lora_budget", "4")),
        ("--overwrite_output_dir with --resume_from_checkpoint",
         refuse_train("--overwrite_output_dir", "--resume_from_checkpoint", "latest")),
        ("--lily_num_B 1", refuse_train("--lily_num_B", "1", says=("num_B",))),
        ("--lily_scaling 1e4", refuse_train("--lily_scaling", "1e4", says=("scaling",))),
        ("--adam_beta2 1", refuse_train("--adam_beta2", "1", says=("--adam_beta2",))),
        ("--lora_dropout 1", refuse_train("--lora_dropout", "1", says=("--lora_dropout",))),
        ("--seed 4294967296", refuse_train("--seed", "4294967296", says=("--seed",))),
        ("--resolution 8", train("--resolution", "8", expect="either")),
        ("--resolution 1000000000", train("--resolution", "1000000000", expect="refuse")),
        ("--train_batch_size 3 --gradient_accumulation_steps 2", train("--train_batch_size", "3",
                                                                      "--gradient_accumulation_steps", "2")),
        ("--adapter lora --use_dora --output_kohya_format", train("--adapter", "lora", "--use_dora",
                                                                  "--output_kohya_format")),
        ("--match_lora_budget 4", train("--match_lora_budget", "4")),
        ("--train_text_encoder --gradient_checkpointing --cache_latents",
         train("--train_text_encoder", "--gradient_checkpointing", "--cache_latents")),
        ("--dataloader_num_workers 2 --random_flip --center_crop",
         train("--dataloader_num_workers", "2", "--random_flip", "--center_crop", "--max_train_steps", "2")),
        ("validation at every step", train(*validation, "--validation_steps", "1", "--num_validation_images", "1",
                                           "--max_train_steps", "2")),
        ("prior preservation generating 2 class images",
         train(*prior, "--num_class_images", "2", "--sample_batch_size", "2")),
        ("--variant fp16 (none in the folder)", refuse_train("--variant", "fp16")),
        ("--revision on a local folder", train("--revision", "main", expect="either")),
        ("--pretrained_vae_model_name_or_path missing",
         refuse_train("--pretrained_vae_model_name_or_path", "{case}/nothing")),
        ("--resume_from_checkpoint missing", refuse_train("--resume_from_checkpoint", "{case}/nothing")),
        ("--resume_from_checkpoint a file", refuse_train("--resume_from_checkpoint", "{case}/f")),
        ("--logging_dir under a file with tensorboard",
         refuse_train("--report_to", "tensorboard", "--logging_dir", "{case}/f/logs")),
        ("--config_file missing", refuse_train("--config_file", "{case}/nothing.toml", says=("config file",))),
    ]  # fmt: skip
    setups = {
        "--resume_from_checkpoint a file": write("f", "x"),
        "--logging_dir under a file with tensorboard": write("f", "x"),
    }
    return [Case(name, "flags", (step,), setup=setups.get(name)) for name, step in rows]


def grid_flag_cases() -> list[Case]:
    """lily-grid's numeric flags with bad values."""
    cases = []
    for flag in ("--num_inference_steps", "--resolution", "--cell_size", "--seed"):
        for value in ("abc", "0", "-1", "1.5", HUGE_INT):
            expect = "refuse"
            if value == "0" and flag == "--seed":
                expect = "ok"
            elif value == HUGE_INT and flag != "--seed":
                expect = "either"
            says = (flag,) if expect == "refuse" else ()
            cases.append(
                Case(f"lily-grid {flag} {value}", "lily-grid", (grid(flag, value, expect=expect, says=says),))
            )
    for flag, value in (("--resolution", "9600"), ("--cell_size", "9600"), ("--num_inference_steps", "1001")):
        cases.append(
            Case(f"lily-grid {flag} {value}", "lily-grid", (grid(flag, value, expect="refuse", says=(flag,)),))
        )
    for value, expect in (("abc", "refuse"), ("nan", "refuse"), ("inf", "refuse"), ("1e39", "refuse"), ("-1", "ok")):
        says = ("--guidance_scale",) if expect == "refuse" else ()
        cases.append(
            Case(
                f"lily-grid --guidance_scale {value}",
                "lily-grid",
                (grid("--guidance_scale", value, expect=expect, says=says),),
            )
        )
    return cases


# Adapter files given to load_lily_weights (and a few to lily-grid).


def _set(key: str, value: str | None):
    return files.set_metadata(key, value)


def adapter_file_cases() -> list[Case]:
    """Broken, malicious and odd Lily files, and odd arguments, for `load_lily_weights` on the toy pipeline."""
    config_key = files.UNET_CONFIG_KEY
    nan = float("nan")
    rows = [
        ("truncated", made(lambda c, fx: files.truncated(fx.lily, c / "f.safetensors")), "refuse"),
        ("empty", write("f.safetensors", b""), "refuse"),
        ("pickle under a .safetensors name", made(lambda c, fx: files.pickle_file(fx.lily, c / "f.safetensors")),
         "refuse"),
        ("header length 2**40", made(lambda c, fx: files.raw_safetensors(c / "f.safetensors", b"{}", 2**40)),
         "refuse"),
        ("header length past the end", made(lambda c, fx: files.raw_safetensors(c / "f.safetensors", b"{}", 5000)),
         "refuse"),
        ("header not JSON", made(lambda c, fx: files.raw_safetensors(c / "f.safetensors", b"{not json!")), "refuse"),
        ("header claims a 10**12-element tensor", made(lambda c, fx: files.huge_shape_header(c / "f.safetensors")),
         "refuse"),
        ("an infinite weight", lily_variant("f.safetensors", tensors=files.first_tensor(files.poison(float("inf")))),
         "refuse"),
        ("a float64 weight beyond float32",
         lily_variant("f.safetensors", tensors=files.first_tensor(lambda t: t.double().fill_(1e300))), "refuse"),
        ("an integer tensor", lily_variant("f.safetensors", tensors=files.first_tensor(lambda t: t.long())), "refuse"),
        ("fp16 weights", lily_variant("f.safetensors", tensors=lambda ts: {k: v.half() for k, v in ts.items()}),
         "ok"),
        ("a tensor of another shape",
         lily_variant("f.safetensors", tensors=files.first_tensor(lambda t: t.reshape(-1)[:-1])), "refuse"),
        ("a missing key", lily_variant("f.safetensors", tensors=lambda ts: dict(sorted(ts.items())[1:])), "refuse"),
        ("an extra key",
         lily_variant("f.safetensors", tensors=lambda ts: {**ts, "unet.extra.lily_B": ts[min(ts)].clone()}),
         "refuse"),
        ("no format metadata", lily_variant("f.safetensors", metadata=_set("format", None)), "refuse"),
        ("format_version 2", lily_variant("f.safetensors", metadata=_set("format_version", "2")), "refuse"),
        ("no config", lily_variant("f.safetensors", metadata=_set(config_key, None)), "refuse"),
        ("config not JSON", lily_variant("f.safetensors", metadata=_set(config_key, "{r: 4")), "refuse"),
        ("config nested 100000 deep",
         lily_variant("f.safetensors", metadata=_set(config_key, files.deeply_nested_json())), "refuse"),
        ("config a JSON list", lily_variant("f.safetensors", metadata=_set(config_key, "[4]")), "refuse"),
        ("config r '4'", lily_variant("f.safetensors", metadata=files.edit_config(r="4")), "refuse"),
        ("config r -1", lily_variant("f.safetensors", metadata=files.edit_config(r=-1)), "refuse"),
        ("config r 10**12", lily_variant("f.safetensors", metadata=files.edit_config(r=10**12)), "refuse"),
        ("config num_B 1", lily_variant("f.safetensors", metadata=files.edit_config(num_B=1)), "refuse"),
        ("config stride_A 10**12", lily_variant("f.safetensors", metadata=files.edit_config(stride_A=10**12)),
         "refuse"),
        ("config scaling NaN", lily_variant("f.safetensors", metadata=files.edit_config(scaling=nan)), "refuse"),
        ("config scaling 10**400",
         lily_variant("f.safetensors", metadata=_set(config_key, _config_with("scaling", "1" + "0" * 400))),
         "refuse"),
        ("config target a{4294967294}",
         lily_variant("f.safetensors", metadata=files.edit_config(target_modules="a{4294967294}")), "refuse"),
        ("config target x{e<=1}", lily_variant("f.safetensors", metadata=files.edit_config(target_modules="x{e<=1}")),
         "refuse"),
        ("config target (((((...)))))",
         lily_variant("f.safetensors", metadata=files.edit_config(target_modules="(" * 500 + "a" + ")" * 500)),
         "refuse"),
        ("config target []", lily_variant("f.safetensors", metadata=files.edit_config(target_modules=[])), "refuse"),
        ("config target [1, 2]", lily_variant("f.safetensors", metadata=files.edit_config(target_modules=[1, 2])),
         "refuse"),
        ("config exclude backtracking regex",
         lily_variant("f.safetensors", metadata=files.edit_config(exclude_modules=BACKTRACKING)), "refuse"),
        ("config target backtracking regex",
         lily_variant("f.safetensors", metadata=files.edit_config(target_modules=BACKTRACKING)), "refuse"),
        ("config routing evil", lily_variant("f.safetensors", metadata=files.edit_config(routing="evil")), "refuse"),
        ("config init_weights 'yes'", lily_variant("f.safetensors", metadata=files.edit_config(init_weights="yes")),
         "refuse"),
        ("config unknown field", lily_variant("f.safetensors", metadata=files.edit_config(evil=1)), "refuse"),
        ("10 MB of extra metadata", lily_variant("f.safetensors", metadata=_set("junk", "x" * 10_000_000)), "ok"),
        ("10000 stray keys",
         lily_variant("f.safetensors", tensors=lambda ts: {**ts, **_stray_keys(ts[min(ts)], 10_000)}),
         "refuse"),
        ("a LoRA file", made(lambda c, fx: shutil.copy(fx.lora, c / "f.safetensors")), "refuse"),
        ("a folder without weights", made(lambda c, fx: (c / "f.safetensors").mkdir()), "refuse"),
        ("a FIFO", made(lambda c, fx: os.mkfifo(c / "f.safetensors")), "refuse"),
        ("/dev/zero", made(lambda c, fx: (c / "f.safetensors").symlink_to("/dev/zero")), "refuse"),
    ]  # fmt: skip
    cases = [
        Case(f"loader: {name}", "files", (load("{case}/f.safetensors", expect=expect),), setup=setup)
        for name, setup, expect in rows
    ]
    cases += [
        Case("loader: missing path", "files", (load("{case}/nothing"),)),
        Case("loader: scale=True", "files", (load("{lily}", scale=True),)),
        Case("loader: scale=1e30", "files", (load("{lily}", scale=1e30),)),
        Case("loader: scale=inf", "files", (load("{lily}", scale={"float": "inf"}),)),
        Case("loader: component='nope' on a pipeline", "files", (load("{lily}", component="nope"),)),
        Case("loader: component='unet' on a pipeline", "files", (load("{lily}", expect="ok", component="unet"),)),
        Case("loader: the trained file loads", "files", (load("{lily}", expect="ok"),)),
        Case("lily-grid: adapter with config nested 100000 deep", "files",
             (grid("--adapter", "x={case}/f.safetensors", expect="refuse"),),
             setup=lily_variant("f.safetensors", metadata=_set(config_key, files.deeply_nested_json()))),
        Case("lily-grid: adapter header length 2**40", "files",
             (grid("--adapter", "x={case}/f.safetensors", expect="refuse"),),
             setup=made(lambda c, fx: files.raw_safetensors(c / "f.safetensors", b"{}", 2**40))),
        Case("lily-grid: a FIFO adapter", "files", (grid("--adapter", "x={case}/f.safetensors", expect="refuse"),),
             setup=made(lambda c, fx: os.mkfifo(c / "f.safetensors"))),
    ]  # fmt: skip
    return cases


def _stray_keys(tensor, count: int) -> dict:
    """`count` small tensors under keys no Lily layout has."""
    return {f"unet.k{index}": tensor[:1].clone() for index in range(count)}


def _config_with(field: str, raw_value: str):
    """A metadata value: the fixture's UNet config with one field's JSON text replaced by `raw_value`."""
    base = {"r": 4, "stride_A": 2, "num_B": 2, "scaling": 1.0, "target_modules": ["to_q", "to_k", "to_v", "to_out.0"],
            "exclude_modules": None, "init_weights": True, "routing": "sample"}  # fmt: skip
    text = json.dumps({**base, field: "@@"})
    return text.replace('"@@"', raw_value)


# Checkpoints given to --resume_from_checkpoint.


def _checkpoint_edit(step: int, edit) -> object:
    """A setup: the fixture run's checkpoints in `case/out`, then `edit(checkpoint folder)`."""

    def setup(case: Path, fx: Fixtures) -> None:
        copy_run(steps=(1, 2, 3), final=False)(case, fx)
        edit(case / "out" / f"checkpoint-{step}")

    return setup


def _remark(folder: Path) -> None:
    from lily_diffusion.training.checkpointing import MARKER_NAME, write_marker

    (folder / MARKER_NAME).unlink(missing_ok=True)
    write_marker(folder, int(folder.name.split("-")[1]))


def _copy_as(source_step: int, target_step: int):
    def edit(folder: Path) -> None:
        shutil.copytree(folder.parent / f"checkpoint-{source_step}", folder.parent / f"checkpoint-{target_step}")

    return edit


class _Payload:
    """Unpickling this runs `touch PWNED`."""

    def __init__(self, target: str) -> None:
        self.target = target

    def __reduce__(self):
        return (os.system, (f"touch {self.target}",))


def _malicious_pickle(name: str):
    def edit(folder: Path) -> None:
        (folder / name).write_bytes(pickle.dumps(_Payload(str(folder.parent.parent / "PWNED"))))
        _remark(folder)

    return edit


def _nan_checkpoint(folder: Path) -> None:
    files.rewrite(folder / LILY, folder / LILY, tensors=files.first_tensor(files.poison(float("nan"))))
    _remark(folder)


def _no_payload(case: Path, fx: Fixtures) -> str | None:
    return "a pickle in a checkpoint ran code" if (case / "PWNED").exists() else None


def checkpoint_cases() -> list[Case]:
    """Checkpoints that are incomplete, corrupt, non-finite, malicious or for another adapter."""
    resume = ("--resume_from_checkpoint", "latest", "--max_train_steps", "4", "--checkpointing_steps", "1")

    def legacy_zero_optimizer(folder: Path) -> None:
        _copy_as(3, 4)(folder)
        newer = folder.parent / "checkpoint-4"
        (newer / "checkpoint_complete.json").unlink()
        (newer / "optimizer.bin").write_bytes(b"")

    def truncated_marked(folder: Path) -> None:
        _copy_as(3, 4)(folder)
        files.truncated(folder.parent / "checkpoint-4" / LILY, folder.parent / "checkpoint-4" / LILY)

    def only_incomplete(case: Path, fx: Fixtures) -> None:
        out = case / "out"
        shutil.copytree(fx.lily_run / "checkpoint-1", out / "checkpoint-1")
        (out / "checkpoint-1" / "optimizer.bin").write_bytes(b"")

    rows = [
        ("a newer legacy checkpoint with an empty optimizer.bin is skipped",
         train(*resume, says=("skipping",), resumes=True), _checkpoint_edit(3, legacy_zero_optimizer)),
        ("a newer checkpoint with a truncated adapter file is skipped",
         train(*resume, says=("skipping",), resumes=True), _checkpoint_edit(3, truncated_marked)),
        ("a malformed marker is skipped",
         train(*resume, says=("skipping",), resumes=True),
         _checkpoint_edit(3, lambda f: (f / "checkpoint_complete.json").write_text("{not json"))),
        ("a marker that names ../../etc/passwd is skipped",
         train(*resume, says=("skipping",), resumes=True),
         _checkpoint_edit(3, lambda f: (f / "checkpoint_complete.json").write_text(
             json.dumps({"step": 3, "files": {"../../etc/passwd": 1}})))),
        ("a 2 MB marker is skipped", train(*resume, says=("skipping",), resumes=True),
         _checkpoint_edit(3, lambda f: (f / "checkpoint_complete.json").write_text(" " * 2_000_000 + "{}"))),
        ("only an incomplete checkpoint", refuse_train(*resume, says=("no complete checkpoint",)),
         made(only_incomplete)),
        ("a checkpoint with NaN weights", refuse_train(*resume, says=("finite",)),
         _checkpoint_edit(3, _nan_checkpoint)),
        ("a malicious pickle in random_states_0.pkl", train(*resume, expect="either"),
         _checkpoint_edit(3, _malicious_pickle("random_states_0.pkl"))),
        ("a malicious pickle in optimizer.bin", refuse_train(*resume),
         _checkpoint_edit(3, _malicious_pickle("optimizer.bin"))),
        ("a checkpoint of another --lily_r", refuse_train(*resume, "--lily_r", "8"), copy_run(final=False)),
        ("a checkpoint of another adapter (lora)", refuse_train(*resume, "--adapter", "lora"), copy_run(final=False)),
        ("a checkpoint named by path",
         train("--resume_from_checkpoint", "{out}/checkpoint-2", "--max_train_steps", "3",
                                              resumes=True), copy_run(final=False)),
    ]  # fmt: skip
    return [Case(f"resume: {name}", "files", (step,), setup=setup, check=_no_payload) for name, step, setup in rows]


# Config files, captions, images, base models.


def config_cases() -> list[Case]:
    """Broken and hostile --config_file contents."""
    laughs = "a: &a ['lol','lol','lol','lol','lol','lol','lol','lol','lol']\n"
    for index, name in enumerate("bcdefghi"):
        previous = "abcdefghi"[index]
        laughs += f"{name}: &{name} [{', '.join([f'*{previous}'] * 9)}]\n"
    laughs += "target_modules: *i\n"
    rows = [
        ("run.toml", "resolution = [32\n", "refuse"),
        ("run.yaml", "resolution: [32\n", "refuse"),
        ("run.yaml", "resolution: !!python/object/apply:os.system ['touch {case}/PWNED']\n", "refuse"),
        ("run.yaml", laughs, "refuse"),
        ("run.yaml", "[" * 100_000 + "]" * 100_000 + "\n", "refuse"),
        ("run.toml", "no_such_flag = 1\n", "refuse"),
        ("run.toml", 'resolution = "abc"\n', "refuse"),
        ("run.toml", "resolution = [32, 64]\n", "refuse"),
        ("run.toml", 'center_crop = "yes"\n', "refuse"),
        ("run.toml", "learning_rate = nan\n", "refuse"),
        ("run.toml", "[model]\nresolution = 32\n", "refuse"),
        ("run.toml", 'config_file = "other.toml"\n', "refuse"),
        ("run.yaml", "- resolution\n- 32\n", "refuse"),
        ("run.yaml", "1: 2\n", "refuse"),
        ("run.toml", "", "ok"),
        ("run.toml", 'resolution = 32\ninstance_prompt = "a photo of sks star"\n', "ok"),
        ("run.json", '{"resolution": 32}', "refuse"),
        ("run.toml", b'instance_prompt = "caf\xe9"\n', "refuse"),
        ("run.toml", "a = " + "[" * 100_000 + "]" * 100_000 + "\n", "refuse"),
        ("run.toml", 'instance_prompt = "' + "sks " * 1_000_000 + '"\n', "either"),
    ]
    cases = []
    for index, (name, content, expect) in enumerate(rows):
        label = content if isinstance(content, str) else content.decode("latin-1")
        label = " ".join(label.split())[:50] or "(empty)"
        setup = write(name, content.replace("{case}", "@CASE@") if isinstance(content, str) else content)
        setup = all_of(setup, made(lambda c, fx, n=name: _fill_case_path(c / n, c)))
        cases.append(
            Case(
                f"config {index:02d} {name}: {label}",
                "files",
                (train("--config_file", f"{{case}}/{name}", expect=expect, timeout=30),),
                setup=setup,
                check=_no_payload,
            )
        )
    cases.append(
        Case("config: a folder", "files", (refuse_train("--config_file", "{case}/d.toml"),),
             setup=made(lambda c, fx: (c / "d.toml").mkdir()))
    )  # fmt: skip
    return cases


def _fill_case_path(path: Path, case: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data.replace(b"@CASE@", str(case).encode()))


def caption_cases() -> list[Case]:
    """metadata.jsonl and .txt captions that are broken, hostile or odd."""
    meta = "img/metadata.jsonl"
    line = lambda value: f'{{"file_name": "{FIRST_IMAGE}", "text": {value}}}\n'  # noqa: E731
    rows = [
        ("invalid JSON", write(meta, f'{{"file_name": "{FIRST_IMAGE}", "text": \n'), "refuse"),
        ("a line that is a list", write(meta, f'["{FIRST_IMAGE}", "x"]\n'), "refuse"),
        ("no file_name", write(meta, '{"text": "x"}\n'), "refuse"),
        ("file_name a number", write(meta, '{"file_name": 3, "text": "x"}\n'), "refuse"),
        ("a line nested 100000 deep", write(meta, files.deeply_nested_json() + "\n"), "refuse"),
        ("a caption nested 100000 deep", write(meta, line(files.deeply_nested_json())), "refuse"),
        ("a caption of 180000 characters", write(meta, line(json.dumps("sks star " * 20_000))), "refuse"),
        ("a caption of 90000 characters", write(meta, line(json.dumps("sks star " * 10_000))), "ok"),
        ("a .txt caption of 50 MB", write("img/" + FIRST_IMAGE_STEM + ".txt", "x" * 50_000_000), "refuse"),
        ("control characters and NUL", write(meta, line(json.dumps("a photo\u0000 of\u0007 sks\u202e star"))), "ok"),
        ("an empty .txt", write("img/" + FIRST_IMAGE_STEM + ".txt", ""), "ok"),
        ("metadata.jsonl a folder", made(lambda c, fx: ((c / meta).unlink(), (c / meta).mkdir())), "either"),
        ("BOM and CRLF", write(meta, "\ufeff" + line('"a photo of sks star"').replace("\n", "\r\n")), "ok"),
        ("a file_name with ../", write(meta, '{"file_name": "../../x.png", "text": "x"}\n'), "ok"),
        ("a line of 50 MB", write(meta, line(json.dumps("x" * 50_000_000))), "refuse"),
    ]
    return [
        Case(f"caption: {name}", "files",
             (train("--instance_data_dir", "{case}/img", "--caption_column", "text", expect=expect, makes=(),
                    timeout=60),),
             setup=all_of(images("img", {}), write(meta, ""), setup))
        for name, setup, expect in rows
    ] + [
        Case("caption: --caption_column that no line has", "files",
             (refuse_train("--instance_data_dir", "{case}/img", "--caption_column", "prompt"),),
             setup=all_of(images("img", {}), write(meta, line('"x"')))),
        Case("caption: a .txt of mode 000", "files",
             (refuse_train("--instance_data_dir", "{case}/img", "--caption_column", "text", no_file_powers=True),),
             setup=all_of(images("img", {}), write(meta, ""), write("img/" + FIRST_IMAGE_STEM + ".txt", "x"),
                          made(lambda c, fx: (c / "img" / f"{FIRST_IMAGE_STEM}.txt").chmod(0)))),
    ]  # fmt: skip


def image_cases() -> list[Case]:
    """Odd, broken and hostile images in the instance (and class) folder."""
    img = ("--instance_data_dir", "{case}/img")
    odd = ("gray16", "cmyk", "palette_alpha", "animated", "multipage", "one_pixel", "bad_orientation")
    suffix = {"cmyk": "jpg", "animated": "gif", "multipage": "tiff"}
    cases = [
        Case(f"image: {kind}", "files", (train(*img),),
             setup=images("img", {f"odd.{suffix.get(kind, 'png')}": lambda p, k=kind: files.odd_image(p, k)}))
        for kind in odd
    ]  # fmt: skip
    rows = [
        ("float TIFF with a NaN pixel", {"f.tiff": lambda p: files.odd_image(p, "float_nan")}, "either", ()),
        ("garbage EXIF", {"g.jpg": lambda p: files.odd_image(p, "garbage_exif")}, "either", ()),
        ("a zero-byte PNG", {"z.png": lambda p: p.write_bytes(b"")}, "ok", ("skipping",)),
        ("text named .png", {"t.png": lambda p: p.write_text("not an image")}, "ok", ("skipping",)),
        ("a truncated PNG", {"t.png": lambda p: files.truncated_image(p)}, "ok", ("skipping",)),
        ("a PNG header claiming 10000x10000", {"b.png": lambda p: files.png_header_bomb(p, 10_000, 10_000)},
         "refuse", ("b.png",)),
        ("an image 17 times as long as wide", {"l.png": lambda p: files.Image.new("RGB", (17, 1)).save(p)},
         "refuse", ("l.png",)),
        ("an image 16 times as long as wide", {"l.png": lambda p: files.Image.new("RGB", (64, 4)).save(p)},
         "ok", ()),
        ("a symlink to /dev/zero", {"z.png": lambda p: p.symlink_to("/dev/zero")}, "ok", ()),
        ("a FIFO", {"f.png": lambda p: os.mkfifo(p)}, "ok", ()),
        ("a dangling symlink", {"d.png": lambda p: p.symlink_to("/nonexistent/x.png")}, "ok", ()),
        ("a folder named x.png", {"x.png": lambda p: p.mkdir()}, "ok", ()),
    ]  # fmt: skip
    cases += [
        Case(f"image: {name}", "files", (train(*img, expect=expect, says=says),), setup=images("img", extra))
        for name, extra, expect, says in rows
    ]
    only_bad = {"z.png": lambda p: p.write_bytes(b""), "t.png": lambda p: p.write_text("x")}
    cases += [
        Case("image: only unreadable files", "files", (refuse_train(*img, says=("no readable images",)),),
             setup=images("img", only_bad, keep=0)),
        Case("image: an empty folder", "files", (refuse_train(*img, says=("empty",)),),
             setup=made(lambda c, fx: (c / "img").mkdir())),
        Case("image: --instance_data_dir a file", "files", (refuse_train(*img),), setup=write("img", "x")),
        Case("image: --instance_data_dir missing", "files", (refuse_train(*img, says=("does not exist",)),)),
        Case("image: a bomb among the class images", "files",
             (refuse_train("--with_prior_preservation", "--class_prompt", "a star", "--class_data_dir",
                           "{case}/cls", "--num_class_images", "2", says=("bomb.png",)),),
             setup=images("cls", {"bomb.png": lambda p: files.png_header_bomb(p, 70_000, 70_000)})),
    ]  # fmt: skip
    return cases


def base_model_cases() -> list[Case]:
    """Base model folders that are missing, partial or corrupt, for training and lily-grid."""

    def broken(copied: tuple[str, ...], edit) -> object:
        def setup(case: Path, fx: Fixtures) -> None:
            base = files.base_copy(fx.base, case / "base", copied)
            edit(base)

        return setup

    truncate_unet = lambda b: files.truncated(  # noqa: E731
        b / "unet" / "diffusion_pytorch_model.safetensors", b / "unet" / "diffusion_pytorch_model.safetensors", 0.3
    )
    rows = [
        ("missing", made(lambda c, fx: None), "{case}/nothing"),
        ("a file", write("f", "x"), "{case}/f"),
        ("a folder without model_index.json", made(lambda c, fx: (c / "b").mkdir()), "{case}/b"),
        ("truncated UNet weights", broken(("unet",), truncate_unet), "{case}/base"),
        ("UNet config not JSON", broken(("unet",), lambda b: (b / "unet" / "config.json").write_text("{")),
         "{case}/base"),
        ("model_index.json not JSON",
         broken(("model_index.json",), lambda b: (b / "model_index.json").write_text("{")),
         "{case}/base"),
        ("an SD 1.5 class name", broken(("model_index.json",), lambda b: (b / "model_index.json").write_text(
            (b / "model_index.json").read_text().replace("StableDiffusionXLPipeline", "StableDiffusionPipeline"))),
         "{case}/base"),
        ("no tokenizer files", broken(("tokenizer",), lambda b: [p.unlink() for p in (b / "tokenizer").iterdir()]),
         "{case}/base"),
        ("scheduler config not JSON",
         broken(("scheduler",), lambda b: (b / "scheduler" / "scheduler_config.json").write_text("[")), "{case}/base"),
        ("UNet config with negative channels", broken(("unet",), lambda b: (b / "unet" / "config.json").write_text(
            (b / "unet" / "config.json").read_text().replace('"in_channels": 4', '"in_channels": -4'))),
         "{case}/base"),
    ]  # fmt: skip
    cases = []
    for name, setup, path in rows:
        cases.append(Case(f"base model: {name} (training)", "files",
                          (refuse_train("--pretrained_model_name_or_path", path),), setup=setup))  # fmt: skip
        expect = "either" if "SD 1.5" in name else "refuse"  # the components are SDXL's: lily-grid may use them
        cases.append(Case(f"base model: {name} (lily-grid)", "files",
                          (grid("--pretrained_model_name_or_path", path, expect=expect),), setup=setup))  # fmt: skip
    cases.append(Case("base model: --pretrained_model_name_or_path the other base (training works)", "files",
                      (train("--pretrained_model_name_or_path", "{other_base}", "--resolution", "16"),)))  # fmt: skip
    return cases


def hostile_cases() -> list[Case]:
    """Every case of this module."""
    return (
        flag_cases()
        + adapter_file_cases()
        + checkpoint_cases()
        + config_cases()
        + caption_cases()
        + image_cases()
        + base_model_cases()
    )
