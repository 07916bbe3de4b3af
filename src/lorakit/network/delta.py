"""What one module of a kohya LoRA / LyCORIS LoCon file does to a weight.

A module is `<name>.lora_down.weight`, `<name>.lora_up.weight`, optionally `<name>.lora_mid.weight`
(LyCORIS Tucker conv: 1x1 down, kxk mid, 1x1 up), `<name>.alpha` and `<name>.dora_scale` (DoRA).
The update at multiplier 1 is ΔW = up·[mid]·down · alpha/rank (rank = lora_down's first dimension,
as A1111 and LyCORIS take it). With DoRA, W+ΔW is renormalised to `dora_scale` along the axis the
scale's shape names (LyCORIS `apply_weight_decompose`: per output row for (out,1,..), LyCORIS >= 3.2's
default; per input column for (1,in,..), older files).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ModelError

PARAMS = ("lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale")


@dataclass
class ModuleLora:
    name: str
    down: torch.Tensor
    up: torch.Tensor
    mid: torch.Tensor | None = None
    alpha: torch.Tensor | None = None
    dora_scale: torch.Tensor | None = None

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def scale(self) -> float:
        return (float(self.alpha) if self.alpha is not None else self.rank) / self.rank

    def dora_on_output(self, weight_shape: torch.Size) -> bool:
        """True if dora_scale holds one norm per output row (LyCORIS wd_on_out), else per input column."""
        return self.dora_scale.shape[0] == weight_shape[0] and self.dora_scale.numel() == weight_shape[0]


def lora_module_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The module names a file's LoRA tensors belong to (those with a `lora_down`)."""
    return sorted({k.split(".", 1)[0] for k in tensors if k.endswith(".lora_down.weight")})


def lora_modules(tensors: dict[str, torch.Tensor], source: str) -> dict[str, ModuleLora]:
    """A file's tensors grouped by module; any tensor that is not one lorakit applies is an error."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, param = key.partition(".")
        if param not in PARAMS:
            raise ModelError(
                f"LoRA {source}: tensor {key!r} is not part of a LoRA/LoCon module (lorakit applies "
                f"{', '.join(PARAMS)}; LoHa, LoKr, OFT and other LyCORIS types are not supported)"
            )
        grouped.setdefault(name, {})[param] = tensor
    out = {}
    for name, t in sorted(grouped.items()):
        if "lora_down.weight" not in t or "lora_up.weight" not in t:
            have = ", ".join(sorted(t))
            raise ModelError(f"LoRA {source}: module {name} has {have} but needs lora_down and lora_up")
        if t["lora_down.weight"].dim() < 2 or t["lora_up.weight"].dim() < 2:
            raise ModelError(
                f"LoRA {source}: module {name}: lora_down/lora_up must be matrices or conv kernels"
            )
        out[name] = ModuleLora(
            name, t["lora_down.weight"], t["lora_up.weight"], t.get("lora_mid.weight"), t.get("alpha"),
            t.get("dora_scale"),
        )  # fmt: skip
    return out


def _shape(t: torch.Tensor | None) -> tuple:
    return tuple(t.shape) if t is not None else ()


def check_fits(m: ModuleLora, weight_shape: torch.Size, source: str) -> None:
    """Raise a clear error unless every tensor of `m` fits a weight of `weight_shape`."""
    out, inp, kernel = weight_shape[0], weight_shape[1], tuple(weight_shape[2:])
    r = m.rank
    pointwise = ((), (1, 1))  # kohya squeezes 1x1 convs to Linear shapes and back: both fit

    def fits(t: torch.Tensor, head: tuple, tails: tuple) -> bool:
        return tuple(t.shape[:2]) == head and tuple(t.shape[2:]) in tails

    problems = []
    if not fits(m.up, (out, r), pointwise):
        problems.append(f"lora_up {_shape(m.up)} (expected ({out}, {r}{', 1, 1' if kernel else ''}))")
    if m.mid is None:
        if not fits(m.down, (r, inp), pointwise if kernel in pointwise else (kernel,)):
            problems.append(
                f"lora_down {_shape(m.down)} (expected ({r}, {inp}{''.join(f', {k}' for k in kernel)}))"
            )
    elif kernel in pointwise:
        problems.append(f"lora_mid {_shape(m.mid)} on a module without a spatial kernel")
    elif not fits(m.down, (r, inp), ((1, 1),)) or tuple(m.mid.shape) != (r, r, *kernel):
        problems.append(
            f"Tucker lora_down {_shape(m.down)} / lora_mid {_shape(m.mid)} (expected ({r}, {inp}, 1, 1) / "
            f"({r}, {r}, {', '.join(map(str, kernel))}))"
        )
    if m.alpha is not None and m.alpha.numel() != 1:
        problems.append(f"alpha {_shape(m.alpha)} (expected a scalar)")
    if m.dora_scale is not None:
        n = m.dora_scale.numel()
        on_output = m.dora_on_output(weight_shape)
        on_input = m.dora_scale.dim() >= 2 and m.dora_scale.shape[:2] == (1, inp) and n == inp
        if not (on_output or on_input):
            problems.append(
                f"dora_scale {_shape(m.dora_scale)} (expected ({out}, 1, ...) or (1, {inp}, ...))"
            )
    if problems:
        raise ModelError(
            f"LoRA {source}: module {m.name} does not fit this base model's weight {tuple(weight_shape)}: "
            f"{'; '.join(problems)}. The file was made for another base model (SD2? SDXL?) and was not applied"
        )


def lora_delta(m: ModuleLora, weight_shape: torch.Size) -> torch.Tensor:
    """ΔW at multiplier 1 (alpha/rank included), float32, shaped like the weight."""
    up = m.up.float().reshape(m.up.shape[0], -1)  # (out, r)
    down = m.down.float().reshape(m.rank, -1)  # (r, in) or (r, in*k*k) for a plain LoCon conv
    if m.mid is not None:  # Tucker: ΔW[o, i, ...] = Σ up[o, a] mid[a, b, ...] down[b, i]
        delta = torch.einsum("a b ..., o a, b i -> o i ...", m.mid.float(), up, down)
    else:
        delta = up @ down
    return delta.reshape(weight_shape) * m.scale


def _norm(w: torch.Tensor, on_output: bool) -> torch.Tensor:
    """L2 norm of each output row (on_output) or each input column of `w`, broadcastable against it."""
    dims = [d for d in range(w.dim()) if d != (0 if on_output else 1)]
    return torch.linalg.vector_norm(w, dim=dims, keepdim=True) + torch.finfo(w.dtype).eps


def module_update(m: ModuleLora, base: torch.Tensor, multiplier: float) -> torch.Tensor:
    """What to add (float32) to the base weight `base` to apply `m` at `multiplier`.

    Plain LoRA: multiplier·ΔW. DoRA: W_d = (W+ΔW)·dora_scale/‖W+ΔW‖ (LyCORIS), added as
    multiplier·(W_d − W), which is how A1111 and ComfyUI scale a DoRA module (0 = off, 1 = LyCORIS's
    merged weight), so several LoRAs on one module each work against the base as in A1111."""
    delta = lora_delta(m, base.shape).to(base.device)
    if m.dora_scale is None:
        return multiplier * delta
    w = base.float()
    merged = w + delta
    on_output = m.dora_on_output(base.shape)
    dora = m.dora_scale.float().to(base.device).reshape(_norm(merged, on_output).shape)
    decomposed = merged * (dora / _norm(merged, on_output))
    return multiplier * (decomposed - w)
