"""Find LoRA files by name the way A1111 does (models/Lora, recursive, file name or alias)."""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from pathlib import Path

from ..errors import ModelError

# Listed so that <lora:NAME> of an old .pt/.ckpt finds it and network.file explains how to convert it.
LORA_SUFFIXES = (".safetensors", ".pt", ".ckpt")


@dataclass
class LoraFile:
    name: str  # file stem: what <lora:NAME> uses
    path: Path
    alias: str | None  # ss_output_name from the metadata


def _output_name(path: Path) -> str | None:
    if path.suffix != ".safetensors":
        return None
    from ..models.checkpoint import safetensors_header

    try:
        return safetensors_header(path).metadata.get("ss_output_name")
    except ModelError:  # unreadable: listed by its file name only
        return None


def list_loras(lora_dir: str | Path) -> list[LoraFile]:
    """Every LoRA file under `lora_dir`, searched recursively like A1111's models/Lora."""
    root = Path(lora_dir)
    if not root.is_dir():
        return []
    files = sorted(
        p
        for p in root.rglob("*")
        if p.suffix.lower() in LORA_SUFFIXES and p.is_file() and not (p.parent / "train_state.json").exists()
    )  # a training state folder (<name>-state/network.safetensors) is not a LoRA to draw with
    return [LoraFile(p.stem, p, _output_name(p)) for p in files]


def resolve(name: str, loras: list[LoraFile], lora_dir: str | Path) -> LoraFile:
    """By file name first (the later of equal stems wins, as in A1111), then by alias."""
    by_name = {lf.name: lf for lf in loras}
    if name in by_name:
        return by_name[name]
    by_alias = {lf.alias: lf for lf in loras if lf.alias}
    if name in by_alias:
        return by_alias[name]
    known = list(dict.fromkeys([*by_name, *by_alias]))  # a file named like its alias: once
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f" Close matches: {', '.join(close)}." if close else ""
    raise ModelError(f"LoRA {name!r} not found in {lora_dir} ({len(by_name)} LoRAs there).{hint}")
