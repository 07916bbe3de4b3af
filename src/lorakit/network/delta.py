"""What one module of a kohya LoRA / LyCORIS file does to a weight (and, for some types, its bias).

`lora_modules` groups a file's tensors by module and tells each module's type by its params
(lycoris_delta.py: LoRA/LoCon incl. Tucker `lora_mid`, LoHa, LoKr, (IA)³, full `diff`, norm); any
other set (GLoRA, OFT, a mix) is refused whole. The update at multiplier 1 is ΔW · alpha/rank, rank
as A1111 reads it (lora_down's / hada_w1_b's / lokr_w1_b's or lokr_w2_b's first dimension; LoKr with
both halves full: scale 1). With DoRA (`dora_scale`, on LoRA, LoHa or LoKr), W+ΔW is renormalised
to `dora_scale` along the axis the scale's shape names (LyCORIS `apply_weight_decompose`: per output
row for (out,1,..), LyCORIS >= 3.2's default; per input column for (1,in,..), older files).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ModelError
from . import lycoris_delta as ly

PARAMS = tuple(sorted(ly.ALL_PARAMS))


@dataclass
class ModuleDelta:
    """One module of a file: its kohya name, its type (a key of lycoris_delta.ALGOS: "lora", "loha",
    "lokr", "ia3", "full", "norm") and its tensors by param name ("hada_w1_a", "alpha", ...)."""

    name: str
    kind: str
    tensors: dict[str, torch.Tensor]

    @property
    def label(self) -> str:
        return ly.ALGOS[self.kind].label

    @property
    def rank(self) -> int | None:
        """The rank alpha is divided by; None for types without one ((IA)³, full, norm, full LoKr)."""
        return ly.rank(self.kind, self.tensors)

    @property
    def scale(self) -> float:
        return ly.scale(self.kind, self.tensors)

    @property
    def alpha(self) -> torch.Tensor | None:
        return self.tensors.get("alpha")

    @property
    def dora_scale(self) -> torch.Tensor | None:
        return self.tensors.get("dora_scale")

    @property
    def tucker(self) -> bool:
        return any(p in self.tensors for p in ("lora_mid.weight", "hada_t1", "lokr_t2"))

    # LoRA/LoCon's factors, as ModuleLora had them (None for the other types)
    @property
    def down(self) -> torch.Tensor | None:
        return self.tensors.get("lora_down.weight")

    @property
    def up(self) -> torch.Tensor | None:
        return self.tensors.get("lora_up.weight")

    @property
    def mid(self) -> torch.Tensor | None:
        return self.tensors.get("lora_mid.weight")

    @property
    def bias_delta(self) -> torch.Tensor | None:
        """What the module adds to the layer's bias at multiplier 1 (full `diff_b`, norm `b_norm`)."""
        return ly.raw_bias_delta(self.kind, self.tensors)

    def dora_on_output(self, weight_shape: torch.Size) -> bool:
        """True if dora_scale holds one norm per output row (LyCORIS wd_on_out), else per input column."""
        return self.dora_scale.shape[0] == weight_shape[0] and self.dora_scale.numel() == weight_shape[0]


ModuleLora = ModuleDelta  # the name from when lorakit applied LoRA/LoCon only


def lora_module_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The module names a file's LoRA / LyCORIS tensors belong to."""
    return sorted({k.split(".", 1)[0] for k in tensors if k.partition(".")[2] in ly.ALL_PARAMS})


def _refusal(source: str, name: str, params: set[str]) -> str:
    have = ", ".join(sorted(params))
    unsupported = sorted({label for p, label in ly.UNSUPPORTED.items() if p in params})
    if unsupported:
        why = f"a LyCORIS {'/'.join(unsupported)} module, which lorakit does not apply"
    elif (like := ly.closest_algo(params)) is not None:
        why = f"not exactly the params of one type lorakit applies (it looks most like {like.label})"
    else:
        why = "no type lorakit applies"
    types = "; ".join(f"{a.label}: {', '.join(sorted(a.params - set(ly.SCALED)))}" for a in ly.ALGOS.values())
    return (
        f"LoRA {source}: module {name} has {have}: {why}. lorakit applies {types} (LoRA, LoHa and LoKr "
        "with alpha and dora_scale); the file was not applied"
    )


def lora_modules(tensors: dict[str, torch.Tensor], source: str) -> dict[str, ModuleDelta]:
    """A file's tensors grouped by module, each module's type told by its params; a module whose
    params are no complete set of one type (GLoRA, OFT, a mix, a stray tensor) is an error."""
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, param = key.partition(".")
        grouped.setdefault(name, {})[param] = tensor
    out = {}
    for name, t in sorted(grouped.items()):
        kind = ly.kind_of(set(t))
        if kind is None:
            raise ModelError(_refusal(source, name, set(t)))
        if kind == "lora" and (t["lora_down.weight"].dim() < 2 or t["lora_up.weight"].dim() < 2):
            raise ModelError(
                f"LoRA {source}: module {name}: lora_down/lora_up must be matrices or conv kernels"
            )
        out[name] = ModuleDelta(name, kind, t)
    return out


def _shape(t: torch.Tensor | None) -> tuple:
    return tuple(t.shape) if t is not None else ()


def _lora_problems(m: ModuleDelta, weight_shape: torch.Size) -> list[str]:
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
    return problems


def _factor_problems(m: ModuleDelta, weight_shape: torch.Size) -> list[str]:
    """LoHa, LoKr, full, norm: the ΔW the factors make must have the weight's shape."""
    have = ", ".join(f"{p} {_shape(t)}" for p, t in sorted(m.tensors.items()) if p not in ly.SCALED)
    try:
        natural = ly.natural_shape(m.kind, m.tensors)
    except ly.FactorMismatch as e:
        return [f"{m.label} tensors {have}: {e}"]
    if ly.fits_weight(natural, tuple(weight_shape)):
        return []
    return [f"{m.label} tensors {have} make a ΔW of shape {natural}"]


def check_fits(m: ModuleDelta, weight_shape: torch.Size, source: str) -> None:
    """Raise a clear error unless every tensor of `m` fits a weight of `weight_shape` (the layer's
    bias, for diff_b / b_norm, has one value per output channel)."""
    out, inp = weight_shape[0], weight_shape[1] if len(weight_shape) > 1 else None
    if len(weight_shape) < 2 and m.kind not in ("norm", "full"):
        problems = [f"a {m.label} module on a layer with a 1-D weight {tuple(weight_shape)} (a norm layer)"]
    elif m.kind == "lora":
        problems = _lora_problems(m, weight_shape)
    elif m.kind == "ia3":
        problems = [p for p in [ly.ia3_problem(m.tensors, tuple(weight_shape))] if p]
    else:
        problems = _factor_problems(m, weight_shape)
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
    bias = m.bias_delta
    if bias is not None and tuple(bias.shape) != (out,):
        problems.append(f"{'diff_b' if m.kind == 'full' else 'b_norm'} {_shape(bias)} (expected ({out},))")
    if problems:
        raise ModelError(
            f"LoRA {source}: module {m.name} does not fit this base model's weight {tuple(weight_shape)}: "
            f"{'; '.join(problems)}. The file was made for another base model (SD2? SDXL?) and was not applied"
        )


def lora_delta(m: ModuleDelta, weight_shape: torch.Size, base: torch.Tensor | None = None) -> torch.Tensor:
    """ΔW at multiplier 1 (alpha/rank included), float32, shaped like the weight; before DoRA's
    renormalisation. (IA)³ scales the base weight, so it needs `base` (ModelError without it)."""
    if m.kind == "ia3" and base is None:
        raise ModelError(
            f"module {m.name} is (IA)³: its ΔW scales the base weight, which is needed to compute it"
        )
    return ly.raw_delta(m.kind, m.tensors, base).reshape(weight_shape) * m.scale


def _norm(w: torch.Tensor, on_output: bool) -> torch.Tensor:
    """L2 norm of each output row (on_output) or each input column of `w`, broadcastable against it."""
    dims = [d for d in range(w.dim()) if d != (0 if on_output else 1)]
    return torch.linalg.vector_norm(w, dim=dims, keepdim=True) + torch.finfo(w.dtype).eps


def module_update(m: ModuleDelta, base: torch.Tensor, multiplier: float) -> torch.Tensor:
    """What to add (float32) to the base weight `base` to apply `m` at `multiplier`.

    multiplier·ΔW ((IA)³: multiplier·w·W, as LyCORIS merges W·(1 + multiplier·w)). DoRA:
    W_d = (W+ΔW)·dora_scale/‖W+ΔW‖ (LyCORIS), added as multiplier·(W_d − W), which is how A1111 and
    ComfyUI scale a DoRA module (0 = off, 1 = LyCORIS's merged weight), so several LoRAs on one
    module each work against the base as in A1111."""
    delta = lora_delta(m, base.shape, base).to(base.device)
    if m.dora_scale is None:
        return multiplier * delta
    w = base.float()
    merged = w + delta
    on_output = m.dora_on_output(base.shape)
    dora = m.dora_scale.float().to(base.device).reshape(_norm(merged, on_output).shape)
    decomposed = merged * (dora / _norm(merged, on_output))
    return multiplier * (decomposed - w)


def bias_update(m: ModuleDelta, multiplier: float) -> torch.Tensor | None:
    """What to add (float32) to the layer's bias at `multiplier` (full diff_b, norm b_norm), or None."""
    bias = m.bias_delta
    return None if bias is None else multiplier * bias
