"""Shipped training presets: one TOML file per base family x card memory x goal.

Each file has a `description` (the VRAM it is meant for and why), kohya option keys at the top
level, and an optional `unset` list: options the preset clears (so applying it over another
preset, in the GUI, leaves nothing of that one behind).
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import tomllib

from ..errors import ConfigError

SUFFIX = ".toml"


def _files() -> dict[str, Any]:
    folder = resources.files(__name__)
    return {p.name[: -len(SUFFIX)]: p for p in folder.iterdir() if p.is_file() and p.name.endswith(SUFFIX)}


def list_presets() -> dict[str, str]:
    """{name: description}, sorted by name."""
    return {name: _read(name, path)[0] for name, path in sorted(_files().items())}


def load_preset(name: str) -> dict[str, Any]:
    """The preset's options as a flat dict (cleared options as None), ready for TrainConfig.update."""
    files = _files()
    if name not in files:
        known = ", ".join(sorted(files))
        raise ConfigError(
            f"unknown preset {name!r}; the shipped presets are: {known} (`lorakit train --list_presets`)"
        )
    return _read(name, files[name])[1]


def _read(name: str, path) -> tuple[str, dict[str, Any]]:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"preset {name!r}: not valid TOML: {e}") from None
    description = " ".join(str(data.pop("description", "")).split())
    unset = data.pop("unset", [])
    flat: dict[str, Any] = {key: None for key in unset}
    for key, value in data.items():
        if isinstance(value, dict):  # a [section] table, as kohya's config files have
            flat.update(value)
        else:
            flat[key] = value
    return description, flat
