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
    family: str | None = None  # "sd1", "sdxl" (lorakit.models.families), None when unknown


def _header_facts(path: Path) -> tuple[str | None, str | None]:
    """(ss_output_name, family key) from a .safetensors header; no tensor is read."""
    if path.suffix != ".safetensors":
        return None, None
    from ..models.checkpoint import safetensors_header
    from ..models.families.base import lora_family

    try:
        header = safetensors_header(path)
    except ModelError:  # unreadable: listed by its file name only
        return None, None
    family = lora_family(header.keys, header.metadata)
    return header.metadata.get("ss_output_name"), family.key if family else None


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
    return [LoraFile(p.stem, p, *_header_facts(p)) for p in files]


def for_family(loras: list[LoraFile], family: str | None) -> list[LoraFile]:
    """The LoRAs made for base-model family `family` (A1111 hides the others the same way, by
    ss_base_model_version); those whose family is unknown always stay. family None: all."""
    if family is None:
        return loras
    return [lf for lf in loras if lf.family in (None, family)]


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
