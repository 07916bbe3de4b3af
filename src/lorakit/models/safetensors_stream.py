"""Rewrite a checkpoint as .safetensors one tensor at a time, copying untouched tensors byte for byte.

safetensors' own `save_file` needs every tensor in memory at once (an SDXL checkpoint is 6.5 GB); this
writer computes the header first (every size is known from the input's dtypes and shapes), then
streams the data: raw copies from a .safetensors input, and only the tensors that change (or are
cast) pass through torch. The format: u64 little-endian header length, a JSON header padded with
spaces to a multiple of 8, then the tensors' bytes back to back.
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import BinaryIO

import torch

from ..errors import ModelError

DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
NAMES = {v: k for k, v in DTYPES.items()}
FLOATS = ("F64", "F32", "F16", "BF16")
_CHUNK = 16 << 20  # raw copies in 16 MiB pieces: memory stays flat whatever the tensor size


def _itemsize(dtype: str) -> int:
    if dtype in DTYPES:
        return torch.empty((), dtype=DTYPES[dtype]).element_size()
    return {"F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8}.get(dtype, 0)


class SafetensorsSource:
    """A .safetensors file read piecewise: its header here, each tensor's bytes on request. Plain reads,
    no memory map: a map of the whole file would show (and count) as gigabytes of the process."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        try:
            self._raw = open(self.path, "rb")  # noqa: SIM115 - closed by close(), after the last tensor
            (n,) = struct.unpack("<Q", self._raw.read(8))
            header = json.loads(self._raw.read(n))
            self.data_start = 8 + n
            self.metadata: dict[str, str] = dict(header.pop("__metadata__", None) or {})
            self.entries = {
                k: (v["dtype"], tuple(v["shape"]), tuple(v["data_offsets"])) for k, v in header.items()
            }
            data_size = self.path.stat().st_size - self.data_start
            if any(not 0 <= s <= e <= data_size for _, _, (s, e) in self.entries.values()):
                raise ValueError("a tensor lies outside the file")
        except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
            raise ModelError(
                f"{self.path}: not a readable .safetensors file ({e}). Is it truncated or corrupt?"
            ) from e
        self._buffer = memoryview(bytearray(_CHUNK))

    def keys(self) -> list[str]:
        return sorted(self.entries, key=lambda k: self.entries[k][2])  # the file's own order

    def info(self, key: str) -> tuple[str, tuple[int, ...]]:
        dtype, shape, _ = self.entries[key]
        return dtype, shape

    def tensor(self, key: str) -> torch.Tensor:
        dtype, shape, (start, end) = self.entries[key]
        if dtype not in DTYPES:
            raise ModelError(
                f"{self.path}: tensor {key!r} has dtype {dtype}, which lorakit cannot compute with"
            )
        data = bytearray(end - start)
        self._raw.seek(self.data_start + start)
        if self._raw.readinto(data) != len(data):
            raise ModelError(f"{self.path}: the file ends inside tensor {key!r}; is it truncated?")
        if not data:
            return torch.empty(shape, dtype=DTYPES[dtype])
        return torch.frombuffer(data, dtype=DTYPES[dtype]).reshape(shape)

    def copy_raw(self, key: str, out: BinaryIO) -> None:
        start, end = self.entries[key][2]
        self._raw.seek(self.data_start + start)
        left = end - start
        while left:  # through one reused buffer: no fresh allocation per piece for the allocator to keep
            n = self._raw.readinto(self._buffer[: min(left, _CHUNK)])
            if not n:
                raise ModelError(f"{self.path}: the file ends inside tensor {key!r}; is it truncated?")
            out.write(self._buffer[:n])
            left -= n

    def close(self) -> None:
        self._raw.close()


class TensorSource:
    """Tensors already in memory (a .ckpt, which has to be unpickled whole), seen as a source."""

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
        self.tensors = tensors
        self.metadata = dict(metadata)

    def keys(self) -> list[str]:
        return list(self.tensors)

    def info(self, key: str) -> tuple[str, tuple[int, ...]]:
        t = self.tensors[key]
        if t.dtype not in NAMES:
            raise ModelError(
                f"tensor {key!r} has dtype {t.dtype}, which lorakit cannot write to .safetensors"
            )
        return NAMES[t.dtype], tuple(t.shape)

    def tensor(self, key: str) -> torch.Tensor:
        return self.tensors[key]

    def copy_raw(self, key: str, out: BinaryIO) -> None:
        write_tensor(self.tensors[key], out)

    def close(self) -> None:
        pass


def write_tensor(t: torch.Tensor, out: BinaryIO) -> None:
    """The tensor's bytes, little-endian as safetensors stores them (bf16 too: viewed as bytes)."""
    out.write(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())


def write_streamed(
    path: str | Path,
    source,
    metadata: dict[str, str],
    change: dict[str, Callable[[torch.Tensor], torch.Tensor]],
    cast_floats: torch.dtype | None = None,
    on_tensor: Callable[[int, int], None] | None = None,
) -> int:
    """Write every tensor of `source` to `path` under its own key: `change[key](tensor)` for the keys
    in `change` (the result keeps the input's dtype unless `cast_floats`), a raw byte copy for the
    rest (cast when `cast_floats` names another float type). `on_tensor(bytes done, bytes in all)`
    after each tensor. Returns the bytes written."""
    keys = source.keys()
    layout: list[tuple[str, str, tuple[int, ...], int]] = []
    offset = 0
    for key in keys:
        dtype, shape = source.info(key)
        if cast_floats is not None and dtype in FLOATS:
            dtype = NAMES[cast_floats]
        size = _itemsize(dtype)
        if not size:
            raise ModelError(f"tensor {key!r} has dtype {dtype}, which lorakit does not know how to copy")
        nbytes = size * _numel(shape)
        layout.append((key, dtype, shape, nbytes))
        offset += nbytes
    header = _header(layout, metadata)
    total = 8 + len(header) + offset
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(header)))
        out.write(header)
        for key, dtype, shape, nbytes in layout:
            start = out.tell()
            if key in change or dtype != source.info(key)[0]:
                t = source.tensor(key)
                t = change[key](t) if key in change else t
                write_tensor(t.to(DTYPES[dtype]).reshape(shape), out)
            else:
                source.copy_raw(key, out)
            if out.tell() - start != nbytes:  # a wrong size would corrupt every later tensor
                raise ModelError(f"tensor {key!r}: wrote {out.tell() - start} bytes where {nbytes} were due")
            if on_tensor is not None:
                on_tensor(out.tell(), total)
        out.flush()
        os.fsync(out.fileno())
        return out.tell()


def _numel(shape: Iterable[int]) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _header(layout, metadata: dict[str, str]) -> bytes:
    entries: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for key, dtype, shape, nbytes in layout:
        entries[key] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(entries, separators=(",", ":")).encode("utf-8")
    return text + b" " * (-len(text) % 8)  # the data starts 8-byte aligned, as safetensors writes it
