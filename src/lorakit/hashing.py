"""File hashes shared by the latent cache, the LoRA metadata and PNG info."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import threading
from concurrent.futures import Future
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


def cache_dir() -> Path:
    """lorakit's per-user cache folder: LORAKIT_CACHE_DIR, else %LOCALAPPDATA%\\lorakit on Windows,
    else $XDG_CACHE_HOME/lorakit or ~/.cache/lorakit."""
    if os.environ.get("LORAKIT_CACHE_DIR"):
        return Path(os.environ["LORAKIT_CACHE_DIR"])
    if sys.platform == "win32" and os.environ.get("LOCALAPPDATA"):
        return Path(os.environ["LOCALAPPDATA"]) / "lorakit"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "lorakit"


_cache_lock = threading.Lock()


def _hash_cache_file() -> Path:
    return cache_dir() / "hashes.json"


def _file_key(path: Path) -> tuple[str, str]:
    st = path.stat()
    return str(path.resolve()), f"{st.st_size}:{st.st_mtime_ns}"


def cached_file_sha256(path: str | Path) -> str:
    """file_sha256, remembered per (resolved path, size, mtime) as A1111's cache.json does: a 2-7 GB
    base model is read once, not at every training start or generation. A cache that cannot be read or
    written is ignored (the hash is then computed each time)."""
    path = Path(path)
    name, stamp = _file_key(path)
    cache_file = _hash_cache_file()
    with _cache_lock:
        entries = _read_cache(cache_file)
        hit = entries.get(name)
        if isinstance(hit, dict) and hit.get("stamp") == stamp and isinstance(hit.get("sha256"), str):
            return hit["sha256"]
    digest = file_sha256(path)
    with _cache_lock:
        entries = _read_cache(cache_file)  # another run may have added entries meanwhile
        entries[name] = {"stamp": stamp, "sha256": digest}
        try:
            from .atomic import atomic_file

            with atomic_file(cache_file) as f:
                f.write(json.dumps(entries, indent=1).encode())
        except OSError:
            pass
    return digest


def _read_cache(cache_file: Path) -> dict:
    try:
        entries = json.loads(cache_file.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return entries if isinstance(entries, dict) else {}


def in_background(fn, *args) -> Future:
    """Run fn(*args) on a daemon thread (hashlib releases the GIL while it hashes); the result, or
    the exception, comes from the returned future."""
    future: Future = Future()

    def run() -> None:
        try:
            future.set_result(fn(*args))
        except BaseException as e:  # handed to whoever asks for the result
            future.set_exception(e)

    threading.Thread(target=run, name="lorakit-hash", daemon=True).start()
    return future
