"""File hashes shared by the latent cache, the LoRA metadata and PNG info."""

from __future__ import annotations

import hashlib
from pathlib import Path


def file_sha256(path: str | Path) -> str:
    """sha256 of a whole file, read in 4 MiB blocks (base models are several GB)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def legacy_hash(source: bytes | str | Path) -> str:
    """A1111's old model hash: sha256 of the 64 KiB at offset 1 MiB, first 8 hex, of a file or its bytes.

    kohya stores it as `ss_sd_model_hash` (base model file) and `sshs_legacy_hash` (LoRA bytes);
    anything under 1 MiB hashes the empty window: e3b0c442."""
    start, size = 0x100000, 0x10000
    if isinstance(source, bytes):
        window = source[start : start + size]
    else:
        with open(source, "rb") as f:
            f.seek(start)
            window = f.read(size)
    return hashlib.sha256(window).hexdigest()[:8]
