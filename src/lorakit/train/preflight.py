"""Checks of the output folder before the models load: it can be written, and has room for the run.

Without them an unwritable or full disk shows only at the first save, after an epoch of training.
"""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

from ..config import TrainConfig
from ..errors import ConfigError

# LoRA parameters per unit of rank on SD1.5: its 192 U-Net + 72 text-encoder modules have
# 589,824 (in + out summed), so a dim-128 fp16 file is about 144 MiB; LoCon's 3x3 convs
# (in*9 + out per rank) add roughly 0.5M. Other SD1.x-family models are smaller.
PARAMS_PER_RANK = 600_000
CONV_PARAMS_PER_RANK = 500_000
SAVE_BYTES = {"fp16": 2, "bf16": 2, "float": 4}
STATE_BYTES_PER_PARAM = 16  # fp32 weights + up to three fp32 optimizer buffers (Prodigy has the most)


def estimated_lora_params(cfg: TrainConfig) -> int:
    n = cfg.network
    conv_dim, pairs = n.conv_dim or 0, 1
    if n.network_module == "lycoris.kohya":
        if n.lycoris_preset == "full":  # LyCORIS trains the 3x3 convs at network_dim unless told otherwise
            conv_dim = conv_dim or n.network_dim
        pairs = 2 if n.algo == "loha" else 1  # LoHa: two low-rank pairs; LoKr is smaller than LoRA
    return pairs * (PARAMS_PER_RANK * n.network_dim + CONV_PARAMS_PER_RANK * conv_dim)


def estimated_output_bytes(cfg: TrainConfig, epochs: int) -> int:
    """Bytes the run's saves take: the final file, every epoch save, their states, one temp file."""
    o = cfg.output
    params = estimated_lora_params(cfg)
    lora = params * SAVE_BYTES[o.save_precision]
    saves = 1 + (epochs - 1) // o.save_every_n_epochs if o.save_every_n_epochs else 1
    per_save = lora + (params * STATE_BYTES_PER_PARAM if o.save_state else 0)
    return saves * per_save + lora  # the atomic write holds a temp copy beside the old file


class UnwritableFolder(ConfigError):
    """A folder no file can be written in; `folder` is the one probed, `reason` the system's word."""

    def __init__(self, folder: Path, reason: str):
        super().__init__(f"{folder} cannot be written ({reason})")
        self.folder, self.reason = folder, reason


def probe_folder(folder: str | Path) -> int:
    """Free bytes on the disk of `folder`, once a file was written there; a folder not created yet is
    probed in its nearest existing parent (nothing is created). UnwritableFolder when it cannot be."""
    probe_dir = Path(folder)
    while not probe_dir.exists() and probe_dir.parent != probe_dir:
        probe_dir = probe_dir.parent
    try:
        with tempfile.TemporaryFile(dir=probe_dir, prefix=".lorakit-write-check-"):
            pass
        return shutil.disk_usage(probe_dir).free
    except OSError as e:
        raise UnwritableFolder(probe_dir, e.strerror or str(e)) from None


def check_output_folder(cfg: TrainConfig, batches_per_epoch: int) -> None:
    """Create output_dir, prove a file can be written there and that the disk has room for the saves."""
    from .optim import steps_and_epochs

    folder = Path(cfg.output.output_dir)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        free = probe_folder(folder)
    except (OSError, UnwritableFolder) as e:
        reason = e.reason if isinstance(e, UnwritableFolder) else e.strerror or e
        raise ConfigError(
            f"output_dir {folder} cannot be written ({reason}): choose a folder you can write to"
        ) from None
    _, _, epochs = steps_and_epochs(cfg.training, max(batches_per_epoch, 1))
    need = estimated_output_bytes(cfg, epochs)
    if free < need:
        raise ConfigError(
            f"output_dir {folder}: the disk has {_mb(free)} free, but this run saves about {_mb(need)} "
            "(the LoRA file and its epoch saves and states). Free some space or choose another folder."
        )


def _mb(n: int) -> str:
    return f"{math.ceil(n / 2**20)} MiB"
