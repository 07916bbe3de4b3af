"""The trainable LoRA network: peft LoRA layers on kohya's targets, read and written under kohya's names.

peft's LoRA layer is kohya's `LoRAModule` in all that reaches the file: `lora_A` is kohya's
`lora_down` (a Linear [r,in], or a Conv2d with the original kernel), `lora_B` is `lora_up`
([out,r], or a 1x1 Conv2d), A is kaiming-uniform(a=sqrt 5), B is zero, and the output is
`base(x) + B(A(x)) * alpha / r`.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Mapping
from contextlib import contextmanager

import torch
import torch.nn as nn

from ..errors import ModelError
from .targets import Target, sd1_targets

ADAPTER = "lorakit"


@contextmanager
def _adapters_stay_fp32_on_cpu():
    """peft casts a new adapter to its base layer's dtype and device. The base arrives in the compute
    dtype on the GPU (models/loader.py), and A's random init rounded to bf16 would differ from an fp32
    base's (kohya's); so the adapters stay as made (fp32, CPU) and the trainer moves them with .to()."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    move = BaseTunerLayer._move_adapter_to_device_of_base_layer
    BaseTunerLayer._move_adapter_to_device_of_base_layer = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        BaseTunerLayer._move_adapter_to_device_of_base_layer = move


class LoRANetwork:
    def __init__(
        self,
        unet: nn.Module,
        text_encoder: nn.Module,
        dim: int = 4,
        alpha: float = 1.0,
        conv_dim: int | None = None,
        conv_alpha: float | None = None,
        train_unet: bool = True,
        train_text_encoder: bool = True,
    ):
        """An SD1.x network (one text encoder); any family: LoRANetwork.from_targets."""
        targets = sd1_targets(
            unet if train_unet else None,
            text_encoder if train_text_encoder else None,
            dim,
            alpha,
            conv_dim,
            conv_alpha,
        )
        self._setup({"unet": unet, "te": text_encoder}, targets)

    @classmethod
    def from_targets(cls, roots: Mapping[str, nn.Module], targets: list[Target]) -> LoRANetwork:
        """A network on `targets` (each in roots[target.part]), as a model family lists them."""
        net = cls.__new__(cls)
        net._setup(roots, targets)
        return net

    def _setup(self, roots: Mapping[str, nn.Module], targets: list[Target]) -> None:
        self.roots = dict(roots)
        self.unet, self.text_encoder = self.roots.get("unet"), self.roots.get("te")
        self.targets = list(targets)
        self.by_name = {t.name: t for t in self.targets}
        self._inject()

    def _inject(self) -> None:
        from peft import LoraConfig, inject_adapter_in_model

        for part, model in self.roots.items():
            targets = [t for t in self.targets if t.part == part]
            if not targets:
                continue
            # One config per model; per-module rank/alpha through peft's (regex) patterns.
            base_rank, base_alpha = targets[0].rank, targets[0].alpha
            config = LoraConfig(
                r=base_rank,
                lora_alpha=base_alpha,
                target_modules=[t.path for t in targets],
                rank_pattern={re.escape(t.path): t.rank for t in targets if t.rank != base_rank},
                alpha_pattern={re.escape(t.path): t.alpha for t in targets if t.alpha != base_alpha},
                lora_dropout=0.0,
                init_lora_weights=True,
            )
            with _adapters_stay_fp32_on_cpu():
                inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        self.layers = {t.name: self._root(t).get_submodule(t.path) for t in self.targets}
        for layer in self.layers.values():
            for p in layer.parameters():
                p.requires_grad_(False)
        for p in self.parameters():
            p.requires_grad_(True)

    def _root(self, t: Target) -> nn.Module:
        return self.roots[t.part]

    # --- parameters -----------------------------------------------------------
    def _pairs(
        self, is_te: bool | None = None, part: str | None = None
    ) -> Iterable[tuple[str, nn.Module, nn.Module]]:
        for t in self.targets:
            if (is_te is None or t.is_te == is_te) and (part is None or t.part == part):
                layer = self.layers[t.name]
                yield t.name, layer.lora_A[ADAPTER], layer.lora_B[ADAPTER]

    def parameters(self, is_te: bool | None = None, part: str | None = None) -> list[nn.Parameter]:
        return [p for _, a, b in self._pairs(is_te, part) for p in (a.weight, b.weight)]

    def set_multiplier(self, multiplier: float) -> None:
        """Strength of the whole network (kohya's `multiplier`); 1.0 while training."""
        for t in self.targets:
            self.layers[t.name].scaling[ADAPTER] = multiplier * t.alpha / t.rank

    def to(self, device=None, dtype=None) -> LoRANetwork:
        for p in self.parameters():
            p.data = p.data.to(device=device, dtype=dtype)
        return self

    # --- kohya state dict -------------------------------------------------------
    def kohya_state_dict(self, dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
        """`<name>.lora_down.weight`, `<name>.lora_up.weight`, `<name>.alpha` for every module."""

        from ..transfer import tensors_to_cpu

        def cast(w: torch.Tensor) -> torch.Tensor:
            return w.detach().to(dtype or w.dtype)

        out = {}
        for name, a, b in self._pairs():
            out[f"{name}.lora_down.weight"] = cast(a.weight)
            out[f"{name}.lora_up.weight"] = cast(b.weight)
            out[f"{name}.alpha"] = torch.tensor(float(self.by_name[name].alpha), dtype=dtype or torch.float32)
        return tensors_to_cpu(out)  # one copy from the GPU, not one per tensor; meta (shapes only) kept

    def load_kohya_state_dict(self, sd: dict[str, torch.Tensor], source: str = "network_weights") -> None:
        """Load a kohya file's weights into this network; every key must match in name and shape."""
        check_file_fits(
            self.kohya_state_dict(), sd, source, "the LoRA does not fit this network",
            "Use the same network_dim/conv_dim and train targets (network_train_unet_only / "
            "network_train_text_encoder_only) as the file.", "set network_dim/conv_dim to the file's rank",
        )  # fmt: skip
        for name, a, b in self._pairs():
            for key, mod in ((f"{name}.lora_down.weight", a), (f"{name}.lora_up.weight", b)):
                with torch.no_grad():
                    mod.weight.copy_(sd[key].to(mod.weight.dtype))
            alpha = float(sd[f"{name}.alpha"])
            if (
                alpha != self.by_name[name].alpha
            ):  # kohya keeps the CLI alpha here (a FIXME); we take the file's
                t = self.by_name[name]
                self.by_name[name] = dataclasses.replace(t, alpha=alpha)
                self.targets[self.targets.index(t)] = self.by_name[name]
        self.set_multiplier(1.0)

    @property
    def counts(self) -> tuple[int, int]:
        """(text-encoder modules, UNet modules), as kohya logs them."""
        te = sum(t.is_te for t in self.targets)
        return te, len(self.targets) - te


def check_file_fits(
    own: Mapping[str, torch.Tensor], sd: Mapping[str, torch.Tensor], source: str, what: str, keys_hint: str,
    shape_hint: str,
) -> None:  # fmt: skip
    """A file for network_weights must have exactly the network's keys, each in the network's shape."""
    missing = [k for k in own if k not in sd]
    unexpected = [k for k in sd if k not in own]
    if missing or unexpected:
        raise ModelError(
            f"{source}: {what} ({len(missing)} missing, {len(unexpected)} unexpected keys, "
            f"e.g. {(missing + unexpected)[:3]}). {keys_hint}"
        )
    for key, value in sd.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise ModelError(
                f"{source}: {key} has shape {tuple(value.shape)}, the network has {tuple(own[key].shape)}: "
                f"{shape_hint}"
            )
