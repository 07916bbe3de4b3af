"""Merge kohya LoRA / LyCORIS files into a UNet and its text encoders (see delta.py for the maths).

Merged, a LoRA costs nothing at generation time. LoraMerger keeps the original weights (and biases) of every
touched module, so switching or removing LoRAs restores the base bit for bit. It is all or nothing:
every file is checked against the model (each module exists, each shape fits) before a weight is
touched, and if applying still fails the base weights are restored before the error is raised, so
a generator that lives on (the GUI's) never draws with a half-applied LoRA.

Where the work happens: each module's ΔW is computed on the device its weight lives on (the file's
small factors are moved there, so a CUDA model merges on the GPU, in float32 with TF32 off) and added
in place. The backups stay beside the weights when the GPU has room for them, else on the CPU
(`backup_device`, rule in `_backups_on_host`); restoring copies them back bit for bit either way.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from ..errors import ModelError
from .delta import ModuleDelta, bias_update, check_fits, lora_module_names, lora_modules, module_update
from .targets import is_te_module


class LoraMerger:
    """Applies a set of (label, tensors, te_multiplier, unet_multiplier) to a UNet and text encoders.

    The names a file may use come from the model family (ModelFamily.module_map / name_aliases), so
    a LoRA made for another family names modules this base lacks and is refused whole."""

    BACKUP_DEVICES = ("auto", "device", "cpu")
    # "auto" keeps backups on the GPU only if this much stays free after them (for the activations
    # of drawing): 2 GiB, or 20% of the card when that is more
    RESERVE_BYTES, RESERVE_FRACTION = 2 * 2**30, 0.2

    def __init__(self, unet: nn.Module | None, text_encoder: nn.Module | None, backup_device: str = "auto"):
        """An SD1.x UNet and text encoder (either may be None: left alone); any family: for_base.
        backup_device: where the original weights are kept while a LoRA is merged: "device" (beside
        the weights: the fastest restore), "cpu" (no GPU memory: for small cards) or "auto"."""
        from ..models.families.sd1 import SD1

        self._bind(SD1, unet, (text_encoder,), backup_device)

    @classmethod
    def for_base(cls, base, backup_device: str = "auto") -> LoraMerger:
        """A merger for a loaded BaseModel of any family (its UNet and all its text encoders)."""
        merger = cls.__new__(cls)
        merger._bind(base.spec, base.unet, tuple(base.text_encoders), backup_device)
        return merger

    def _bind(
        self, family, unet: nn.Module | None, text_encoders: tuple, backup_device: str = "auto"
    ) -> None:
        if backup_device not in self.BACKUP_DEVICES:
            raise ValueError(f"backup_device {backup_device!r}: use one of {', '.join(self.BACKUP_DEVICES)}")
        self.backup_device = backup_device
        self._host_backups = False  # where this apply's backups go (decided per apply)
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

    def _keep(self, t: torch.Tensor) -> torch.Tensor:
        """A backup of `t`: a copy beside it, or on the CPU when this apply keeps backups there."""
        if self._host_backups and t.device.type != "cpu":
            return t.detach().to("cpu", copy=True)
        return t.detach().clone()

    def _backups_on_host(self, checked) -> bool:
        """Where this apply keeps its backups: "cpu"/"device" as told; "auto": beside the weights,
        unless they are on a CUDA card where keeping a copy of every weight the LoRAs touch would leave
        less than RESERVE_BYTES (or RESERVE_FRACTION of the card, if more) free for drawing."""
        if self.backup_device != "auto":
            return self.backup_device == "cpu"
        layers = {
            name: self.layer(name)
            for _, modules, te, unet in checked
            for name in modules
            if (te if is_te_module(name) else unet) != 0
        }
        by_device: dict[torch.device, int] = {}
        for layer in layers.values():
            for t in (layer.weight, getattr(layer, "bias", None)):
                if t is not None and t.device.type == "cuda":
                    by_device[t.device] = by_device.get(t.device, 0) + t.numel() * t.element_size()
        for device, need in by_device.items():
            free, total = torch.cuda.mem_get_info(device)
            # memory torch's allocator holds but does not use (the backups restore() just dropped) is free too
            free += torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
            if free - need < max(self.RESERVE_BYTES, self.RESERVE_FRACTION * total):
                return True
        return False

    @torch.no_grad()
    def _merge(self, modules: dict[str, ModuleDelta], te_mult: float, unet_mult: float) -> None:
        for name, m in modules.items():
            mult = te_mult if is_te_module(name) else unet_mult
            if mult == 0:
                continue
            weight = self.layer(name).weight
            if name not in self.backup:
                self.backup[name] = self._keep(weight)
            m = _on_device(m, weight.device)  # ΔW is computed where the weight lives
            base = self.backup[name]
            if base.device != weight.device:  # a backup on the CPU: only (IA)³ and DoRA need its values
                base = base.to(weight.device) if (m.kind == "ia3" or m.dora_scale is not None) else weight
            update = module_update(m, base, mult)  # each LoRA works against the base
            bias_change = bias_update(m, mult)
            weight.copy_((weight.float() + update).to(weight.dtype))
            if bias_change is not None:
                bias = self.layer(name).bias
                if name not in self.bias_backup:
                    self.bias_backup[name] = self._keep(bias)
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
            self._host_backups = self._backups_on_host(checked)
            with _full_fp32_matmuls():
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


def _on_device(m: ModuleDelta, device: torch.device) -> ModuleDelta:
    """`m` with its tensors on `device` (alpha stays on the host: reading it there never waits for the
    GPU)."""
    if all(t.device == device for k, t in m.tensors.items() if k != "alpha"):
        return m
    moved = {k: t if k == "alpha" else t.to(device, non_blocking=True) for k, t in m.tensors.items()}
    return ModuleDelta(m.name, m.kind, moved)


@contextlib.contextmanager
def _full_fp32_matmuls():
    """float32 matmuls in full precision while merging (no TF32 on CUDA), so ΔW on the GPU is the
    float32 product the CPU computes, up to summation order."""
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


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
