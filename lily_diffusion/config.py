"""`LilyConfig`: what a Lily adapter looks like, with peft's field names and SDXL-tuned defaults."""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .patterns import check_pattern, shorten

UNET_TARGET_MODULES: tuple[str, ...] = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGET_MODULES: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "out_proj")
ROUTINGS: tuple[str, ...] = ("sample", "batch")
MAX_MULTIPLIER = 1e3  # bound on |scaling| and |scale|; see check_multiplier


@dataclass
class LilyConfig:
    """Configuration of one Lily adapter.

    The defaults (r=32, stride_A=10, num_B=8 on the SDXL UNet's attention projections) give
    5,607,424 trainable parameters on SDXL: below the 5,806,080 of the diffusers DreamBooth LoRA
    default (rank 4), at 8x its rank.
    """

    r: int = field(default=32, metadata={"help": "Rank: width of the shared low-rank space (A: in->r, B: r->out)."})
    stride_A: int = field(
        default=10,
        metadata={"help": "How many consecutive layers of a group share one down-projection A."},
    )
    num_B: int = field(default=8, metadata={"help": "Number of up-projection experts B in each group's pool (>= 2)."})
    scaling: float = field(
        default=1.0, metadata={"help": "Multiplier of the adapter output (no alpha/r); |scaling| <= 1000."}
    )
    target_modules: list[str] | str = field(
        default_factory=lambda: list(UNET_TARGET_MODULES),
        metadata={"help": "Module-name suffixes to adapt, or one regex matched against full module names."},
    )
    exclude_modules: list[str] | str | None = field(
        default=None,
        metadata={"help": "Module-name suffixes (or one regex) removed from the matches."},
    )
    init_weights: bool = field(
        default=True,
        metadata={"help": "True: B starts at zero (the adapter starts as a no-op). False: B Kaiming too (tests)."},
    )
    routing: str = field(
        default="sample",
        metadata={
            "help": "'sample': expert weights averaged over each sample's tokens (batch-invariant). "
            "'batch': averaged over the whole batch, as peft's LilyModel does (parity only)."
        },
    )

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (tuple, set, frozenset)):
            # Sets have no stable order; sort so the config (and its JSON) is deterministic.
            values = self.target_modules
            self.target_modules = sorted(values) if isinstance(values, (set, frozenset)) else list(values)
        if isinstance(self.exclude_modules, (tuple, set, frozenset)):
            values = self.exclude_modules
            self.exclude_modules = sorted(values) if isinstance(values, (set, frozenset)) else list(values)
        self.validate()

    def validate(self) -> None:
        """Raise a one-line `ValueError` naming the field for any value Lily cannot work with.

        Configs also come from files written by others, so besides types and ranges this bounds `scaling`
        (|scaling| <= 1000, see `check_multiplier`) and checks a regex target before anything compiles it
        (valid `re` syntax, bounded size; see `patterns.check_pattern`).
        """
        if not _is_int(self.r) or self.r <= 0:
            raise ValueError(f"LilyConfig.r must be a positive integer, got {shorten(self.r)}.")
        if not _is_int(self.stride_A) or self.stride_A < 1:
            raise ValueError(f"LilyConfig.stride_A must be an integer >= 1, got {shorten(self.stride_A)}.")
        if not _is_int(self.num_B) or self.num_B < 2:
            raise ValueError(
                "LilyConfig.num_B must be an integer >= 2 (the router mixes at least two experts), "
                f"got {shorten(self.num_B)}."
            )
        self.scaling = check_multiplier("LilyConfig.scaling", self.scaling)
        if self.routing not in ROUTINGS:
            raise ValueError(f"LilyConfig.routing must be one of {ROUTINGS}, got {shorten(self.routing)}.")
        _check_targets("target_modules", self.target_modules, allow_none=False)
        _check_targets("exclude_modules", self.exclude_modules, allow_none=True)
        if not isinstance(self.init_weights, bool):
            raise ValueError(f"LilyConfig.init_weights must be a bool, got {shorten(self.init_weights)}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> LilyConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown LilyConfig field(s) {unknown}; known fields: {sorted(known)}.")
        return cls(**data)

    @classmethod
    def from_json(cls, text: str) -> LilyConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise ValueError(f"LilyConfig JSON is not valid JSON: {error}") from error
        except RecursionError:  # e.g. "[[[[...]]]]" 100,000 deep in a file's metadata: json recurses per level
            raise ValueError("LilyConfig JSON nests arrays or objects too deeply to be a config.") from None
        if not isinstance(data, dict):
            raise ValueError(f"LilyConfig JSON must be an object, got {type(data).__name__}.")
        return cls.from_dict(data)

    @classmethod
    def from_peft(cls, peft_config: dict[str, Any], routing: str = "batch") -> LilyConfig:
        """Build from a peft `LilyConfig` (as a dict, e.g. a loaded `adapter_config.json`).

        `routing` defaults to "batch": that is what peft computes, so outputs match peft's.
        """
        values = {name: peft_config[name] for name in PEFT_FIELDS if peft_config.get(name) is not None}
        return cls(routing=routing, **values)

    def to_peft(self) -> dict[str, Any]:
        """The fields a peft `LilyConfig` shares with this one, by peft's names (suffix lists copied)."""
        values = {name: getattr(self, name) for name in PEFT_FIELDS}
        if not isinstance(self.target_modules, str):
            values["target_modules"] = list(self.target_modules)
        return values


# The fields this config and peft's LilyConfig share, under the same names.
PEFT_FIELDS = ("r", "stride_A", "num_B", "scaling", "target_modules", "exclude_modules", "init_weights")


def check_multiplier(name: str, value: object) -> float:
    """`value` as a float if it is a finite real number with |value| <= MAX_MULTIPLIER, else a `ValueError`.

    The adapter's output is multiplied by `scaling * scale`. The default 1.0 (peft's too) and any value a real
    adapter is trained or used with sit far inside the bound; beyond it the update swamps the layer's own output
    and fp16/bf16 activations overflow (fp16 tops out at 65504), so such a value is a corrupt file, not a setting.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{name} must be a finite number, got {shorten(value)}.")
    try:
        number = float(value)
    except OverflowError:  # an int beyond float range, e.g. 10**400 from JSON
        number = math.inf
    if not math.isfinite(number):
        raise ValueError(f"{name} must be a finite number, got {shorten(value)}.")
    if abs(number) > MAX_MULTIPLIER:
        raise ValueError(f"{name} must be between -{MAX_MULTIPLIER:g} and {MAX_MULTIPLIER:g}, got {shorten(value)}.")
    return number


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_targets(name: str, value: object, allow_none: bool) -> None:
    if allow_none and (value is None or value == []):
        return
    if isinstance(value, str):
        if not value:
            raise ValueError(f"LilyConfig.{name} must not be an empty string.")
        check_pattern(f"LilyConfig.{name}", value)
        return
    if not isinstance(value, list) or not value or not all(isinstance(v, str) and v for v in value):
        raise ValueError(
            f"LilyConfig.{name} must be a non-empty list of non-empty strings or one regex, got {shorten(value)}."
        )
