"""Training state for `resume`: LoRA weights, optimizer, LR scheduler, fp16 loss scaler, data position.

A state is written to a hidden temp folder (each file and the folder fsynced), then swapped in:
the old state is renamed aside, the new one renamed in, and only then is the old one deleted. A
kill at any moment leaves a complete state: the new one, the old one, or the old one aside (which
readers find and the next save or run renames back). The next run deletes temp leftovers.
Loaded with `torch.load(weights_only=True)`: a state folder never runs code.
"""

from __future__ import annotations

import errno
import glob
import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import torch

from ..atomic import make_temp_dir, replace_file
from ..errors import ConfigError

STATE_FILE = "train_state.json"
log = logging.getLogger("lorakit")


@dataclass
class Position:
    epoch: int  # epochs finished
    step: int  # optimizer steps done
    batch_in_epoch: int  # batches of the current epoch already consumed
    seed: int
    # the run's ss_session_id: a resumed run goes on as the same run (states written before it: "")
    session_id: str = ""


def _aside(folder: Path) -> Path:
    return folder.with_name(f".{folder.name}.old")


def _write_synced(path: Path, write: Callable[[BinaryIO], object]) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(folder: Path) -> None:
    """Make the renames in `folder` durable. Windows cannot open a folder to fsync it (NTFS
    journals its renames), and some network or FUSE filesystems refuse it."""
    if os.name == "nt":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def recover_state(folder: str | Path) -> None:
    """Finish a swap a kill cut short: put an aside state back, drop a superseded one and temp folders."""
    folder = Path(folder)
    aside = _aside(folder)
    if aside.is_dir():
        if (folder / STATE_FILE).is_file():
            shutil.rmtree(aside, ignore_errors=True)
        else:
            shutil.rmtree(folder, ignore_errors=True)  # nothing, or a folder that is no state
            replace_file(aside, folder)
            log.warning("restored the state %s that an interrupted save had set aside", folder)
    for tmp in folder.parent.glob(f".{glob.escape(folder.name)}.*.tmp"):
        shutil.rmtree(tmp, ignore_errors=True)


def clean_output_folder(output_dir: str | Path, output_name: str) -> None:
    """Remove the hidden temp files and folders a killed run left beside its LoRAs and states
    (`.<name>.safetensors.<random>.tmp`, `.<name>-state.<random>.tmp`), restore set-aside states."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return
    ours = re.compile(rf"\.({re.escape(output_name)}(?:-\d+)?(?:-state|\.safetensors))\.(?:[^.]+\.tmp|old)")
    for entry in list(output_dir.iterdir()):
        m = ours.fullmatch(entry.name)
        if not m or not entry.exists():  # an earlier recover_state may have handled it
            continue
        if m[1].endswith("-state"):
            recover_state(output_dir / m[1])
        else:
            entry.unlink(missing_ok=True)
            log.info("removed %s, left by an interrupted save", entry)


def save_state(folder: str | Path, network, optimizer, lr_scheduler, pos: Position, scaler=None) -> Path:
    from safetensors.torch import save

    folder = Path(folder)
    folder.parent.mkdir(parents=True, exist_ok=True)
    recover_state(folder)  # an aside state from a killed swap must not be lost below
    tmp = make_temp_dir(folder, suffix=".tmp")  # 0o777 less the umask, not mkdtemp's 0700
    aside = _aside(folder)
    from ..transfer import nested_to_cpu

    # the optimizer's moments come off the GPU in one copy (torch.save would wait once per tensor)
    opt = {"optimizer": nested_to_cpu(optimizer.state_dict()), "lr_scheduler": lr_scheduler.state_dict()}
    if scaler is not None:  # fp16: the loss scale and its growth tracker
        opt["scaler"] = scaler.state_dict()
    try:
        _write_synced(
            tmp / "network.safetensors", lambda f: f.write(save(network.kohya_state_dict(torch.float32)))
        )
        _write_synced(tmp / "optimizer.pt", lambda f: torch.save(opt, f))
        _write_synced(tmp / STATE_FILE, lambda f: f.write(json.dumps(asdict(pos), indent=1).encode()))
        fsync_dir(tmp)
        if folder.exists():  # on Windows, waits while another program has a file in it open
            replace_file(folder, aside)
        replace_file(tmp, folder)
        fsync_dir(folder.parent)
    except BaseException:
        recover_state(folder)
        raise
    shutil.rmtree(aside, ignore_errors=True)
    return folder


def _readable(folder: Path) -> Path:
    """`folder`, or its aside copy when a kill cut a save short (the next save renames it back)."""
    if not (folder / STATE_FILE).is_file() and (_aside(folder) / STATE_FILE).is_file():
        return _aside(folder)
    return folder


def read_position(folder: str | Path) -> Position:
    path = _readable(Path(folder)) / STATE_FILE
    if not path.is_file():
        raise ConfigError(f"resume: {folder} is not a lorakit state folder (no {STATE_FILE})")
    return Position(**json.loads(path.read_text()))


def load_state(folder: str | Path, network, optimizer, lr_scheduler, scaler=None) -> Position:
    from safetensors.torch import load_file

    source = folder
    folder = _readable(Path(folder))
    needed = [folder / n for n in ("network.safetensors", "optimizer.pt", STATE_FILE)]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise ConfigError(f"resume: {source} is not a lorakit state folder (missing {', '.join(missing)})")
    network.load_kohya_state_dict(load_file(str(needed[0])), source=str(source))
    opt = torch.load(needed[1], map_location="cpu", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    lr_scheduler.load_state_dict(opt["lr_scheduler"])
    if scaler is not None and "scaler" in opt:
        scaler.load_state_dict(opt["scaler"])
    return read_position(folder)
