"""What makes the step fast or exact on a GPU: torch.compile of the U-Net, the `deterministic` mode,
and where the caches live.

Nothing here changes a CPU run's numbers except `torch_compile` (compiled kernels round differently,
within the tolerance tests/test_train_speed_paths.py checks).
"""

from __future__ import annotations

import logging
import os

import torch

from ..config import TrainingConfig
from ..errors import ConfigError

log = logging.getLogger("lorakit")

CUBLAS_WORKSPACE = ":4096:8"  # cuBLAS's documented setting for reproducible results (":16:8" too)
# cached latents / text-encoder outputs stay on the GPU when together they take at most this share
# of its memory (SD1.5 at 512²: 64 KiB of latents per image, so 80 GiB keeps ~60 000 images there)
DEVICE_CACHE_SHARE = 0.05


def apply_deterministic(enabled: bool) -> None:
    """`deterministic = true`: deterministic algorithms (an op without one raises, naming itself), a
    fixed cuBLAS workspace, cuDNN without benchmarking. cuBLAS reads CUBLAS_WORKSPACE_CONFIG when it
    starts, so it is set here, before CUDA starts; if CUDA already runs in this process without it,
    that is an error that says how to set it. Settings are process-wide and stay on."""
    if not enabled:
        return
    if os.environ.get("CUBLAS_WORKSPACE_CONFIG") not in (CUBLAS_WORKSPACE, ":16:8"):
        if torch.cuda.is_initialized():
            raise ConfigError(
                f"deterministic = true needs CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE} before CUDA starts, and "
                "CUDA already runs in this process: set it in the environment before starting Python, e.g. "
                f"`CUBLAS_WORKSPACE_CONFIG={CUBLAS_WORKSPACE} lorakit train ...` (PowerShell: "
                f"`$env:CUBLAS_WORKSPACE_CONFIG = '{CUBLAS_WORKSPACE}'`), or turn deterministic off"
            )
        os.environ["CUBLAS_WORKSPACE_CONFIG"] = CUBLAS_WORKSPACE
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def check_compile_options(cfg: TrainingConfig) -> None:
    if cfg.torch_compile and cfg.torch_compile_mode != "default" and cfg.dynamo_backend != "inductor":
        raise ConfigError(
            f"torch_compile_mode = {cfg.torch_compile_mode!r} is an inductor mode, but dynamo_backend is "
            f"{cfg.dynamo_backend!r}: use dynamo_backend = 'inductor', or torch_compile_mode = 'default'"
        )


def compile_unet(unet: torch.nn.Module, cfg: TrainingConfig, shapes: int) -> torch.nn.Module:
    """The U-Net (with the LoRA modules hooked into it) compiled for static shapes (dynamic=False): each
    bucket shape compiles once, on the first step that meets it, training and no-grad (validation)
    apart. `shapes`: how many shapes to keep compiled before dynamo falls back to eager."""
    import torch._dynamo

    check_compile_options(cfg)
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    setattr(config, name, max(getattr(config, name), shapes))
    mode = None if cfg.torch_compile_mode == "default" else cfg.torch_compile_mode
    try:
        return torch.compile(unet, backend=cfg.dynamo_backend, mode=mode, dynamic=False)
    except Exception as e:  # an unknown backend name
        raise ConfigError(f"dynamo_backend = {cfg.dynamo_backend!r}: {e}") from None


def device_cache_budget(device: torch.device) -> int:
    """Bytes of cached latents / text-encoder outputs kept on `device` (all of them on a CPU run)."""
    if device.type != "cuda":
        return 2**63
    total = torch.cuda.get_device_properties(device).total_memory
    return int(total * DEVICE_CACHE_SHARE)
