"""Resize a LoRA to a lower rank, as kohya's networks/resize_lora.py does.

Per module: ΔW/scale = up·down (the module's alpha/rank left out), its SVD, the rank kept (fixed, or
a dynamic rule capped at new_rank; 3x3 convs at new_conv_rank), up = U·S, down = Vh, and
new alpha = old scale · new rank, so alpha/rank -- the strength at a given multiplier -- is kept.
No clamping (unlike extract / svd-merge). The result is the best approximation at that rank.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from ..errors import ModelError
from .delta import lora_modules
from .svd import (
    DYNAMIC_METHODS,
    choose_rank,
    is_spatial_conv,
    module_scale,
    module_spectrum,
    module_weight_shape,
    retained,
    shape_factors,
    truncate,
)
from .tool_metadata import network_args_with_conv, rank_metadata

log = logging.getLogger("lorakit")


@dataclass
class ModuleResize:
    """What resizing did to one module (kohya's --verbose line)."""

    name: str
    old_rank: int
    new_rank: int
    new_alpha: float
    fro_retained: float  # Frobenius norm of ΔW kept, 0-1
    sum_retained: float  # ΣS kept, 0-1
    max_ratio: float  # S₀ / the smallest kept S


def check_resize_args(
    new_rank: int, new_conv_rank: int | None, dynamic_method: str | None, dynamic_param: float | None
) -> None:
    if new_rank < 1 or (new_conv_rank is not None and new_conv_rank < 1):
        raise ModelError(f"new_rank {new_rank} / new_conv_rank {new_conv_rank}: a rank is at least 1")
    if dynamic_method is None:
        return
    if dynamic_method not in DYNAMIC_METHODS:
        raise ModelError(f"dynamic_method {dynamic_method!r}: use one of {', '.join(DYNAMIC_METHODS)}")
    if dynamic_param is None or dynamic_param <= 0:
        raise ModelError(
            f"dynamic_method {dynamic_method} needs a dynamic_param > 0 (sv_ratio: e.g. 2-20; "
            "sv_fro / sv_cumulative: a fraction 0-1, e.g. 0.9)"
        )
    if dynamic_method != "sv_ratio" and dynamic_param > 1:
        raise ModelError(f"dynamic_param {dynamic_param} for {dynamic_method}: a fraction 0-1 (e.g. 0.9)")


def resize_lora(
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    new_rank: int,
    new_conv_rank: int | None = None,
    dynamic_method: str | None = None,
    dynamic_param: float | None = None,
    source: str = "LoRA",
    device: str | torch.device | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str], list[ModuleResize]]:
    """The resized tensors (float32), kohya's updated metadata, and per-module stats.

    new_conv_rank: rank of 3x3 conv modules (default new_rank); with dynamic_method both are the
    highest rank a module may keep."""
    check_resize_args(new_rank, new_conv_rank, dynamic_method, dynamic_param)
    conv_rank = new_rank if new_conv_rank is None else new_conv_rank
    modules = lora_modules(tensors, source)
    if not modules:
        raise ModelError(f"LoRA {source}: no modules to resize")
    old_dim = max(m.rank or 0 for m in modules.values())  # (IA)³ / full / full-LoKr modules have no rank
    if not dynamic_method and max(new_rank, conv_rank) > old_dim:
        log.warning(
            "new rank %d is above the LoRA's rank %d: the extra rank holds nothing (resize only shrinks)",
            max(new_rank, conv_rank),
            old_dim,
        )
    out: dict[str, torch.Tensor] = {}
    stats: list[ModuleResize] = []
    with torch.no_grad():
        for name, m in modules.items():
            shape = module_weight_shape(m)
            if device is not None:
                m = _to_device(m, device)
            spectrum = module_spectrum(m, shape, source)
            cap = conv_rank if is_spatial_conv(shape) else new_rank
            rank = choose_rank(spectrum, cap, dynamic_method, dynamic_param)
            up, down = shape_factors(*truncate(spectrum, rank), shape)
            alpha = module_scale(m) * rank
            out[f"{name}.lora_down.weight"] = down.cpu().contiguous()
            out[f"{name}.lora_up.weight"] = up.cpu().contiguous()
            out[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float32)
            kept = retained(spectrum, rank)
            stats.append(ModuleResize(name, m.rank, rank, alpha, kept.fro, kept.sum, kept.max_ratio))
    return (
        out,
        resized_metadata(metadata, out, old_dim, new_rank, conv_rank, dynamic_method, dynamic_param),
        stats,
    )


def resized_metadata(
    metadata: dict[str, str],
    tensors: dict[str, torch.Tensor],
    old_dim: int,
    new_rank: int,
    conv_rank: int,
    dynamic_method: str | None,
    dynamic_param: float | None,
) -> dict[str, str]:
    """kohya's rewrite: the comment says what was resized, dim/alpha are the new ones (or "Dynamic");
    everything else is kept, except the old sshs hashes (save_lora_file writes new ones)."""
    meta = {k: v for k, v in metadata.items() if not k.startswith("sshs_")}
    comment = meta.get("ss_training_comment", "")
    if comment == "None":  # what kohya writes for no comment
        comment = ""
    ranks = rank_metadata(tensors, dynamic=bool(dynamic_method))
    if dynamic_method:
        what = f"Dynamic resize with {dynamic_method}: {float(dynamic_param)} from {old_dim}"
    else:
        conv_desc = "" if conv_rank == new_rank else f" (conv: {conv_rank})"
        what = f"dimension is resized from {old_dim} to {new_rank}{conv_desc}"
    meta["ss_training_comment"] = f"{what}; {comment}"
    meta["ss_network_dim"] = ranks["ss_network_dim"]
    meta["ss_network_alpha"] = ranks["ss_network_alpha"]
    if "conv_dim" in ranks:
        args = network_args_with_conv(
            meta.get("ss_network_args"), {"conv_dim": ranks["conv_dim"], "conv_alpha": ranks["conv_alpha"]}
        )
        if args is not None:
            meta["ss_network_args"] = args
    return meta


def _to_device(m, device):
    """The module with its tensors on `device` (a module type that is not a dataclass stays put)."""
    import dataclasses

    if not dataclasses.is_dataclass(m):
        return m
    moved = {
        f.name: getattr(m, f.name).to(device)
        for f in dataclasses.fields(m)
        if isinstance(getattr(m, f.name), torch.Tensor)
    }
    return dataclasses.replace(m, **moved)
