"""Merge kohya LoRA / LyCORIS files into a UNet and its text encoders (see delta.py for the maths).

Merged, a LoRA costs nothing at generation time. LoraMerger keeps the original weights (and biases) of every
touched module, so switching or removing LoRAs restores the base bit for bit. It is all or nothing:
every file is checked against the model (each module exists, each shape fits) before a weight is
touched, and if applying still fails the base weights are restored before the error is raised, so
a generator that lives on (the GUI's) never draws with a half-applied LoRA.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from ..errors import ModelError
from .delta import ModuleDelta, bias_update, check_fits, lora_module_names, lora_modules, module_update
from .targets import is_te_module


class LoraMerger:
    """Applies a set of (label, tensors, te_multiplier, unet_multiplier) to a UNet and text encoders.

    The names a file may use come from the model family (ModelFamily.module_map / name_aliases), so
    a LoRA made for another family names modules this base lacks and is refused whole."""

    def __init__(self, unet: nn.Module | None, text_encoder: nn.Module | None):
        """An SD1.x UNet and text encoder (either may be None: left alone); any family: for_base."""
        from ..models.families.sd1 import SD1

        self._bind(SD1, unet, (text_encoder,))

    @classmethod
    def for_base(cls, base) -> LoraMerger:
        """A merger for a loaded BaseModel of any family (its UNet and all its text encoders)."""
        merger = cls.__new__(cls)
        merger._bind(base.spec, base.unet, tuple(base.text_encoders))
        return merger

    def _bind(self, family, unet: nn.Module | None, text_encoders: tuple) -> None:
        self.family = family
        self.modules = family.module_map(unet, text_encoders)
        # GroupNorm / LayerNorm, kept apart from the Linear/Conv2d map: LyCORIS `train_norm` files adapt them
        self.norms = family.norm_module_map(unet, text_encoders)
        self.aliases = family.name_aliases(unet) if unet is not None else {}
        self.backup: dict[str, torch.Tensor] = {}  # module name -> its weight as loaded
        self.bias_backup: dict[str, torch.Tensor] = {}  # module name -> its bias (full diff_b, norm b_norm)
        self.applied: list[tuple[str, float, float]] = []

    def restore(self) -> None:
        with torch.no_grad():
            for name, weight in self.backup.items():
                self.layer(name).weight.copy_(weight)
            for name, bias in self.bias_backup.items():
                self.layer(name).bias.copy_(bias)
        self.backup.clear()
        self.bias_backup.clear()
        self.applied = []

    def layer(self, name: str) -> nn.Module:
        """The Linear/Conv2d or norm layer a (resolved) kohya name names."""
        return self.modules[name] if name in self.modules else self.norms[name]

    def resolve(self, label: str, tensors: dict[str, torch.Tensor]) -> dict[str, ModuleDelta]:
        """The file's modules under our kohya names, each checked against the model's weight."""
        found = lora_modules(tensors, label)
        unknown = sorted(
            n for n in found if n not in self.modules and n not in self.norms and n not in self.aliases
        )
        if unknown:
            raise ModelError(
                f"LoRA {label!r}: {len(unknown)} of {len(found)} modules do not exist in this base model "
                f"(e.g. {unknown[0]}): it was made for another architecture than this "
                f"{self.family.name} base (SD1.x / SD2.x / SDXL?) and was not applied"
            )
        out: dict[str, ModuleDelta] = {}
        for name, m in found.items():
            ours = self.aliases.get(name, name)
            if ours in out:
                raise ModelError(f"LoRA {label!r}: {name} and {out[ours].name} name the same module {ours}")
            check_fits(m, self.layer(ours).weight.shape, repr(label))
            if m.bias_delta is not None and getattr(self.layer(ours), "bias", None) is None:
                raise ModelError(
                    f"LoRA {label!r}: module {name} changes a bias, but this base model's {ours} has none: "
                    "the file was made for another base model and was not applied"
                )
            out[ours] = m
        return out

    @torch.no_grad()
    def _merge(self, modules: dict[str, ModuleDelta], te_mult: float, unet_mult: float) -> None:
        for name, m in modules.items():
            mult = te_mult if is_te_module(name) else unet_mult
            if mult == 0:
                continue
            weight = self.layer(name).weight
            if name not in self.backup:
                self.backup[name] = weight.detach().clone()
            update = module_update(m, self.backup[name], mult)  # each LoRA works against the base
            bias_change = bias_update(m, mult)
            weight.copy_((weight.float() + update).to(weight.dtype))
            if bias_change is not None:
                bias = self.layer(name).bias
                if name not in self.bias_backup:
                    self.bias_backup[name] = bias.detach().clone()
                bias.copy_((bias.float() + bias_change.to(bias.device)).to(bias.dtype))

    def apply(self, loras: list[tuple[str, dict[str, torch.Tensor], float, float]]) -> None:
        """Restore the base, then merge each (label, tensors, te_mult, unet_mult); all or nothing."""
        key = [(label, te, unet) for label, _, te, unet in loras]
        if key == self.applied:
            return
        self.restore()
        checked = [(label, self.resolve(label, t), te, unet) for label, t, te, unet in loras]
        failed = None
        try:
            for label, modules, te_mult, unet_mult in checked:
                failed = label
                self._merge(modules, te_mult, unet_mult)
        except Exception as e:
            self.restore()
            raise ModelError(
                f"LoRA {failed!r} could not be applied ({type(e).__name__}: {e}); "
                "the base model's weights were restored"
            ) from e
        except BaseException:  # Ctrl-C mid-merge: leave the base intact all the same
            self.restore()
            raise
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


def merge_lora_into_base(
    base,
    tensors: dict[str, torch.Tensor],
    te_multiplier: float = 1.0,
    unet_multiplier: float = 1.0,
    source: str = "LoRA",
) -> int:
    """merge_lora for a loaded BaseModel of any family (SD1, SDXL); returns the modules it names."""
    LoraMerger.for_base(base).apply([(source, tensors, te_multiplier, unet_multiplier)])
    return len(lora_module_names(tensors))
