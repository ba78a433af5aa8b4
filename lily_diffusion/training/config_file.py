"""`--config_file`: a TOML or YAML file with the same keys as the flags, turned into command-line tokens."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..messages import first_line
from .errors import TrainingError


def load_config_file(path: str) -> dict[str, Any]:
    """Read a TOML (.toml) or YAML (.yaml/.yml) file into a flat dict."""
    file = Path(path)
    if not file.is_file():
        raise TrainingError(f"config file {path} does not exist")
    suffix = file.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ImportError:  # Python 3.10
                try:
                    import tomli as tomllib
                except ImportError as err:
                    raise TrainingError("reading TOML on Python 3.10 needs `pip install tomli`") from err
            data = tomllib.loads(file.read_text(encoding="utf-8"))
        elif suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError as err:
                raise TrainingError("reading YAML needs `pip install pyyaml`") from err
            data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        else:
            raise TrainingError(f"config file {path} must end in .toml, .yaml or .yml")
    except TrainingError:
        raise
    except Exception as err:  # parser errors of either format
        raise TrainingError(f"cannot parse config file {path}: {first_line(err)}") from err
    if not isinstance(data, dict):
        raise TrainingError(f"config file {path} must hold a table of flag names to values")
    return data


def config_to_argv(config: dict[str, Any], parser: argparse.ArgumentParser, source: str) -> list[str]:
    """Turn config entries into command-line tokens, so argparse types and choices check them too."""
    actions = {a.dest: a for a in parser._actions if a.option_strings}
    argv: list[str] = []
    for raw_key, value in config.items():
        key = str(raw_key).lstrip("-").replace("-", "_")
        action = actions.get(key)
        if action is None or key in ("help", "config_file"):
            raise TrainingError(f"unknown key {raw_key!r} in config file {source}")
        if value is None:
            continue
        flag = action.option_strings[0]
        if isinstance(action, argparse._StoreTrueAction):
            if not isinstance(value, bool):
                raise TrainingError(f"{key} in {source} must be true or false")
            if value:
                argv.append(flag)
        elif isinstance(value, list | tuple):
            if action.nargs not in ("+", "*"):
                raise TrainingError(f"{key} in {source} takes one value, not a list")
            argv.extend([flag, *(str(v) for v in value)])
        elif isinstance(value, bool):
            argv.append(f"{flag}={str(value).lower()}")
        else:
            argv.append(f"{flag}={value}")
    return argv
