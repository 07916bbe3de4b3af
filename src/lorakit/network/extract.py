"""Extract a LoRA from two base models (original, fine-tuned), as kohya's
networks/extract_lora_from_models.py does.

For every module kohya's LoRA network targets (the family's lora_targets; 3x3 convs only with
conv_dim), ΔW = tuned − original is factorised by SVD at `dim` (3x3 convs at `conv_dim`), each
factor clamped to the `clamp_quantile` quantile, alpha = rank (scale 1). When no text-encoder
weight moved by more than `min_diff`, the text encoders are left out ("Text encoder is same").
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from ..errors import ModelError
from .svd import CLAMP_QUANTILE, clamp_factors, is_spatial_conv, matrix_spectrum, shape_factors, truncate
from .tool_metadata import lora_modelspec

log = logging.getLogger("lorakit")

MIN_DIFF = 0.01


def module_diffs(org, tuned, conv_dim: int | None) -> tuple[dict, dict, dict[str, bool]]:
    """name -> ΔW (float32) for kohya's targets of two loaded BaseModels of one family, name -> the
    weight's shape, name -> is a text-encoder module."""
    family = org.spec
    if tuned.spec is not family:
        raise ModelError(
            f"{tuned.source} is {tuned.family.label} but {org.source} is {org.family.label}: "
            "a LoRA can only be extracted from two models of one family"
        )
    parts = {"unet", *family.text_encoder_parts}
    # rank/alpha are placeholders: lora_targets gives the names and which 3x3 convs take part
    targets_o = family.lora_targets(org, 1, 1.0, conv_dim, None, parts)
    targets_t = {t.name: t for t in family.lora_targets(tuned, 1, 1.0, conv_dim, None, parts)}
    diffs, shapes, is_te = {}, {}, {}
    for t in targets_o:
        other = targets_t.get(t.name)
        if other is None or other.module.weight.shape != t.module.weight.shape:
            raise ModelError(
                f"{tuned.source} and {org.source} differ in module {t.name}: they are not the same "
                "architecture (SD1.x vs SD2.x?)"
            )
        diffs[t.name] = other.module.weight.detach().float() - t.module.weight.detach().float()
        shapes[t.name] = t.module.weight.shape
        is_te[t.name] = t.is_te
    return diffs, shapes, is_te


def extract_lora(
    org,
    tuned,
    dim: int = 4,
    conv_dim: int | None = None,
    clamp_quantile: float | None = CLAMP_QUANTILE,
    min_diff: float = MIN_DIFF,
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """The LoRA tensors (float32) approximating `tuned` − `org` (two loaded BaseModels)."""
    if dim < 1 or (conv_dim is not None and conv_dim < 1):
        raise ModelError(f"dim {dim} / conv_dim {conv_dim}: a rank is at least 1")
    diffs, shapes, is_te = module_diffs(org, tuned, conv_dim)
    te_names = [n for n in diffs if is_te[n]]
    te_max = max((float(diffs[n].abs().max()) for n in te_names), default=0.0)
    if te_names and te_max <= min_diff:
        log.warning(
            "Text encoder is same (max |ΔW| %.3g <= min_diff %g). Extract U-Net only.", te_max, min_diff
        )
        for n in te_names:
            del diffs[n]
    elif te_names:
        log.info("Text encoder is different (max |ΔW| %.3g > min_diff %g).", te_max, min_diff)
    out: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, delta in diffs.items():
            shape = shapes[name]
            spatial = is_spatial_conv(shape)
            rank = min(conv_dim if spatial and conv_dim else dim, shape[0], shape[1])
            if device is not None:
                delta = delta.to(device)
            spectrum = matrix_spectrum(delta.reshape(shape[0], -1))
            up, down = clamp_factors(*truncate(spectrum, rank), clamp_quantile)
            up, down = shape_factors(up, down, shape)
            out[f"{name}.lora_up.weight"] = up.cpu().contiguous()
            out[f"{name}.lora_down.weight"] = down.cpu().contiguous()
            out[f"{name}.alpha"] = torch.tensor(float(rank))
    return out


def extract_metadata(
    org, dim: int, conv_dim: int | None, title: str, v_prediction: bool | None = None
) -> dict:
    """kohya's extract metadata: the minimum ss_* keys (dim, alpha = dim) and modelspec."""
    family = org.spec
    v = org.family.v_pred if v_prediction is None else v_prediction
    args = {"conv_dim": str(conv_dim), "conv_alpha": str(float(conv_dim))} if conv_dim is not None else {}
    meta = {
        "ss_v2": "False",
        "ss_base_model_version": family.version_string(v),
        "ss_network_module": "networks.lora",
        "ss_network_dim": str(dim),
        "ss_network_alpha": str(float(dim)),
        "ss_network_args": json.dumps(args),
    }
    return {**meta, **lora_modelspec(family, title, v_prediction=v)}


def extract_lora_file(
    model_org: str | Path,
    model_tuned: str | Path,
    save_to: str | Path,
    dim: int = 4,
    conv_dim: int | None = None,
    clamp_quantile: float | None = CLAMP_QUANTILE,
    min_diff: float = MIN_DIFF,
    save_precision: str = "float",
    load_precision: str = "float",
    device: str | None = None,
    v_prediction: bool | None = None,
) -> tuple[Path, dict[str, torch.Tensor]]:
    """Load both models (any family load_base_model reads), extract, write `save_to` atomically."""
    from ..models.loader import load_base_model
    from .file import SAVE_DTYPES, save_lora_file

    dtype = SAVE_DTYPES[load_precision]
    log.info("loading original model: %s", model_org)
    org = load_base_model(model_org, dtype=dtype)
    log.info("loading tuned model: %s", model_tuned)
    tuned = load_base_model(model_tuned, dtype=dtype)
    log.info("calculating by SVD")
    tensors = extract_lora(org, tuned, dim, conv_dim, clamp_quantile, min_diff, device)
    meta = extract_metadata(org, dim, conv_dim, Path(save_to).stem, v_prediction)
    return save_lora_file(save_to, tensors, meta, save_precision), tensors
