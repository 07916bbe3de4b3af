"""Low-rank factorisation of a weight update ΔW, shared by resize, extract and merge.

A factorisation of ΔW (Linear (out, in); a conv's (out, in, kh, kw) flattened to (out, in·kh·kw),
as kohya does) at rank r is up = U·S (out, r) and down = Vh (r, in·kh·kw): the best rank-r
approximation (Eckart–Young). The rank is fixed, or chosen per module by kohya's dynamic rules
(resize_lora.py): sv_ratio, sv_cumulative, sv_fro, never above the requested rank.

When ΔW is given as a product up·down of rank r (a LoRA), the SVD is taken of an r×r core (two QR
decompositions), not of the full matrix: the same singular values and vectors, in a fraction of
the time, so resizing every module of an SDXL LoRA takes seconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ModelError

CLAMP_QUANTILE = 0.99  # kohya's extract / svd_merge clamp; resize does not clamp
MIN_SV = 1e-6  # kohya: a module whose largest singular value is below this is all zero -> rank 1
DYNAMIC_METHODS = ("sv_ratio", "sv_fro", "sv_cumulative")


@dataclass
class Spectrum:
    """A thin SVD of ΔW (2-D): U (out, k), S (k,), Vh (k, in). `full` = min(out, in), the length
    of the whole spectrum; S may hold fewer values (a product of rank r < full: the rest are 0)."""

    U: torch.Tensor
    S: torch.Tensor
    Vh: torch.Tensor
    full: int

    @property
    def singular_values(self) -> torch.Tensor:
        """All `full` singular values, the zeros a low-rank product lacks included."""
        return torch.cat([self.S, self.S.new_zeros(self.full - len(self.S))])


def matrix_spectrum(matrix: torch.Tensor) -> Spectrum:
    """Thin SVD of a 2-D ΔW, in float32."""
    U, S, Vh = torch.linalg.svd(matrix.float(), full_matrices=False)
    return Spectrum(U, S, Vh, min(matrix.shape))


def product_spectrum(up: torch.Tensor, down: torch.Tensor) -> Spectrum:
    """Thin SVD of up (out, r) · down (r, in) without forming it: up = Qu·Ru, downᵀ = Qd·Rd, so
    up·down = Qu·(Ru·Rdᵀ)·Qdᵀ, and the SVD of the small core Ru·Rdᵀ gives that of the product."""
    up, down = up.float(), down.float()
    Qu, Ru = torch.linalg.qr(up)
    Qd, Rd = torch.linalg.qr(down.T)
    Uc, S, Vhc = torch.linalg.svd(Ru @ Rd.T, full_matrices=False)
    return Spectrum(Qu @ Uc, S, Vhc @ Qd.T, min(up.shape[0], down.shape[1]))


def dynamic_rank(S: torch.Tensor, method: str, param: float) -> int:
    """The rank kohya's dynamic rule keeps for singular values S (descending, the whole spectrum):

    sv_ratio: the values above S₀/param; sv_cumulative: the fewest whose sum reaches param (0-1) of
    ΣS; sv_fro: the fewest whose Frobenius norm reaches param (0-1) of ‖ΔW‖. At least 1. (kohya
    before PR #2194 kept one more than these rules say; its fixed version, and lorakit, do not.)"""
    if method not in DYNAMIC_METHODS:
        raise ModelError(f"dynamic_method {method!r}: use one of {', '.join(DYNAMIC_METHODS)}")
    S = S.double()  # sums of many values: float64 so a param of exactly 1.0 reaches the end
    if method == "sv_ratio":
        k = int((S > S[0] / param).sum())
    else:
        values = S if method == "sv_cumulative" else S.pow(2)
        target = param if method == "sv_cumulative" else param**2
        fraction = torch.cumsum(values, 0) / values.sum()
        k = int(torch.searchsorted(fraction, torch.tensor(target, dtype=fraction.dtype) - 1e-12)) + 1
    return max(1, min(k, len(S)))


def choose_rank(
    spectrum: Spectrum, max_rank: int, dynamic_method: str | None = None, dynamic_param: float | None = None
) -> int:
    """The rank to keep: `max_rank`, or the dynamic rule's capped at `max_rank`; never above the
    spectrum's length; 1 for an all-zero ΔW (kohya)."""
    S = spectrum.singular_values
    if len(S) == 0 or float(S[0]) <= MIN_SV:
        return 1
    rank = dynamic_rank(S, dynamic_method, dynamic_param) if dynamic_method else max_rank
    return max(1, min(rank, max_rank, spectrum.full))


@dataclass
class Retained:
    """How much of ΔW a rank keeps (what kohya's resize --verbose prints)."""

    fro: float  # Frobenius norm kept / whole (0-1)
    sum: float  # ΣS kept / ΣS
    max_ratio: float  # S₀ / S_{rank-1}: how far down the spectrum the cut falls


def retained(spectrum: Spectrum, rank: int) -> Retained:
    S = spectrum.singular_values.double()
    total_fro, total_sum = float(S.pow(2).sum().sqrt()), float(S.sum())
    if total_sum == 0:
        return Retained(1.0, 1.0, 1.0)  # nothing to keep: nothing lost
    kept = S[:rank]
    last = float(kept[-1])
    return Retained(
        float(kept.pow(2).sum().sqrt()) / total_fro,
        float(kept.sum()) / total_sum,
        float(S[0]) / last if last > 0 else float("inf"),
    )


def truncate(spectrum: Spectrum, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(up = U·S, down = Vh) at `rank`, 2-D. Past the computed values (a product of lower rank asked
    for more) the factors are padded with zeros: the same ΔW, at the rank asked for."""
    k = min(rank, len(spectrum.S))
    up = spectrum.U[:, :k] * spectrum.S[:k]
    down = spectrum.Vh[:k]
    if k < rank:
        up = torch.cat([up, up.new_zeros(up.shape[0], rank - k)], 1)
        down = torch.cat([down, down.new_zeros(rank - k, down.shape[1])], 0)
    return up, down


def quantile(values: torch.Tensor, q: float) -> torch.Tensor:
    """torch.quantile (linear interpolation) without its limit of 16M elements."""
    s = values.flatten().sort().values
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def clamp_factors(
    up: torch.Tensor, down: torch.Tensor, clamp_quantile: float | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """kohya's extract / svd_merge outlier clamp: both factors to ±(the `clamp_quantile` quantile of
    their values together). None or >= 1: no clamp."""
    if clamp_quantile is None or clamp_quantile >= 1:
        return up, down
    hi = quantile(torch.cat([up.flatten(), down.flatten()]), clamp_quantile)
    return up.clamp(-hi, hi), down.clamp(-hi, hi)


def shape_factors(
    up: torch.Tensor, down: torch.Tensor, weight_shape: tuple[int, ...] | torch.Size
) -> tuple[torch.Tensor, torch.Tensor]:
    """2-D factors as kohya stores them for a weight of `weight_shape`: Linear up (out, r), down
    (r, in); conv up (out, r, 1, 1), down (r, in, kh, kw)."""
    rank = down.shape[0]
    if len(weight_shape) == 4:
        return up.reshape(weight_shape[0], rank, 1, 1), down.reshape(rank, *weight_shape[1:])
    return up.reshape(weight_shape[0], rank), down.reshape(rank, weight_shape[1])


def is_spatial_conv(weight_shape) -> bool:
    """A conv with a kernel larger than 1x1: kohya's conv_dim / new_conv_rank apply to these."""
    return len(weight_shape) == 4 and tuple(weight_shape[2:]) != (1, 1)


# --------------------------------------------------------------------------- LoRA modules
# Written against delta.lora_modules / lora_delta, so a module of any format those read gives its ΔW;
# a plain LoRA / LoCon (up·[mid]·down) takes the fast product path.


def module_scale(m) -> float:
    """alpha / rank (1 without an alpha), as lora_delta applies it."""
    scale = getattr(m, "scale", None)
    if scale is not None:
        return float(scale)
    return float(m.alpha) / m.rank if m.alpha is not None else 1.0


def module_weight_shape(m) -> torch.Size:
    """The shape of the weight a module adapts, read off its own tensors (no base model needed)."""
    shape = getattr(m, "weight_shape", None)  # a format whose factors do not show it may carry it
    if shape is not None:
        return torch.Size(shape)
    kind = getattr(m, "kind", "lora")
    if kind != "lora":
        from . import lycoris_delta as ly

        natural = ly.natural_shape(kind, m.tensors)
        if len(natural) == 2 and m.name.startswith("lora_unet_"):
            # a LoHa / LoKr conv may store its factors flat, (out, in·kh·kw): the kernel comes from the
            # real SD1.5 / SDXL UNet that has a module of this name
            real = real_unet_shape(m.name)
            if real is not None and ly.fits_weight(natural, real):
                return torch.Size(real)
            if real is not None and len(real) == 4 and natural[1] % (real[2] * real[3]) == 0:
                # another UNet config (sizes differ): the layer kind, and so its kernel, is the same
                kh, kw = real[2], real[3]
                return torch.Size((natural[0], natural[1] // (kh * kw), kh, kw))
        return torch.Size(natural)
    out, inp = m.up.shape[0], m.down.shape[1]
    if m.mid is not None:
        return torch.Size((out, inp, *m.mid.shape[2:]))
    if m.down.dim() == 4:
        return torch.Size((out, inp, *m.down.shape[2:]))
    return torch.Size((out, inp))


def real_unet_shape(name: str) -> tuple[int, ...] | None:
    """The weight shape of the UNet module kohya-named `name` in the real SD1.5 or SDXL UNet (names
    differ between the two families), or None."""
    from .naming import unet_names

    for family in ("sd1", "sdxl"):
        table = unet_names(family)
        ours = table.aliases.get(name, name)
        if ours in table.shapes:
            return table.shapes[ours]
    return None


def plain_factors(m, weight_shape) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(up (out, r), down (r, in·kh·kw)) with up·down = ΔW / scale, for a LoRA / LoCon module (a
    Tucker mid folded into down, exactly); None for a module of another kind (LoHa, LoKr, ...)."""
    if getattr(m, "kind", "lora") != "lora":
        return None
    up, down = getattr(m, "up", None), getattr(m, "down", None)
    if not isinstance(up, torch.Tensor) or not isinstance(down, torch.Tensor):
        return None
    rank = down.shape[0]
    up2 = up.float().reshape(up.shape[0], -1)
    down2 = down.float().reshape(rank, -1)
    if getattr(m, "mid", None) is not None:  # ΔW[o, i, h, w] = Σ up[o, a] mid[a, b, h, w] down[b, i]
        down2 = torch.einsum("a b h w, b i -> a i h w", m.mid.float(), down2).reshape(rank, -1)
    out, flat = weight_shape[0], int(torch.Size(weight_shape[1:]).numel())
    if up2.shape != (out, rank) or down2.shape != (rank, flat):
        return None
    return up2, down2


def refuse_dora(m, source: str) -> None:
    if getattr(m, "dora_scale", None) is not None:
        raise ModelError(
            f"LoRA {source}: module {m.name} is DoRA (dora_scale): its update depends on the base model's "
            "weights, so it cannot be resized or merged without them. Merge it into a checkpoint instead"
        )


def module_spectrum(m, weight_shape, source: str) -> Spectrum:
    """SVD of a module's ΔW / scale (the scale stays in alpha, as kohya's resize keeps it)."""
    from .delta import lora_delta

    refuse_dora(m, source)
    factors = plain_factors(m, weight_shape)
    if factors is not None:
        return product_spectrum(*factors)
    scale = module_scale(m) or 1.0  # scale 0: ΔW is 0 whatever we divide by
    return matrix_spectrum(lora_delta(m, weight_shape).reshape(weight_shape[0], -1) / scale)
