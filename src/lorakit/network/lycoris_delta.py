"""ΔW of each kohya / LyCORIS module type, rebuilt as LyCORIS, A1111 and ComfyUI rebuild it.

A module's tensors are `<name>.<param>`; which params exist tells the type (A1111 and ComfyUI decide
the same way), see shared/reference/lycoris-and-tools.md §1:

  lora  (LoRA/LoCon/DyLoRA) lora_down.weight, lora_up.weight [lora_mid.weight] [alpha] [dora_scale]
  loha  (LoHa)   hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b [hada_t1 + hada_t2] [alpha] [dora_scale]
  lokr  (LoKr)   lokr_w1 | lokr_w1_a + lokr_w1_b;  lokr_w2 | lokr_w2_a + lokr_w2_b [lokr_t2] [alpha] [dora_scale]
  ia3   ((IA)³)  weight, on_input                     ΔW = W scaled per output row (per input column)
  full  (full)   diff [diff_b]                        ΔW = diff, Δbias = diff_b
  norm  (norm)   w_norm [b_norm]                      on GroupNorm / LayerNorm weight and bias

Here `tensors` are one module's params without its name ({"hada_w1_a": ..}). `natural_shape` reads
the shape of the ΔW the factors make from their shapes alone (so a file for another base is
refused before anything is computed); `raw_delta` computes that ΔW, float32, without alpha/rank.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


class FactorMismatch(ValueError):
    """A module's own tensors do not fit together (inner dimensions differ)."""


@dataclass(frozen=True)
class Algo:
    kind: str  # the key lorakit uses: "lora", "loha", ...
    label: str  # the name users know: "LoRA/LoCon", "LoHa", ...
    params: frozenset[str]  # every param a module of this type may have


def _algo(kind: str, label: str, *params: str) -> Algo:
    return Algo(kind, label, frozenset(params))


SCALED = ("alpha", "dora_scale")  # what LoRA, LoHa and LoKr modules may carry besides their factors
ALGOS = {
    a.kind: a
    for a in (
        _algo("lora", "LoRA/LoCon", "lora_down.weight", "lora_up.weight", "lora_mid.weight", *SCALED),
        _algo("loha", "LoHa", "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2", *SCALED),
        _algo(
            "lokr", "LoKr", "lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
            *SCALED,
        ),
        _algo("ia3", "(IA)³", "weight", "on_input"),
        _algo("full", "full (diff)", "diff", "diff_b"),
        _algo("norm", "norm", "w_norm", "b_norm"),
    )
}  # fmt: skip
ALL_PARAMS = frozenset().union(*(a.params for a in ALGOS.values()))
# A param only that type has: a file with none of these holds no module lorakit could apply.
TELLING_PARAMS = ("lora_down.weight", "hada_w1_a", "lokr_w1", "lokr_w1_a", "on_input", "diff", "w_norm")
# LyCORIS / kohya types lorakit does not apply, by a param only they have (named in refusals).
UNSUPPORTED = {"oft_blocks": "OFT/BOFT", "oft_diag": "OFT", "a1.weight": "GLoRA", "b1.weight": "GLoRA"}


def _one_of(params: set[str], *choices: set[str]) -> bool:
    """True if the params among all `choices` are exactly one of them."""
    return (params & set().union(*choices)) in choices


def kind_of(params: set[str]) -> str | None:
    """The type whose complete set these params are, or None."""
    for algo in ALGOS.values():
        if not params <= algo.params:
            continue
        ok = {
            "lora": {"lora_down.weight", "lora_up.weight"} <= params,
            "loha": {"hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"} <= params
            and _one_of(params, set(), {"hada_t1", "hada_t2"}),
            "lokr": _one_of(params, {"lokr_w1"}, {"lokr_w1_a", "lokr_w1_b"})
            and _one_of(params, {"lokr_w2"}, {"lokr_w2_a", "lokr_w2_b"})
            and ("lokr_t2" not in params or "lokr_w2_a" in params),
            "ia3": {"weight", "on_input"} <= params,
            "full": "diff" in params,
            "norm": "w_norm" in params,
        }[algo.kind]
        if ok:
            return algo.kind
    return None


def closest_algo(params: set[str]) -> Algo | None:
    """The type an incomplete or mixed param set looks most like (for error messages)."""
    best = max(ALGOS.values(), key=lambda a: len(params & (a.params - set(SCALED))))
    return best if params & (best.params - set(SCALED)) else None


# --------------------------------------------------------------------------- ranks and scales


def rank(kind: str, t: dict[str, torch.Tensor]) -> int | None:
    """The rank alpha is divided by, as A1111 reads it (network.py calc_scale); None: no alpha/rank."""
    if kind == "lora":
        return int(t["lora_down.weight"].shape[0])
    if kind == "loha":
        return int(t["hada_w1_b"].shape[0])
    if kind == "lokr":  # LyCORIS forces scale 1 when both halves are full matrices
        b = t.get("lokr_w1_b", t.get("lokr_w2_b"))
        return int(b.shape[0]) if b is not None else None
    return None


def scale(kind: str, t: dict[str, torch.Tensor]) -> float:
    """alpha/rank (no alpha: 1, as LyCORIS takes alpha 0/None as alpha = rank)."""
    r = rank(kind, t)
    alpha = t.get("alpha")
    if r is None or alpha is None or float(alpha) == 0:
        return 1.0
    return float(alpha) / r


# --------------------------------------------------------------------------- shapes


def _prod(shape) -> int:
    return math.prod(int(s) for s in shape)


def _matrix_product_shape(a: torch.Tensor, b: torch.Tensor, what: str) -> tuple[int, int]:
    """(rows, cols) of a·b with b's trailing dims flattened, as LyCORIS stores conv factors."""
    if a.dim() != 2 or b.dim() < 2 or a.shape[1] != b.shape[0]:
        raise FactorMismatch(f"{what} {tuple(a.shape)} · {tuple(b.shape)} do not multiply")
    return int(a.shape[0]), _prod(b.shape[1:])


def _tucker_shape(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor, what: str) -> tuple[int, ...]:
    """Shape of einsum('i j ..., i p, j r -> p r ...', t, a, b): LyCORIS's rebuild_tucker."""
    if t.dim() < 3 or a.dim() != 2 or b.dim() != 2 or tuple(t.shape[:2]) != (a.shape[0], b.shape[0]):
        raise FactorMismatch(
            f"{what} {tuple(t.shape)}, {tuple(a.shape)}, {tuple(b.shape)} do not fit together"
        )
    return (int(a.shape[1]), int(b.shape[1]), *map(int, t.shape[2:]))


def natural_shape(kind: str, t: dict[str, torch.Tensor]) -> tuple[int, ...]:
    """The shape of ΔW as the factors make it: the weight's, or (out, in·kh·kw) for a conv whose
    factors are stored flat. Not for ia3 (ΔW is the base weight's shape by construction)."""
    if kind == "loha":
        if "hada_t1" in t:
            halves = [
                _tucker_shape(t[f"hada_t{i}"], t[f"hada_w{i}_a"], t[f"hada_w{i}_b"], f"hada_t{i}/w{i}")
                for i in (1, 2)
            ]
        else:
            halves = [
                _matrix_product_shape(t[f"hada_w{i}_a"], t[f"hada_w{i}_b"], f"hada_w{i}_a/b") for i in (1, 2)
            ]
        if halves[0] != halves[1]:
            raise FactorMismatch(f"the two LoHa halves make {halves[0]} and {halves[1]}")
        return halves[0]
    if kind == "lokr":
        if "lokr_w1" in t:
            if t["lokr_w1"].dim() != 2:
                raise FactorMismatch(f"lokr_w1 {tuple(t['lokr_w1'].shape)} is not a matrix")
            w1 = tuple(map(int, t["lokr_w1"].shape))
        else:
            w1 = _matrix_product_shape(t["lokr_w1_a"], t["lokr_w1_b"], "lokr_w1_a/b")
        if "lokr_w2" in t:
            w2 = tuple(map(int, t["lokr_w2"].shape))
        elif "lokr_t2" in t:
            w2 = _tucker_shape(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"], "lokr_t2/w2_a/w2_b")
        else:
            w2 = _matrix_product_shape(t["lokr_w2_a"], t["lokr_w2_b"], "lokr_w2_a/b")
        if len(w2) < 2:
            raise FactorMismatch(f"lokr_w2 {w2} is not a matrix")
        return (w1[0] * w2[0], w1[1] * w2[1], *w2[2:])
    if kind == "full":
        return tuple(map(int, t["diff"].shape))
    if kind == "norm":
        return tuple(map(int, t["w_norm"].shape))
    raise ValueError(kind)


def fits_weight(natural: tuple[int, ...], weight_shape: tuple[int, ...]) -> bool:
    """A ΔW of shape `natural` fits the weight: same shape, the weight flattened to (out, in·kh·kw),
    or the same but for 1x1 kernels (kohya squeezes pointwise convs to Linear shapes and back)."""

    def pointwise_squeezed(s):
        return s[:2] if len(s) == 4 and s[2:] == (1, 1) else s

    weight_shape = tuple(weight_shape)
    return (
        pointwise_squeezed(natural) == pointwise_squeezed(weight_shape)
        or (len(natural) == 2 and len(weight_shape) > 2 and natural == (weight_shape[0], _prod(weight_shape[1:])))
    )  # fmt: skip


def on_input_of(t: dict[str, torch.Tensor]) -> bool:
    """(IA)³'s `on_input` buffer (an int tensor): scale input columns instead of output rows."""
    return bool(t["on_input"].numel()) and bool(t["on_input"].flatten()[0])


def ia3_problem(t: dict[str, torch.Tensor], weight_shape: tuple[int, ...]) -> str | None:
    """Why an (IA)³ `weight` does not fit: one factor per output row, or per input column (on_input)."""
    w, on_input = t["weight"], on_input_of(t)
    n = weight_shape[1] if on_input else weight_shape[0]
    if len(weight_shape) < 2 or w.numel() != n or sum(s != 1 for s in w.shape) > 1:
        axis = "input column" if on_input else "output row"
        return f"(IA)³ weight {tuple(w.shape)} (expected one factor per {axis}: {n})"
    return None


# --------------------------------------------------------------------------- ΔW


def _mat(x: torch.Tensor) -> torch.Tensor:
    return x.float().reshape(x.shape[0], -1)


def _tucker(t: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """LyCORIS rebuild_tucker: ΔW[p, r, ...] = Σ t[i, j, ...] a[i, p] b[j, r]."""
    return torch.einsum("i j ..., i p, j r -> p r ...", t.float(), a.float(), b.float())


def lora_raw(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """up·down, or with Tucker ΔW[o, i, ...] = Σ up[o, a] mid[a, b, ...] down[b, i]."""
    up, down = _mat(t["lora_up.weight"]), _mat(t["lora_down.weight"])
    if "lora_mid.weight" in t:
        return torch.einsum("a b ..., o a, b i -> o i ...", t["lora_mid.weight"].float(), up, down)
    return up @ down


def loha_raw(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """(w1_a·w1_b) ⊙ (w2_a·w2_b); Tucker: each half rebuilt from t_i, w_i_a (r, out), w_i_b (r, in)."""
    if "hada_t1" in t:
        halves = [_tucker(t[f"hada_t{i}"], t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]) for i in (1, 2)]
    else:
        halves = [_mat(t[f"hada_w{i}_a"]) @ _mat(t[f"hada_w{i}_b"]) for i in (1, 2)]
    return halves[0] * halves[1]


def lokr_raw(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """kron(w1, w2), each half rebuilt from its factors first (LyCORIS make_kron)."""
    w1 = t["lokr_w1"].float() if "lokr_w1" in t else t["lokr_w1_a"].float() @ _mat(t["lokr_w1_b"])
    if "lokr_w2" in t:
        w2 = t["lokr_w2"].float()
    elif "lokr_t2" in t:
        w2 = _tucker(t["lokr_t2"], t["lokr_w2_a"], t["lokr_w2_b"])
    else:  # a conv's w2_b is (r, n·kh·kw): the flat kron equals the kernel-shaped one, flattened
        w2 = t["lokr_w2_a"].float() @ _mat(t["lokr_w2_b"])
    w1 = w1.reshape(*w1.shape, *[1] * (w2.dim() - 2))
    return torch.kron(w1, w2.contiguous())


def ia3_raw(t: dict[str, torch.Tensor], base: torch.Tensor) -> torch.Tensor:
    """W scaled by `weight` per output row (per input column with on_input): LyCORIS merges W·(1+w)."""
    axis = 1 if on_input_of(t) else 0
    shape = [1] * base.dim()
    shape[axis] = base.shape[axis]
    return base.float() * t["weight"].float().to(base.device).reshape(shape)


RAW = {"lora": lora_raw, "loha": loha_raw, "lokr": lokr_raw}


def raw_delta(kind: str, t: dict[str, torch.Tensor], base: torch.Tensor | None = None) -> torch.Tensor:
    """ΔW in its natural shape, float32, without alpha/rank (ia3 needs the base weight)."""
    if kind in RAW:
        return RAW[kind](t)
    if kind == "ia3":
        if base is None:
            raise ValueError("an (IA)³ module scales the base weight: its ΔW needs that weight")
        return ia3_raw(t, base)
    return t["diff" if kind == "full" else "w_norm"].float()


def raw_bias_delta(kind: str, t: dict[str, torch.Tensor]) -> torch.Tensor | None:
    """What the module adds to the layer's bias (full: diff_b, norm: b_norm), float32; else None."""
    b = t.get("diff_b" if kind == "full" else "b_norm" if kind == "norm" else "")
    return None if b is None else b.float()
