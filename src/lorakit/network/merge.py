"""Merge kohya-format LoRAs into a UNet and text encoder: W += m * (up @ down) * alpha / rank.

Merged, a LoRA costs nothing at generation time. LoraMerger keeps the original weights of every
touched module, so switching or removing LoRAs restores the base bit for bit. Every module
named in a file must exist in the model, or nothing is changed.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ModelError
from .targets import TE_CHILDREN, TE_PREFIX, UNET_PREFIX, te_layers


def kohya_module_map(unet: nn.Module | None, text_encoder: nn.Module | None) -> dict[str, nn.Module]:
    """kohya name -> Linear/Conv2d for every module a kohya SD1 LoRA may target."""
    out: dict[str, nn.Module] = {}
    if unet is not None:
        for path, mod in unet.named_modules():
            if isinstance(mod, nn.Linear | nn.Conv2d):
                out[f"{UNET_PREFIX}_{path.replace('.', '_')}"] = mod
    if text_encoder is not None:
        _, layers = te_layers(text_encoder)
        for i, layer in enumerate(layers):
            for child in TE_CHILDREN:
                out[f"{TE_PREFIX}_text_model_encoder_layers_{i}_{child.replace('.', '_')}"] = (
                    layer.get_submodule(child)
                )
    return out


def lora_module_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted({k.split(".", 1)[0] for k in tensors if k.endswith(".lora_down.weight")})


def lora_delta(
    down: torch.Tensor, up: torch.Tensor, alpha: torch.Tensor | None, weight: nn.Parameter
) -> torch.Tensor:
    """The weight update of one module at multiplier 1, shaped like `weight`."""
    rank = down.shape[0]
    scale = (float(alpha) if alpha is not None else rank) / rank
    down, up = down.float(), up.float()
    if down.dim() == 2:  # Linear
        delta = up @ down
    elif down.shape[2:] == (1, 1):  # 1x1 conv
        delta = (up.flatten(1) @ down.flatten(1)).unsqueeze(-1).unsqueeze(-1)
    else:  # 3x3 conv (LoCon): compose the 3x3 down with the 1x1 up
        delta = torch.nn.functional.conv2d(down.permute(1, 0, 2, 3), up).permute(1, 0, 2, 3)
    return (delta * scale).reshape(weight.shape)


class LoraMerger:
    """Applies a set of (tensors, te_multiplier, unet_multiplier) to a UNet and text encoder."""

    def __init__(self, unet: nn.Module | None, text_encoder: nn.Module | None):
        self.modules = kohya_module_map(unet, text_encoder)
        self.backup: dict[str, torch.Tensor] = {}
        self.applied: list[tuple[str, float, float]] = []

    def restore(self) -> None:
        with torch.no_grad():
            for name, weight in self.backup.items():
                self.modules[name].weight.copy_(weight)
        self.backup.clear()
        self.applied = []

    def apply(self, loras: list[tuple[str, dict[str, torch.Tensor], float, float]]) -> None:
        """Restore the base, then merge each (label, tensors, te_mult, unet_mult); all or nothing."""
        key = [(label, te, unet) for label, _, te, unet in loras]
        if key == self.applied:
            return
        self.restore()
        for label, tensors, _, _ in loras:  # check every file before touching any weight
            names = lora_module_names(tensors)
            unknown = sorted(n for n in names if n not in self.modules)
            if unknown:
                raise ModelError(
                    f"LoRA {label!r}: {len(unknown)} of {len(names)} modules do not exist in this base model "
                    f"(e.g. {unknown[0]}): it was made for another architecture (SDXL? SD2?) and was not applied"
                )
        with torch.no_grad():
            for _label, tensors, te_mult, unet_mult in loras:
                for name in lora_module_names(tensors):
                    mod = self.modules[name]
                    mult = te_mult if name.startswith(TE_PREFIX + "_") else unet_mult
                    if mult == 0:
                        continue
                    if name not in self.backup:
                        self.backup[name] = mod.weight.detach().clone()
                    delta = lora_delta(
                        tensors[f"{name}.lora_down.weight"],
                        tensors[f"{name}.lora_up.weight"],
                        tensors.get(f"{name}.alpha"),
                        mod.weight,
                    ).to(mod.weight.device)
                    mod.weight.copy_((mod.weight.float() + mult * delta).to(mod.weight.dtype))
        self.applied = key


def merge_lora(
    unet: nn.Module | None,
    text_encoder: nn.Module | None,
    tensors: dict[str, torch.Tensor],
    te_multiplier: float = 1.0,
    unet_multiplier: float = 1.0,
    source: str = "LoRA",
) -> int:
    """Add one LoRA into the weights in place, for good; returns the number of modules it names."""
    merger = LoraMerger(unet, text_encoder)
    merger.apply([(source, tensors, te_multiplier, unet_multiplier)])
    return len(lora_module_names(tensors))
