"""Where a Lily adapter comes from: a local file or folder, a Hugging Face Hub repo, or a state dict in memory.

Hub repos are resolved with `huggingface_hub.hf_hub_download`, so its cache, `HF_HUB_OFFLINE` and the stored
login apply as for every other diffusers download; `cache_dir`, `revision`, `token` and `local_files_only` are
passed through, anything else is refused. The default file name is `pytorch_lily_weights.safetensors`;
`weight_name` and `subfolder` choose another one inside a folder or repo.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import huggingface_hub.constants
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id

from .patterns import shorten
from .serialization import (
    COMPONENTS,
    LilyComponentWeights,
    LilyStateDict,
    check_weight_name,
    read_lily_file,
    state_dict_components,
)

HUB_KWARGS: tuple[str, ...] = ("cache_dir", "revision", "token", "local_files_only")
REMOTE_ONLY_KWARGS: tuple[str, ...] = ("cache_dir", "revision", "token")

LilySource = str | os.PathLike[str] | Mapping[str, object]


def check_hub_kwargs(hub_kwargs: Mapping[str, object]) -> None:
    """A `TypeError` for any keyword that is not one of `HUB_KWARGS`, or a value of the wrong type."""
    unknown = sorted(set(hub_kwargs) - set(HUB_KWARGS))
    if unknown:
        raise TypeError(f"load_lily_weights got unknown keyword(s) {unknown}; its hub options are {HUB_KWARGS}.")
    kinds = {"cache_dir": (str, os.PathLike), "revision": (str,), "token": (str, bool), "local_files_only": (bool,)}
    for key, value in hub_kwargs.items():
        if value is not None and not isinstance(value, kinds[key]):
            raise TypeError(f"{key} must be one of {[k.__name__ for k in kinds[key]]} or None, got {shorten(value)}.")


def resolve_lily_file(
    source: str | os.PathLike[str],
    weight_name: str | None = None,
    subfolder: str | None = None,
    **hub_kwargs: object,
) -> Path:
    """The local path of the Lily weights file that `source` (a file, a folder or a hub repo id) names.

    A hub file is downloaded into (or, offline, found in) the hub cache. Every failure is one sentence
    (`FileNotFoundError`, or `ValueError` for options that do not apply to the source).
    """
    check_hub_kwargs(hub_kwargs)
    name = check_weight_name(weight_name)
    path = Path(source)
    if path.is_file():
        if weight_name is not None or subfolder is not None:
            raise ValueError(f"weight_name and subfolder choose a file in a folder or hub repo; {source} is a file.")
        _refuse_remote_options(hub_kwargs, source)
        return path
    if path.is_dir():
        _refuse_remote_options(hub_kwargs, source)
        folder = path / subfolder if subfolder else path
        if not (folder / name).is_file():
            present = sorted(p.name for p in folder.glob("*.safetensors")) if folder.is_dir() else []
            hint = f" (it has {present}; pass weight_name=...)" if present else ""
            raise FileNotFoundError(f"No Lily weights file {name} in {folder}{hint}.")
        return folder / name
    return _download(str(source), name, subfolder, hub_kwargs)


def _refuse_remote_options(hub_kwargs: Mapping[str, object], source: object) -> None:
    given = [key for key in REMOTE_ONLY_KWARGS if hub_kwargs.get(key) is not None]
    if given:
        raise ValueError(f"{', '.join(given)} apply to a hub repo id, but {source} is a local path.")


def _download(repo_id: str, name: str, subfolder: str | None, hub_kwargs: Mapping[str, object]) -> Path:
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise FileNotFoundError(f"No Lily weights at {repo_id}: no such file or folder, nor a hub repo id.") from None
    where = f"{subfolder}/{name}" if subfolder else name
    revision = hub_kwargs.get("revision") or "main"
    try:
        return Path(hf_hub_download(repo_id, name, subfolder=subfolder or None, **hub_kwargs))
    except LocalEntryNotFoundError:
        reason = f"{where} at revision {revision} of hub repo {repo_id} is not in the local hub cache"
        if hub_kwargs.get("local_files_only") or huggingface_hub.constants.HF_HUB_OFFLINE:
            advice = "and downloads are off (local_files_only=True or HF_HUB_OFFLINE=1): download it once online"
        else:
            advice = "and the Hub could not be reached: check the connection"
        raise FileNotFoundError(f"{reason} {advice}, or pass a local folder.") from None
    except RevisionNotFoundError:
        raise FileNotFoundError(f"Hub repo {repo_id} has no revision {revision}.") from None
    except RepositoryNotFoundError:
        raise FileNotFoundError(f"Hub repo {repo_id} does not exist, or it is private and needs a token.") from None
    except EntryNotFoundError:
        raise FileNotFoundError(f"Hub repo {repo_id} (revision {revision}) has no file {where}.") from None
    except OSError as error:  # network, disk: the library's first line, without any token
        first = (str(error).splitlines() or [type(error).__name__])[0]
        token = hub_kwargs.get("token")
        if isinstance(token, str) and token:
            first = first.replace(token, "<redacted>")
        raise FileNotFoundError(f"Could not download {where} from hub repo {repo_id}: {first}") from None


def lily_source_components(
    source: LilySource,
    weight_name: str | None = None,
    subfolder: str | None = None,
    component: str | None = None,
    **hub_kwargs: object,
) -> tuple[dict[str, LilyComponentWeights], str]:
    """The checked components of `source` and a label for messages.

    `source` is a file, folder or hub repo id (see `resolve_lily_file`), a `LilyStateDict` from `lily_state_dict`
    (one component: `component`, default "unet"), or a dict of them keyed by component name.
    """
    if isinstance(source, Mapping):
        check_hub_kwargs(hub_kwargs)
        if weight_name is not None or subfolder is not None or hub_kwargs:
            raise ValueError("weight_name, subfolder and hub options choose a file; a state dict needs none of them.")
        if isinstance(source, LilyStateDict):
            return state_dict_components({component or COMPONENTS[0]: source}), "the state dict"
        if source and set(source) <= set(COMPONENTS):
            return state_dict_components(dict(source)), "the state dict"  # type: ignore[arg-type]
        raise TypeError(
            f"A state dict for load_lily_weights is what lily_state_dict returns, or a dict of those keyed by "
            f"{COMPONENTS}; got a {type(source).__name__} with keys like {sorted(source)[:2]}."
        )
    path = resolve_lily_file(source, weight_name, subfolder, **hub_kwargs)
    return read_lily_file(path), str(path)
