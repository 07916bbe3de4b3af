"""Read a single-file checkpoint (.safetensors, or .ckpt/.pt via torch's safe weights-only unpickler)."""

from __future__ import annotations

import pickle
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from lorakit.errors import ModelError

if TYPE_CHECKING:  # torch is imported where tensors are read: a header alone needs none
    import torch

_MAGIC = {
    b"\x89PNG": "a PNG image",
    b"\xff\xd8\xff": "a JPEG image",
    b"GIF8": "a GIF image",
    b"RIFF": "a RIFF (WebP/WAV) file",
    b"{": "a JSON/text file",
    b"version https://git-lfs": "a Git LFS pointer (run `git lfs pull`)",
}


def _sniff(path: Path) -> str:
    """'safetensors', 'torch', or raise: decide by content, not by extension."""
    with open(path, "rb") as f:
        head = f.read(64)
    if len(head) >= 9 and head[8:9] == b"{":
        # safetensors: u64 little-endian header length, then a JSON header
        return "safetensors"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "torch"  # torch.save zip archive, or a legacy pickle
    what = next((desc for magic, desc in _MAGIC.items() if head.startswith(magic)), "an unknown format")
    raise ModelError(
        f"{path}: not a model checkpoint (the file looks like {what}). "
        "Pass an SD1.x .safetensors/.ckpt file or a diffusers folder."
    )


def is_safetensors(path: str | Path) -> bool:
    """True for a .safetensors file (by content); False for anything else that is not one, such as a
    torch checkpoint, or a missing or empty file (read_state_dict explains those); ModelError for junk."""
    path = Path(path)
    return path.is_file() and path.stat().st_size > 0 and _sniff(path) == "safetensors"


def _unreadable_safetensors(path: str | Path, e: Exception) -> ModelError:
    return ModelError(f"{path}: not a readable .safetensors file ({e}). Is it truncated or corrupt?")


@dataclass(frozen=True)
class SafetensorsHeader:
    keys: list[str]
    shapes: dict[str, tuple[int, ...]]  # of every key
    metadata: dict[str, str]  # the `__metadata__` strings; {} when the file has none


def safetensors_header(path: str | Path) -> SafetensorsHeader:
    """Key names, shapes and metadata of a .safetensors file, from its JSON header only (no tensor is
    read); ModelError when it is not a readable .safetensors file."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="np") as f:  # numpy: reading a header needs no torch
            keys = list(f.keys())
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in keys}
            metadata = dict(f.metadata() or {})
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable_safetensors(path, e) from e
    return SafetensorsHeader(keys, shapes, metadata)


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise _unreadable_safetensors(path, e) from e
    return state_dict, metadata


def _read_torch(path: Path, mmap: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    import torch

    with open(path, "rb") as f:
        mmap = mmap and f.read(4) == b"PK\x03\x04"  # torch maps only its zip format, not a legacy pickle

    def load(mapped: bool):
        # weights_only: the restricted unpickler never runs code from the file (kohya uses full pickle)
        return torch.load(str(path), map_location="cpu", weights_only=True, mmap=mapped)

    try:
        try:
            obj = load(mmap)
        except (RuntimeError, OSError, ValueError):
            if not mmap:
                raise
            obj = load(False)  # a platform where torch cannot map the file: read it whole
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL (\S+)", str(e))
        if found or "Unsupported" in str(e):
            what = f" ({found.group(1)})" if found else ""
            raise ModelError(
                f"{path}: the file contains Python code/objects{what}, not just tensors, and was refused "
                "(loading it could run arbitrary code). Convert it to .safetensors with a tool you trust, "
                "or use a .safetensors release of the model."
            ) from e
        raise ModelError(f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0]}).") from e
    except (RuntimeError, EOFError, OSError, ValueError) as e:
        raise ModelError(
            f"{path}: not a readable PyTorch checkpoint ({str(e).splitlines()[0]}). "
            "Is it truncated or corrupt?"
        ) from e
    if not isinstance(obj, dict):
        raise ModelError(f"{path}: the checkpoint holds a {type(obj).__name__}, not a state dict.")
    # kohya stores ints/strings next to "state_dict"; string entries are our metadata (lorakit.arch)
    metadata = {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, str)}
    if isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    state_dict = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    return state_dict, metadata


def place_tensor(tensor: torch.Tensor, dtype: torch.dtype, device) -> torch.Tensor:
    """`tensor` on `device`, in `dtype` if it is floating point (ids and masks keep theirs). Already
    there, it is returned as it is: from a mapped file, a private (copy-on-write) mapping."""
    return tensor.to(device=device, dtype=dtype if tensor.is_floating_point() else tensor.dtype)


_SAFETENSORS_DTYPES = {  # the format's names -> torch's (as torch names them; F8 kinds need torch >= 2.1)
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
    "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
    "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2",
}  # fmt: skip


def _read_safetensors_one_by_one(path: Path, dtype_of, device) -> dict[str, torch.Tensor]:
    """read_tensors for a .safetensors: each tensor read with a plain file read into its own buffer,
    placed, and its buffer freed, so the host holds the placed model plus one tensor (a mapped file
    would keep every page read so far counted against the process until the end)."""
    import json
    import struct

    import torch

    try:
        with open(path, "rb") as f:
            (size,) = struct.unpack("<Q", f.read(8))
            header = json.loads(f.read(size))
            start = 8 + size
            out = {}
            for key, info in header.items():
                dtype = None if key == "__metadata__" else dtype_of(key)
                if dtype is None:
                    continue
                stored = getattr(torch, _SAFETENSORS_DTYPES[info["dtype"]])
                begin, end = info["data_offsets"]
                if end == begin:
                    tensor = torch.empty(info["shape"], dtype=stored)
                else:
                    f.seek(start + begin)
                    buffer = bytearray(end - begin)
                    if f.readinto(buffer) != len(buffer):
                        raise ValueError(f"'{key}' is cut short")
                    tensor = torch.frombuffer(buffer, dtype=stored).reshape(info["shape"])
                out[key] = place_tensor(tensor, dtype, device)
    except (OSError, ValueError, KeyError, TypeError, AttributeError, RuntimeError, struct.error) as e:
        raise _unreadable_safetensors(path, e) from e
    return out


def read_tensors(
    path: str | Path,
    dtype_of: Callable[[str], torch.dtype | None],
    device="cpu",
    loaded: tuple[dict, dict] | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors of a checkpoint for which `dtype_of(key)` gives a dtype, each cast to it and moved
    to `device` as it is read, so the file is never whole in RAM in another dtype (or at all, for a
    .safetensors or zip .ckpt, which are mapped). `loaded`: the (state_dict, metadata) already read."""
    if loaded is not None:
        source = loaded[0]
    elif is_safetensors(path):
        return _read_safetensors_one_by_one(Path(path), dtype_of, device)
    else:
        source = read_state_dict(path, mmap=True)[0]
    out = {}
    for key in list(source):
        dtype = dtype_of(key)
        if dtype is not None:
            out[key] = place_tensor(source[key], dtype, device)
    return out


def read_state_dict(path: str | Path, mmap: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Return (tensors by key, string metadata) of a .safetensors or .ckpt/.pt file. `mmap`: a
    .ckpt's tensors stay in the file (mapped, read on use) where torch can, instead of in RAM."""
    path = Path(path)
    if not path.exists():
        raise ModelError(f"{path}: file not found. Expected a .safetensors or .ckpt checkpoint.")
    if not path.is_file():
        raise ModelError(f"{path}: not a file. Expected a .safetensors or .ckpt checkpoint.")
    if path.stat().st_size == 0:
        raise ModelError(f"{path}: the file is empty (0 bytes); the download or copy probably failed.")
    if _sniff(path) == "safetensors":
        return _read_safetensors(path)
    return _read_torch(path, mmap)
