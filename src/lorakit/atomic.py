"""Atomic writes: a crash or a full disk never leaves a truncated file under the final name.

Temp files and folders are created with modes 0o666 / 0o777 so the OS applies the umask, as for any
ordinary file (0644 / 0755 by default, like kohya and A1111): `tempfile.mkstemp`/`mkdtemp` would make
them 0600 / 0700, unreadable to an A1111 or ComfyUI running as another user. Windows ignores the bits.
"""

from __future__ import annotations

import os
import secrets
import stat
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from .errors import LoraKitError

_TRIES = 100
# Windows refuses to replace a file another program holds open (ERROR_ACCESS_DENIED, or
# ERROR_SHARING_VIOLATION): A1111 reading the LoRA, an image viewer, an antivirus scan, the GUI
# reading status.json. Most let go within moments.
_WINERRORS_IN_USE = (5, 32)
REPLACE_WAIT_S = 5.0


class FileInUseError(LoraKitError, PermissionError):
    """The destination stayed open in another program (Windows) for the whole wait."""


def replace_file(src: str | Path, dst: str | Path, wait_s: float | None = None) -> None:
    """`os.replace(src, dst)` that, when Windows says `dst` is in use, tries again with growing pauses
    for up to `wait_s` seconds, then raises FileInUseError naming the file."""
    wait_s = REPLACE_WAIT_S if wait_s is None else wait_s
    deadline = time.monotonic() + wait_s
    pause = 0.05
    while True:
        try:
            os.replace(src, dst)
            return
        except PermissionError as e:
            if getattr(e, "winerror", None) not in _WINERRORS_IN_USE:
                raise  # POSIX: a real permission problem, which waiting does not cure
            if time.monotonic() + pause > deadline:
                raise FileInUseError(
                    f"cannot replace {dst}: another program has it open (Windows said: {e.strerror}). "
                    "Close the program holding it (AUTOMATIC1111/Forge/ComfyUI with this LoRA loaded, an "
                    "image viewer, an open folder window) and try again, or save under another name."
                ) from e
            time.sleep(pause)
            pause = min(pause * 2, 0.5)


def _new_beside(path: Path, suffix: str, create: Callable[[Path], None]) -> Path:
    """A new hidden name `.<name>.<random><suffix>` beside `path`, created by `create`."""
    for _ in range(_TRIES):
        candidate = path.parent / f".{path.name}.{secrets.token_hex(4)}{suffix}"
        try:
            create(candidate)
        except FileExistsError:
            continue
        return candidate
    raise FileExistsError(f"no free temporary name beside {path}")


def _create_file(path: Path) -> None:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    os.close(os.open(path, flags, 0o666))


def _restore_mode(path: Path, mode: int) -> None:
    """Give `path` back the mode it was created with: some writers (safetensors' `save_file`) write
    their own 0600 temp file and rename it over ours. Windows has only a read-only bit: left alone."""
    if os.name != "nt" and stat.S_IMODE(path.stat().st_mode) != mode:
        os.chmod(path, mode)


def make_temp_dir(path: str | Path, suffix: str = ".tmp") -> Path:
    """A new empty hidden folder `.<name>.<random><suffix>` beside `path` (mode 0o777 less the
    umask), to fill then rename in."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return _new_beside(path, suffix, lambda p: p.mkdir(0o777))


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A temp path beside `path`; renamed onto `path` when the block succeeds, removed otherwise."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _new_beside(path, ".tmp", _create_file)
    mode = stat.S_IMODE(tmp.stat().st_mode)  # 0o666 less the umask, applied by the OS
    try:
        yield tmp
        _restore_mode(tmp, mode)
        replace_file(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextmanager
def atomic_file(path: str | Path) -> Iterator[BinaryIO]:
    """An open binary file that becomes `path` (after fsync) when the block succeeds."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        yield f
        f.flush()
        os.fsync(f.fileno())
