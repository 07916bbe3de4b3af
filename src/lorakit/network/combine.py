"""Merge LoRA files into one LoRA (kohya's merge_lora.py without --sd_model, and svd_merge_lora.py).

Three ways, per module:
- kohya's sum (default): up = Σ|√(alpha_i/alpha_0)·ratio_i|·up_i, down = Σ √(alpha_i/alpha_0)·ratio_i·down_i,
  alpha = the first file's. Needs equal ranks; an approximation (a sum of products is not the
  product of sums), kept because kohya users know its results.
- concat: the ranks side by side; each file's ratio·alpha/rank folded into its factors
  (√|c| into up, sign·√|c| into down) and alpha = total rank, so ΔW = Σ ratio_i·ΔW_i exactly.
- SVD (new_rank): Σ ratio_i·ΔW_i, SVD to new_rank (3x3 convs: new_conv_rank), factors clamped to
  kohya's 0.99 quantile, alpha = rank: exact up to the truncation (and the clamp).
"""

from __future__ import annotations

import math

import torch

from ..errors import ModelError
from .delta import lora_delta, lora_modules
from .svd import (
    CLAMP_QUANTILE,
    clamp_factors,
    is_spatial_conv,
    matrix_spectrum,
    module_scale,
    module_weight_shape,
    plain_factors,
    product_spectrum,
    refuse_dora,
    shape_factors,
    truncate,
)
from .tool_metadata import lora_modelspec, minimum_metadata


def _label(i: int, metadata: dict[str, str], titles: list[str] | None) -> str:
    if titles is not None:
        return titles[i]
    return metadata.get("modelspec.title") or metadata.get("ss_output_name") or f"LoRA {i + 1}"


def _family(loras, labels):
    """The lorakit family all inputs were made for (None if no file says); different ones: refused."""
    from ..models.families.base import lora_family
    from .inspect import architecture, family_name

    names, families = [], []
    for tensors, metadata in loras:
        keys = list(tensors)
        module_names = sorted({k.split(".", 1)[0] for k in keys})
        names.append(family_name(module_names, metadata, architecture(keys)))
        families.append(lora_family(module_names, metadata))
    known = [(label, n) for label, n in zip(labels, names) if n != "unknown"]
    for label, n in known[1:]:
        if n != known[0][1]:
            raise ModelError(
                f"LoRA {label!r} is for {n} but {known[0][0]!r} is for {known[0][1]}: LoRAs for different "
                "model families cannot be merged"
            )
    return next((f for f in families if f is not None), None)


def _modules(loras, labels) -> list[dict]:
    """Each file's modules, checked: no DoRA, and one weight shape per module name across files."""
    out, shapes = [], {}
    for (tensors, _), label in zip(loras, labels):
        modules = lora_modules(tensors, repr(label))
        for name, m in modules.items():
            refuse_dora(m, repr(label))
            shape = module_weight_shape(m)
            first = shapes.setdefault(name, (shape, label))
            if first[0] != shape:
                raise ModelError(
                    f"LoRA {label!r}: module {name} adapts a weight of shape {tuple(shape)} but in "
                    f"{first[1]!r} of shape {tuple(first[0])}: the files are for different models"
                )
        out.append(modules)
    return out


def _plain(m, shape, label: str) -> tuple[torch.Tensor, torch.Tensor]:
    factors = plain_factors(m, shape)
    if factors is None:
        raise ModelError(
            f"LoRA {label!r}: module {m.name} is not a LoRA/LoCon (up/down) module; merge such files "
            "by SVD (new_rank)"
        )
    return factors


def _kohya_sum(per_file, ratios, labels, name, shape) -> dict[str, torch.Tensor]:
    """kohya merge_lora's LoRA+LoRA: scaled factors summed, the first file's alpha."""
    up = down = None
    base_alpha = rank = None
    for modules, ratio, label in zip(per_file, ratios, labels):
        m = modules.get(name)
        if m is None:
            continue
        u, d = _plain(m, shape, label)
        alpha = float(m.alpha) if m.alpha is not None else float(m.rank)
        if base_alpha is None:
            base_alpha, rank, first = alpha, m.rank, label
        elif m.rank != rank:
            raise ModelError(
                f"module {name} has rank {m.rank} in {label!r} but {rank} in {first!r}: kohya's sum needs "
                "equal ranks; merge with concat (exact, ranks add up) or new_rank (SVD) instead"
            )
        s = math.sqrt(alpha / base_alpha) * ratio
        up = abs(s) * u if up is None else up + abs(s) * u  # the sign goes into down only
        down = s * d if down is None else down + s * d
    up, down = shape_factors(up, down, shape)
    return {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(base_alpha)}


def _concat(per_file, ratios, labels, name, shape) -> dict[str, torch.Tensor]:
    """Ranks side by side, each file's ratio·scale folded in: ΔW = Σ ratio_i·ΔW_i exactly."""
    ups, downs = [], []
    for modules, ratio, label in zip(per_file, ratios, labels):
        m = modules.get(name)
        if m is None:
            continue
        u, d = _plain(m, shape, label)
        c = ratio * module_scale(m)
        ups.append(u * math.sqrt(abs(c)))
        downs.append(d * math.copysign(math.sqrt(abs(c)), c))
    up, down = shape_factors(torch.cat(ups, 1), torch.cat(downs, 0), shape)
    return {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(float(down.shape[0]))}


def _svd(per_file, ratios, name, shape, new_rank, new_conv_rank, clamp_quantile) -> dict[str, torch.Tensor]:
    """Σ ratio_i·ΔW_i factorised at the new rank (kohya's svd_merge_lora)."""
    entries = [(modules[name], ratio) for modules, ratio in zip(per_file, ratios) if name in modules]
    factors = [plain_factors(m, shape) for m, _ in entries]
    if all(f is not None for f in factors):  # all LoRA/LoCon: the SVD of the stacked product
        ups = [u * ratio * module_scale(m) for (u, _), (m, ratio) in zip(factors, entries)]
        spectrum = product_spectrum(torch.cat(ups, 1), torch.cat([d for _, d in factors], 0))
    else:
        total = sum(ratio * lora_delta(m, shape) for m, ratio in entries)
        spectrum = matrix_spectrum(total.reshape(shape[0], -1))
    rank = new_conv_rank if is_spatial_conv(shape) else new_rank
    rank = min(rank, shape[0], shape[1])  # kohya: a LoRA's rank cannot exceed the weight's dims
    up, down = clamp_factors(*truncate(spectrum, rank), clamp_quantile)
    up, down = shape_factors(up, down, shape)
    return {"lora_up.weight": up, "lora_down.weight": down, "alpha": torch.tensor(float(rank))}


def merge_loras(
    loras: list[tuple[dict[str, torch.Tensor], dict[str, str]]],
    ratios: list[float],
    concat: bool = False,
    new_rank: int | None = None,
    new_conv_rank: int | None = None,
    *,
    titles: list[str] | None = None,
    title: str | None = None,
    clamp_quantile: float | None = CLAMP_QUANTILE,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """One LoRA (float32 tensors, kohya's minimum metadata + modelspec) from `loras` at `ratios`.

    new_rank: merge by SVD (new_conv_rank for 3x3 convs, default new_rank); else concat (exact) or
    kohya's sum (equal ranks). titles: the inputs' names for modelspec.merged_from (default: their
    modelspec.title / ss_output_name); title: the result's modelspec.title (the CLI: the file's stem);
    clamp_quantile: the SVD merge's clamp of the factors (kohya's 0.99; None: none, exact at full rank)."""
    if not loras:
        raise ModelError("merge: no LoRAs given")
    if len(ratios) != len(loras):
        raise ModelError(f"merge: {len(loras)} LoRAs but {len(ratios)} ratios: give one ratio per LoRA")
    if titles is not None and len(titles) != len(loras):
        raise ModelError(f"merge: {len(loras)} LoRAs but {len(titles)} titles")
    if new_rank is not None and concat:
        raise ModelError("merge: choose concat (exact, ranks add up) or new_rank (SVD), not both")
    if (new_rank is not None and new_rank < 1) or (new_conv_rank is not None and new_conv_rank < 1):
        raise ModelError(f"merge: new_rank {new_rank} / new_conv_rank {new_conv_rank}: a rank is at least 1")
    if new_conv_rank is not None and new_rank is None:
        raise ModelError("merge: new_conv_rank needs new_rank (it is the SVD merge's rank for 3x3 convs)")
    labels = [_label(i, meta, titles) for i, (_, meta) in enumerate(loras)]
    family = _family(loras, labels)
    per_file = _modules(loras, labels)
    names = sorted({n for modules in per_file for n in modules})
    ratios = [float(r) for r in ratios]
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name in names:
            shape = next(module_weight_shape(mods[name]) for mods in per_file if name in mods)
            if new_rank is not None:
                merged = _svd(
                    per_file, ratios, name, shape, new_rank, new_conv_rank or new_rank, clamp_quantile
                )
            elif concat:
                merged = _concat(per_file, ratios, labels, name, shape)
            else:
                merged = _kohya_sum(per_file, ratios, labels, name, shape)
            for param, tensor in merged.items():
                out[f"{name}.{param}"] = tensor.float().contiguous()
    metadatas = [meta for _, meta in loras]
    meta = minimum_metadata(
        out,
        v2=next((m["ss_v2"] for m in metadatas if "ss_v2" in m), None),
        base_model_version=next(
            (m["ss_base_model_version"] for m in metadatas if "ss_base_model_version" in m), None
        ),
    )
    v_prediction = any(m.get("modelspec.prediction_type") == "v" for m in metadatas) or (
        meta.get("ss_base_model_version", "").endswith("_v")
    )
    meta.update(
        lora_modelspec(family, title or "LoRA", v_prediction=v_prediction, merged_from=", ".join(labels))
    )
    return out, meta
