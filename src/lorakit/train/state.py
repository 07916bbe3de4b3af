"""Training state for `resume`: LoRA weights, optimizer, LR scheduler, position in the data.

Written to a temp folder and renamed, so a crash leaves either the old state or the new one.
Loaded with `torch.load(weights_only=True)`: a state folder never runs code.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from ..atomic import atomic_path, make_temp_dir
from ..errors import ConfigError

STATE_FILE = "train_state.json"


@dataclass
class Position:
    epoch: int  # epochs finished
    step: int  # optimizer steps done
    batch_in_epoch: int  # batches of the current epoch already consumed
    seed: int


def save_state(folder: str | Path, network, optimizer, lr_scheduler, pos: Position) -> Path:
    from safetensors.torch import save_file

    folder = Path(folder)
    tmp = make_temp_dir(folder)
    try:
        with atomic_path(tmp / "network.safetensors") as weights:  # keeps the umask's mode
            save_file(network.kohya_state_dict(torch.float32), str(weights))
        torch.save(
            {"optimizer": optimizer.state_dict(), "lr_scheduler": lr_scheduler.state_dict()},
            tmp / "optimizer.pt",
        )
        (tmp / STATE_FILE).write_text(json.dumps(asdict(pos), indent=1))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def read_position(folder: str | Path) -> Position:
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise ConfigError(f"resume: {folder} is not a lorakit state folder (no {STATE_FILE})")
    return Position(**json.loads(path.read_text()))


def load_state(folder: str | Path, network, optimizer, lr_scheduler) -> Position:
    from safetensors.torch import load_file

    folder = Path(folder)
    needed = [folder / n for n in ("network.safetensors", "optimizer.pt", STATE_FILE)]
    missing = [p.name for p in needed if not p.is_file()]
    if missing:
        raise ConfigError(f"resume: {folder} is not a lorakit state folder (missing {', '.join(missing)})")
    network.load_kohya_state_dict(load_file(str(needed[0])), source=str(folder))
    opt = torch.load(needed[1], map_location="cpu", weights_only=True)
    optimizer.load_state_dict(opt["optimizer"])
    lr_scheduler.load_state_dict(opt["lr_scheduler"])
    return read_position(folder)
