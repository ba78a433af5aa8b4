"""The stress cases as data: issue 9's cases (must-fix, one-line errors, "Also") and more hostile inputs of the same
kind, against the training script, the loader and lily-grid on the bundled toy model.

A `Case` is a few `Step`s run one after the other in one temporary folder; each step is one process with an
expectation: `ok` (exit 0), `refuse` (exit != 0 with a one-line error), `either` (one of those two; for absurd values
where a clear refusal and a quick success are both right), or `killed` (the step's planted SIGKILL fired). Paths in
arguments are written as `{out}` (the case's output folder), `{case}` (its temporary folder), `{base}` (the bundled
toy model), `{subject}` (the bundled subject images), `{lily}` / `{lily_run}` / `{lora}` (a trained Lily file, the
run that wrote it with its checkpoints, a trained LoRA file) and `{other_base}` (an SDXL pipeline of other widths).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from toyworld.paths import BASE_MODEL_DIR, SUBJECT_DIR

from . import stress_files as files

PROMPT = "a photo of sks star"
SECRET = "hf_SECRET_stress_0123456789"  # planted wherever a secret can be given; must never come out
SECRET_MARK = b"hf_SECRET"
LILY = "pytorch_lily_weights.safetensors"
LORA = "pytorch_lora_weights.safetensors"
# The first of the subject images the cases copy (`images`), whose caption the caption cases set.
FIRST_IMAGE = sorted(path.name for path in SUBJECT_DIR.glob("*.png"))[0]
FIRST_IMAGE_STEM = Path(FIRST_IMAGE).stem
TOKENS = ("{out}", "{case}", "{base}", "{subject}", "{lily}", "{lily_run}", "{lora}", "{other_base}")


@dataclass(frozen=True)
class Fixtures:
    """Files every case may use, made once per run of the script."""

    base: Path
    subject: Path
    lily: Path  # a trained Lily adapter file for the toy base
    lily_run: Path  # the output folder of that run: checkpoint-1..3 and the final file
    lora: Path  # a trained LoRA adapter file for the toy base
    other_base: Path  # an SDXL pipeline of other widths (adapters of the toy base do not fit it)

    def paths(self, case: Path) -> dict[str, str]:
        return {
            "{out}": str(case / "out"),
            "{case}": str(case),
            "{base}": str(self.base),
            "{subject}": str(self.subject),
            "{lily}": str(self.lily),
            "{lily_run}": str(self.lily_run),
            "{lora}": str(self.lora),
            "{other_base}": str(self.other_base),
        }


def expand(text: str, paths: Mapping[str, str]) -> str:
    """`text` with the path tokens replaced (nothing else: regexes and JSON in arguments keep their braces)."""
    for token, value in paths.items():
        text = text.replace(token, value)
    return text


Setup = Callable[[Path, Fixtures], None]
Check = Callable[[Path, Fixtures], "str | None"]


@dataclass(frozen=True)
class Step:
    """One process of a case and what it must do."""

    target: str  # "train", "grid", "load" (load_lily_weights on the toy pipeline) or "call"
    args: tuple[str, ...]
    expect: str = "ok"  # "ok", "refuse", "either" or "killed"
    says: tuple[str, ...] = ()  # text the output must contain (case-insensitive): a warning, the refusal's subject
    makes: tuple[str, ...] = ()  # files an `ok` step must leave
    kwargs: Mapping[str, object] = field(default_factory=dict)  # load: keyword arguments
    env: Mapping[str, str] = field(default_factory=dict)
    kill_on: tuple[str, str] | None = None  # (audit event, path regex): SIGKILL at that moment
    max_file_bytes: int | None = None  # writes past this fail (EFBIG), as on a full disk
    umask: int | None = None
    fresh: bool = False  # a new interpreter instead of a fork of the warm runner
    no_file_powers: bool = False  # as root: without the capabilities that ignore permission bits
    resumes: bool = False  # this step continues an earlier run: its failure means that run was lost
    timeout: float = 60.0


@dataclass(frozen=True)
class Case:
    """A named sequence of steps in one temporary folder, with the files it needs and a final check."""

    name: str
    group: str
    steps: tuple[Step, ...]
    setup: Setup | None = None
    check: Check | None = None  # a problem found after the steps ("lost: ..." counts as lost)


# Building blocks.

COMMON = (
    ("--pretrained_model_name_or_path", "{base}"), ("--instance_data_dir", "{subject}"), ("--instance_prompt", PROMPT),
    ("--resolution", "32"), ("--train_batch_size", "1"), ("--seed", "0"), ("--report_to", "none"),
    ("--lily_r", "4"), ("--lily_stride_A", "2"), ("--lily_num_B", "2"), ("--output_dir", "{out}"),
    ("--max_train_steps", "1"),
)  # fmt: skip
FIXTURE_RUN = ("--max_train_steps", "3", "--checkpointing_steps", "1")


def train(*extra: str, expect: str = "ok", without: tuple[str, ...] = (), **options: object) -> Step:
    """The training script with the common tiny flags (minus the flags in `without`) and `extra` (later flags win)."""
    args = [item for flag, value in COMMON if flag not in without for item in (flag, value)]
    args += extra
    makes = options.pop("makes", None)
    if makes is None:
        weight = LORA if "lora" in extra and "--adapter" in extra else LILY
        makes = (f"{{out}}/{weight}",) if expect == "ok" and "--help" not in extra else ()
    return Step("train", tuple(args), expect=expect, makes=tuple(makes), **options)  # type: ignore[arg-type]


GRID_COMMON = (
    "--pretrained_model_name_or_path", "{base}", "--prompt", PROMPT, "--seed", "0", "--num_inference_steps", "2",
    "--resolution", "32", "--output", "{out}/grid.png",
)  # fmt: skip


def grid(*extra: str, expect: str = "ok", **options: object) -> Step:
    """lily-grid with the common tiny flags and `extra` (later flags win)."""
    makes = ("{out}/grid.png",) if expect == "ok" and "--output" not in extra else ()
    return Step("grid", (*GRID_COMMON, *extra), expect=expect, makes=makes, **options)  # type: ignore[arg-type]


def load(path: str, expect: str = "refuse", says: tuple[str, ...] = (), **kwargs: object) -> Step:
    """load_lily_weights(toy pipeline, path, **kwargs)."""
    return Step("load", (path,), expect=expect, says=says, kwargs=kwargs)


def refuse_train(*extra: str, says: tuple[str, ...] = (), **options: object) -> Step:
    return train(*extra, expect="refuse", says=says, **options)


def write(relative: str, content: str | bytes) -> Setup:
    """A setup that writes one file under the case folder."""

    def setup(case: Path, fx: Fixtures) -> None:
        path = case / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")

    return setup


def all_of(*setups: Setup) -> Setup:
    def setup(case: Path, fx: Fixtures) -> None:
        for each in setups:
            each(case, fx)

    return setup


def images(folder: str, extra: dict[str, Callable[[Path], object]], keep: int = 2) -> Setup:
    """A setup: `case/folder` with `keep` subject images and the `extra` files."""

    def setup(case: Path, fx: Fixtures) -> None:
        files.image_folder(case / folder, fx.subject, extra, keep)

    return setup


def copy_run(steps: tuple[int, ...] = (1, 2, 3), final: bool = True) -> Setup:
    """A setup: `case/out` holds the fixture run's checkpoints of `steps` (and its final weights)."""

    def setup(case: Path, fx: Fixtures) -> None:
        out = case / "out"
        out.mkdir(parents=True, exist_ok=True)
        for step in steps:
            shutil.copytree(fx.lily_run / f"checkpoint-{step}", out / f"checkpoint-{step}")
        if final:
            shutil.copy(fx.lily_run / LILY, out / LILY)
        shutil.copy(fx.lily_run / "training_args.json", out / "training_args.json")

    return setup


def lily_variant(name: str, **edits: Callable) -> Setup:
    """A setup: `case/name` is the fixture Lily file rewritten with `edits` (see stress_files.rewrite)."""

    def setup(case: Path, fx: Fixtures) -> None:
        files.rewrite(fx.lily, case / name, **edits)

    return setup


def made(maker: Callable[[Path, Fixtures], object]) -> Setup:
    def setup(case: Path, fx: Fixtures) -> None:
        maker(case, fx)

    return setup


def same_weights_as_fixture(case: Path, fx: Fixtures) -> str | None:
    """The resumed run's final weights must equal the uninterrupted fixture run's, bit for bit."""
    import torch

    got_path = case / "out" / LILY
    if not got_path.is_file():
        return "lost: no final weights after the resume"
    expected, _ = files.read_safetensors(fx.lily)
    got, _ = files.read_safetensors(got_path)
    if expected.keys() != got.keys() or not all(torch.equal(expected[k], got[k]) for k in expected):
        return "the resumed run's weights differ from the uninterrupted run's"
    return None


def file_mode(relative: str, wanted: int) -> Check:
    def check(case: Path, fx: Fixtures) -> str | None:
        mode = (case / relative).stat().st_mode & 0o777
        return None if mode == wanted else f"{relative} has mode {oct(mode)}, expected {oct(wanted)}"

    return check


# The cases.


def must_fix_cases() -> list[Case]:
    """Issue 9, 'Must fix': secrets, NaN checkpoints, kills during saves, output folder reuse, hostile regex in a
    file, image bombs, the bundled model with plain from_pretrained, lily-grid in normal use."""
    secret_env = {"HF_TOKEN": SECRET + "_env", "WANDB_API_KEY": SECRET + "_wandb"}
    cases = [
        Case("secret: --hub_token with tensorboard", "must-fix",
             (train("--hub_token", SECRET, "--report_to", "tensorboard", "--max_train_steps", "2",
                    "--checkpointing_steps", "1", env=secret_env),)),
        Case("secret: --hub_token from a config file", "must-fix",
             (train("--config_file", "{case}/run.toml"),), setup=write("run.toml", f'hub_token = "{SECRET}"\n')),
        Case("secret: --push_to_hub offline, token in the error path", "must-fix",
             (refuse_train("--push_to_hub", "--hub_token", SECRET, "--hub_model_id", "someone/x",
                           says=("push to hub failed",)),)),
        Case("secret: --report_to wandb with --hub_token", "must-fix",
             (refuse_train("--report_to", "wandb", "--hub_token", SECRET, says=("wandb",)),)),
        Case("secret: token in a bad value of another flag", "must-fix",
             (refuse_train("--hub_token", SECRET, "--resolution", "36", says=("--resolution",)),)),
        Case("NaN: lr 1e6 stops, names the last finite checkpoint, saves nothing non-finite", "must-fix",
             (refuse_train("--learning_rate", "1e6", "--checkpointing_steps", "1", "--max_train_steps", "4",
                           says=("non-finite", "checkpoint-1")),
              load("{out}/checkpoint-1", expect="either"),
              train("--checkpointing_steps", "1", "--max_train_steps", "4", "--resume_from_checkpoint", "latest",
                    expect="either", says=("resuming from",)))),
        Case("NaN: loader refuses NaN weights", "must-fix", (load("{case}/nan.safetensors", says=("non-finite",)),),
             setup=lily_variant("nan.safetensors", tensors=files.first_tensor(files.poison(float("nan"))))),
        Case("NaN: loader refuses scale=nan", "must-fix", (load("{lily}", scale={"float": "nan"}),)),
        Case("NaN: loader refuses scaling=1e30 in the file", "must-fix", (load("{case}/s.safetensors"),),
             setup=lily_variant("s.safetensors", metadata=files.edit_config(scaling=1e30))),
        Case("output folder reuse is refused, the earlier run survives", "must-fix",
             (train("--checkpointing_steps", "1", "--checkpoints_total_limit", "1", "--max_train_steps", "2"),
              refuse_train("--checkpointing_steps", "1", "--checkpoints_total_limit", "1", "--seed", "1",
                           says=("--overwrite_output_dir",)),
              train("--overwrite_output_dir", "--seed", "1"))),
        Case("output folder reuse with --resume_from_checkpoint and no checkpoint", "must-fix",
             (train(), refuse_train("--resume_from_checkpoint", "latest", says=("--overwrite_output_dir",)))),
        Case("hostile regex in a file: loader", "must-fix", (load("{case}/re.safetensors", says=("target_modules",)),),
             setup=lily_variant("re.safetensors", metadata=files.edit_config(target_modules=r"(\w+\.?)+\.zzz"))),
        Case("hostile regex in a file: lily-grid", "must-fix",
             (grid("--adapter", "evil={case}/re.safetensors", expect="refuse", says=("target_modules",)),),
             setup=lily_variant("re.safetensors", metadata=files.edit_config(target_modules=r"(\w+\.?)+\.zzz"))),
        Case("backtracking regex in a file: lily-grid", "must-fix",
             (grid("--adapter", "evil={case}/re.safetensors", expect="refuse", says=("backtracking",)),),
             setup=lily_variant("re.safetensors",
                                metadata=files.edit_config(target_modules=r"(?:(\w+)\.?(?(1)|x))+[!?]"))),
        Case("malformed regex '(' in a file", "must-fix", (load("{case}/re.safetensors"),),
             setup=lily_variant("re.safetensors", metadata=files.edit_config(target_modules="("))),
        Case("loader scale='abc' leaves nothing loaded", "must-fix", (load("{lily}", scale="abc"),)),
        Case("image bomb: 100000x1 PNG at resolution 128", "must-fix",
             (refuse_train("--instance_data_dir", "{case}/img", "--resolution", "128", says=("long.png",)),),
             setup=images("img", {"long.png": lambda p: files.Image.new("RGB", (100_000, 1)).save(p)})),
        Case("image bomb: PNG header claiming 70000x70000", "must-fix",
             (refuse_train("--instance_data_dir", "{case}/img", says=("bomb.png",)),),
             setup=images("img", {"bomb.png": lambda p: files.png_header_bomb(p, 70_000, 70_000)})),
        Case("image bomb: GIF header claiming 65535x65535", "must-fix",
             (refuse_train("--instance_data_dir", "{case}/img", says=("bomb.gif",)),),
             setup=images("img", {"bomb.gif": files.gif_header_bomb})),
        Case("image bomb: JPEG header claiming 60000x30000", "must-fix",
             (refuse_train("--instance_data_dir", "{case}/img", says=("bomb.jpg",)),),
             setup=images("img", {"bomb.jpg": lambda p: files.jpeg_with_size(p, 60_000, 30_000)})),
        Case("image bomb: BMP header claiming 100000x100000", "must-fix",
             (refuse_train("--instance_data_dir", "{case}/img", says=("bomb.bmp",)),),
             setup=images("img", {"bomb.bmp": files.bmp_header_bomb})),
        Case("bundled model: plain from_pretrained then pipe(prompt)", "must-fix",
             (Step("call", ("plain_from_pretrained",)),)),
        Case("lily-grid: base and a Lily adapter", "must-fix", (grid("--adapter", "lily={lily}"),)),
        Case("lily-grid: a LoRA adapter, --no_base", "must-fix", (grid("--adapter", "lora={lora}", "--no_base"),)),
        Case("lily-grid: a Lily folder, --dtype bf16, --cell_size", "must-fix",
             (grid("--adapter", "lily={lily_run}", "--dtype", "bf16", "--cell_size", "48"),)),
        Case("lily-grid: python -m lily_diffusion.grids in a fresh interpreter exits 0", "must-fix",
             (grid("--adapter", "lily={lily}", fresh=True),)),
    ]  # fmt: skip
    cases += kill_cases()
    return cases


def kill_cases() -> list[Case]:
    """SIGKILL at each moment of a checkpoint save (and of the final save), then `--resume_from_checkpoint latest`
    must finish with the uninterrupted run's weights, bit for bit."""
    flags = (*FIXTURE_RUN, "--checkpoints_total_limit", "1")
    moments = {
        "adapter file written, accelerate's files not yet": ("os.rename", r"checkpoint-2\.partial/\.pytorch_lily"),
        "all files written, not yet marked complete": ("open", r"checkpoint-2\.partial/custom_checkpoint_0\.pkl$"),
        "marker being written": ("open", r"checkpoint-2\.partial/checkpoint_complete\.json$"),
        "marked, not yet renamed": ("os.rename", r"checkpoint-2\.partial$"),
        "pruning the older checkpoint": ("shutil.rmtree", r"checkpoint-1\.removing$"),
        "final weights being written": ("open", r"out/\.pytorch_lily_weights\.safetensors\.[0-9a-f]+\.tmp$"),
    }
    return [
        Case(
            f"kill during save ({moment}) then resume latest",
            "must-fix",
            (
                train(*flags, expect="killed", kill_on=event),
                train(*flags, "--resume_from_checkpoint", "latest", resumes=True, says=("resuming from",)),
            ),
            check=same_weights_as_fixture,
        )
        for moment, event in moments.items()
    ]


def one_line_cases() -> list[Case]:
    """Issue 9, 'Must turn into one-line errors', plus the warnings it asks for."""
    meta = "img/metadata.jsonl"
    caption_values = {"null": "null", "object": '{"a": 1}', "number": "12", "list": '["a"]', "boolean": "true"}
    cases = [
        Case("instance folder mode 000", "one-line",
             (refuse_train("--instance_data_dir", "{case}/img", says=("--instance_data_dir",), no_file_powers=True),),
             setup=all_of(images("img", {}), made(lambda c, fx: (c / "img").chmod(0)))),
        Case("class folder unwritable", "one-line",
             (refuse_train("--with_prior_preservation", "--class_prompt", "a photo of a star", "--class_data_dir",
                           "{case}/ro/class", says=("--class_data_dir",), no_file_powers=True),),
             setup=made(lambda c, fx: ((c / "ro").mkdir(), (c / "ro").chmod(0o555)))),
        Case("class folder under a file", "one-line",
             (refuse_train("--with_prior_preservation", "--class_prompt", "a photo of a star", "--class_data_dir",
                           "{case}/file/class", says=("--class_data_dir",)),), setup=write("file", "x")),
        Case("output folder is a file", "one-line",
             (refuse_train("--output_dir", "{case}/file", says=("--output_dir",)),),
             setup=write("file", "x")),
        Case("output folder unwritable", "one-line",
             (refuse_train("--output_dir", "{case}/ro/out", says=("--output_dir",), no_file_powers=True),),
             setup=made(lambda c, fx: ((c / "ro").mkdir(), (c / "ro").chmod(0o555)))),
        Case("metadata.jsonl not UTF-8", "one-line",
             (refuse_train("--instance_data_dir", "{case}/img", "--caption_column", "text", says=("UTF-8",)),),
             setup=all_of(images("img", {}), write(meta, f'{{"file_name": "{FIRST_IMAGE}", "text": "caf'.encode()
                                                   + b'\xe9"}\n'))),
        Case(".txt caption not UTF-8", "one-line",
             (refuse_train("--instance_data_dir", "{case}/img", "--caption_column", "text", says=("UTF-8",)),),
             setup=all_of(images("img", {}), write(meta, ""),
                          write("img/" + FIRST_IMAGE_STEM + ".txt", b"caf\xe9 \xff\n"))),
        Case("--num_class_images 0 with prior preservation", "one-line",
             (refuse_train("--with_prior_preservation", "--class_prompt", "a star", "--class_data_dir", "{case}/cls",
                           "--num_class_images", "0", says=("--num_class_images",)),)),
        Case("--resolution 36", "one-line", (refuse_train("--resolution", "36", says=("--resolution",)),)),
        Case("--learning_rate -1e-4", "one-line",
             (refuse_train("--learning_rate", "-1e-4", says=("--learning_rate",)),)),
        Case("--learning_rate 1e39 overflows Adam", "one-line", (refuse_train("--learning_rate", "1e39"),)),
        Case("--learning_rate 1e38 --scale_lr", "one-line",
             (refuse_train("--learning_rate", "3e38", "--scale_lr", "--train_batch_size", "2"),)),
        Case("disk full during a checkpoint", "one-line",
             (refuse_train("--checkpointing_steps", "1", max_file_bytes=30_000, says=("needs about",)),),
             check=lambda c, fx: "a partial checkpoint was left" if list((c / "out").glob("checkpoint-*")) else None),
        Case("disk full during the final save", "one-line",
             (refuse_train(max_file_bytes=30_000, says=("needs about",)),)),
        Case("disk full at the second checkpoint keeps the first, which resumes", "one-line",
             (train("--checkpointing_steps", "1"),
              refuse_train("--checkpointing_steps", "1", "--max_train_steps", "2", "--resume_from_checkpoint",
                           "latest", max_file_bytes=30_000, says=("intact",)),
              train("--checkpointing_steps", "1", "--max_train_steps", "2", "--resume_from_checkpoint", "latest",
                    resumes=True))),
        Case("resume with --max_train_steps below the checkpoint", "one-line",
             (refuse_train("--resume_from_checkpoint", "latest", "--max_train_steps", "2",
                           says=("--max_train_steps",)),), setup=copy_run()),
        Case("resume with another batch size warns", "one-line",
             (train("--resume_from_checkpoint", "latest", "--max_train_steps", "4", "--train_batch_size", "2",
                    says=("batch layout",), resumes=True),), setup=copy_run()),
        Case("prompt over 77 tokens warns", "one-line",
             (train("--instance_prompt", " ".join(["a photo of sks star"] * 30), says=("truncat",)),)),
        Case("--validation_steps without --validation_prompt warns", "one-line",
             (train("--validation_steps", "5", says=("--validation_steps is ignored",)),)),
        Case("--class_prompt without prior preservation warns", "one-line",
             (train("--class_prompt", "a star", says=("--class_prompt is ignored",)),)),
    ]  # fmt: skip
    for label, value in caption_values.items():
        line = f'{{"file_name": "{FIRST_IMAGE}", "text": {value}}}\n'
        cases.append(
            Case(
                f"caption value {label} in metadata.jsonl",
                "one-line",
                (
                    refuse_train(
                        "--instance_data_dir", "{case}/img", "--caption_column", "text", says=("must be a string",)
                    ),
                ),
                setup=all_of(images("img", {}), write(meta, line)),
            )
        )
    cases += grid_error_cases()
    return cases


def grid_error_cases() -> list[Case]:
    """The ten lily-grid tracebacks of the issue and their relatives, each as one line before any image."""
    lily = "lily={lily}"
    cases = [
        ("mismatched base", (grid("--adapter", lily, "--pretrained_model_name_or_path", "{other_base}",
                                  expect="refuse", says=("does not fit",)),), None),
        ("truncated adapter", (grid("--adapter", "x={case}/t.safetensors", expect="refuse"),),
         made(lambda c, fx: files.truncated(fx.lily, c / "t.safetensors"))),
        ("pickle adapter folder", (grid("--adapter", "x={case}/p", expect="refuse", says=("pickle",)),),
         made(lambda c, fx: files.pickle_file(fx.lily, c / "p" / "pytorch_lily_weights.bin"))),
        ("pickle under a .safetensors name", (grid("--adapter", "x={case}/p.safetensors", expect="refuse"),),
         made(lambda c, fx: files.pickle_file(fx.lily, c / "p.safetensors"))),
        ("--no_base alone", (grid("--no_base", expect="refuse", says=("--no_base",)),), None),
        ("--num_inference_steps 0", (grid("--num_inference_steps", "0", expect="refuse"),), None),
        ("output is a folder", (grid("--output", "{case}", expect="refuse", says=("folder",)),), None),
        ("missing base", (grid("--pretrained_model_name_or_path", "{case}/nothing", expect="refuse"),), None),
        ("missing adapter", (grid("--adapter", "x={case}/nothing", expect="refuse"),), None),
        ("adapter without a name", (grid("--adapter", "{lily}", expect="refuse"),), None),
        ("two adapters with one name", (grid("--adapter", lily, "--adapter", lily, expect="refuse"),), None),
        ("output under a file", (grid("--output", "{case}/f/grid.png", expect="refuse"),), write("f", "x")),
        ("output with no image suffix", (grid("--output", "{case}/grid.txt", expect="refuse"),), None),
        ("base is a file", (grid("--pretrained_model_name_or_path", "{case}/f", expect="refuse"),), write("f", "x")),
        ("base folder without model_index.json", (grid("--pretrained_model_name_or_path", "{case}", expect="refuse"),),
         None),
        ("NaN adapter", (grid("--adapter", "x={case}/n.safetensors", expect="refuse", says=("non-finite",)),),
         lily_variant("n.safetensors", tensors=files.first_tensor(files.poison(float("nan"))))),
        ("LoRA file without .safetensors suffix", (grid("--adapter", "x={case}/lora.bin", expect="refuse"),),
         made(lambda c, fx: shutil.copy(fx.lora, c / "lora.bin"))),
        ("empty adapter file", (grid("--adapter", "x={case}/e.safetensors", expect="refuse"),),
         write("e.safetensors", b"")),
        ("--dtype fp64", (grid("--dtype", "fp64", expect="refuse"),), None),
        ("a LoRA of another base", (grid("--adapter", "lora={lora}", "--pretrained_model_name_or_path",
                                         "{other_base}", expect="refuse"),), None),
    ]  # fmt: skip
    return [Case(f"lily-grid: {name}", "lily-grid", steps, setup=setup) for name, steps, setup in cases]


def _help_names_every_default(case: Path, fx: Fixtures) -> str | None:
    text = (case / "logs" / "0.out").read_text()
    return "--help says 'LilyConfig's' instead of a default" if "LilyConfig's" in text else None


def also_cases() -> list[Case]:
    """Issue 9, 'Also': --help shows every default, weight files respect the umask, --target_modules as documented."""
    return [
        Case("--help shows every default", "also",
             (train("--help", says=("--lily_r LILY_R", "(default: 32)", "(default: 10)")),),
             check=_help_names_every_default),
        Case("weights respect umask 022", "also", (train(umask=0o022),), check=file_mode(f"out/{LILY}", 0o644)),
        Case("weights respect umask 077", "also", (train(umask=0o077),), check=file_mode(f"out/{LILY}", 0o600)),
        Case("--target_modules suffixes", "also", (train("--target_modules", "to_q", "to_v"),)),
        Case("--target_modules one regex", "also", (train("--target_modules", r".*attn1\.to_(q|v)"),)),
        Case("--target_modules regex among suffixes", "also",
             (refuse_train("--target_modules", "to_q", "to_(k|v)", says=("--target_modules",)),)),
        Case("--target_modules malformed regex", "also",
             (refuse_train("--target_modules", "to_(q", says=("--target_modules",)),)),
        Case("--target_modules hostile regex", "also",
             (refuse_train("--target_modules", r"(\w+\.?)+\.zzz", says=("target_modules",)),)),
        Case("--target_modules that matches nothing", "also",
             (refuse_train("--target_modules", "no_such_layer", says=("no_such_layer",)),)),
    ]  # fmt: skip


# The test's subset: one case of each kind of runner and fault, under a minute.
QUICK = frozenset(
    {
        "secret: --hub_token with tensorboard",
        "kill during save (marked, not yet renamed) then resume latest",
        "hostile regex in a file: loader",
        "image bomb: 100000x1 PNG at resolution 128",
        "lily-grid: base and a Lily adapter",
        "lily-grid: --no_base alone",
        "--learning_rate -1e-4",
    }
)


def issue_cases() -> list[Case]:
    """Every case of issue 9."""
    return must_fix_cases() + one_line_cases() + also_cases()


def fixture_paths(root: Path) -> Fixtures:
    """Where the fixtures of a run live under `root` (each is the `{out}` of a fixture case)."""
    return Fixtures(
        base=BASE_MODEL_DIR,
        subject=SUBJECT_DIR,
        lily=root / "fixture-lily" / "out" / LILY,
        lily_run=root / "fixture-lily" / "out",
        lora=root / "fixture-lora" / "out" / LORA,
        other_base=root / "fixture-other-base" / "out",
    )


def fixture_cases() -> list[Case]:
    """The runs that make the fixtures: a 3-step Lily run with a checkpoint per step, a LoRA run, another base."""
    return [
        Case("fixture-lily", "fixture", (train(*FIXTURE_RUN),)),
        Case("fixture-lora", "fixture", (train("--adapter", "lora", "--rank", "2"),)),
        Case("fixture-other-base", "fixture", (Step("call", ("save_tiny_sdxl",)),)),
    ]


def case_json(case: Case) -> str:
    """A readable description of a case (for the report)."""
    return json.dumps({"name": case.name, "steps": [s.args for s in case.steps]})
