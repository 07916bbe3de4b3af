"""The metadata kohya's LoRA tools (resize, extract, merge) write: the network's dim/alpha read off the
tensors, kohya's minimum `ss_*` keys and SAI modelspec. The sshs_* hashes are added by save_lora_file."""

from __future__ import annotations

import datetime
import json
import time

import torch

from .svd import is_spatial_conv

DYNAMIC = "Dynamic"  # kohya's ss_network_dim / ss_network_alpha when modules differ


def _one(values: set, fmt) -> str:
    return fmt(next(iter(values))) if len(values) == 1 else DYNAMIC


def module_ranks(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, float, bool]]:
    """name -> (rank, alpha, spatial conv) for every `lora_down` module of a kohya LoRA."""
    out = {}
    for key, down in tensors.items():
        if not key.endswith(".lora_down.weight"):
            continue
        name = key[: -len(".lora_down.weight")]
        rank = int(down.shape[0])
        alpha = tensors.get(f"{name}.alpha")
        out[name] = (rank, float(alpha) if alpha is not None else float(rank), is_spatial_conv(down.shape))
    return out


def rank_metadata(tensors: dict[str, torch.Tensor], dynamic: bool = False) -> dict[str, str]:
    """ss_network_dim / ss_network_alpha (the Linear and 1x1 modules' common rank / alpha, or
    "Dynamic"), and conv_dim / conv_alpha for 3x3 convs (kohya's ss_network_args), from the tensors."""
    ranks = module_ranks(tensors)
    linear = [v for v in ranks.values() if not v[2]] or list(ranks.values())
    conv = [v for v in ranks.values() if v[2]]
    meta = {
        "ss_network_dim": DYNAMIC if dynamic else _one({r for r, _, _ in linear}, str),
        "ss_network_alpha": DYNAMIC if dynamic else _one({a for _, a, _ in linear}, lambda a: str(float(a))),
    }
    if conv:
        meta["conv_dim"] = DYNAMIC if dynamic else _one({r for r, _, _ in conv}, str)
        meta["conv_alpha"] = DYNAMIC if dynamic else _one({a for _, a, _ in conv}, lambda a: str(float(a)))
    return meta


def network_args_with_conv(old: str | None, conv: dict[str, str]) -> str | None:
    """ss_network_args with conv_dim / conv_alpha set to `conv` (other args kept); None if there is
    nothing to write."""
    try:
        args = json.loads(old) if old else {}
    except ValueError:
        args = {}
    if not isinstance(args, dict):
        args = {}
    args.update(conv)
    return json.dumps(args) if args else old


def minimum_metadata(
    tensors: dict[str, torch.Tensor],
    *,
    v2: str | None = None,
    base_model_version: str | None = None,
    dynamic: bool = False,
) -> dict[str, str]:
    """kohya's build_minimum_network_metadata for a networks.lora file with these tensors."""
    ranks = rank_metadata(tensors, dynamic)
    meta = {
        "ss_network_module": "networks.lora",
        "ss_network_dim": ranks["ss_network_dim"],
        "ss_network_alpha": ranks["ss_network_alpha"],
    }
    if v2 is not None:
        meta["ss_v2"] = v2
    if base_model_version is not None:
        meta["ss_base_model_version"] = base_model_version
    if "conv_dim" in ranks:
        meta["ss_network_args"] = json.dumps(
            {"conv_dim": ranks["conv_dim"], "conv_alpha": ranks["conv_alpha"]}
        )
    return meta


def lora_modelspec(
    family,
    title: str,
    *,
    v_prediction: bool = False,
    merged_from: str | None = None,
    timestamp: float | None = None,
) -> dict[str, str]:
    """SAI modelspec 1.0.1 keys for a LoRA made by a tool (kohya's sai_model_spec.build_metadata with
    lora=True). `family`: the lorakit family (None: a file whose family is not known: no architecture)."""
    from .. import __version__

    timestamp = time.time() if timestamp is None else timestamp
    spec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.title": title,
        "modelspec.date": datetime.datetime.fromtimestamp(int(timestamp)).isoformat(),
        "modelspec.prediction_type": "v" if v_prediction else "epsilon",
        "modelspec.implementation_version": f"lorakit/{__version__}",
    }
    if family is not None:
        w, h = family.default_resolution
        spec["modelspec.architecture"] = f"{family.modelspec_architecture}/lora"
        spec["modelspec.implementation"] = family.modelspec_implementation
        spec["modelspec.resolution"] = f"{w}x{h}"
    if merged_from is not None:
        spec["modelspec.merged_from"] = merged_from
    return spec
