"""kohya LoRA -> diffusers/PEFT, ComfyUI, or a kohya file diffusers loads (`lorakit convert`).

PEFT: what diffusers' `load_lora_weights` (0.42.1) reads with every key used: `unet.<diffusers path>`,
`text_encoder[_2].text_model.encoder.layers.N.<child>` (diffusers drops `text_model.` itself where the
installed transformers has no such wrapper, >= 5.6), `lora_A.weight` = lora_down, `lora_B.weight` =
lora_up, DoRA as `lora_magnitude_vector`. diffusers gives a PEFT file no per-module alpha from its keys:
it builds the LoraConfig from the `lora_adapter_metadata` JSON (`unet.r`, `unet.lora_alpha`,
`unet.rank_pattern`, `unet.alpha_pattern`, `unet.target_modules`, `unet.use_dora`, same for
`text_encoder.` / `text_encoder_2.`), else scale 1. So alpha is written there, per module where it
varies, and the tensors are only renamed (bit-exact both ways).

ComfyUI: its loader also reads kohya names, but its own LoraSave node writes the generic names its key
map resolves for every model: `diffusion_model.<LDM/SGM UNet path>` and
`text_encoders.clip_l|clip_g.transformer.text_model.encoder.layers.N.<child>` (comfy/lora.py
model_lora_keys_unet / model_lora_keys_clip, comfy_extras/nodes_lora_extract.py), with kohya's
per-module tensors (`lora_up.weight`, `lora_down.weight`, `alpha`, `dora_scale`, LyCORIS params), which
its LoRA adapters read under any module name. `--to comfy` writes those.

kohya (fixed): diffusers 0.42.1 tells a text encoder's kohya keys apart by its `out_proj` modules
(`to_out_lora` after its renaming, state_dict_utils.convert_state_dict_to_diffusers): an encoder with
q/k/v modules but no out_proj raises "Could not automatically infer state dict type" (no MLP modules)
or leaves the q/k/v modules unloaded (with MLP modules). `--to kohya` adds a zero out_proj module (its
update is exactly 0) to such an encoder, so the file loads and means the same everywhere. diffusers
also misnames the alphas of attention modules (`_get_alpha_name` keeps `to_q_lora.down.weight` in the
name) and of text-encoder modules under transformers >= 5.6 (`text_model.` patterns), so a module whose
alpha differs from the file's most common one gets the common one there; `--to kohya` gives every module
the common alpha and scales its lora_up by alpha/common instead (the same ΔW, one rounding of lora_up).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import ModelError
from .naming import (
    ADAPTER_METADATA_KEY,
    COMFY_CLIP,
    COMFY_TE,
    COMFY_UNET,
    PEFT_PREFIX,
    family_of,
    te_path,
    to_kohya,
    unet_names,
)

TARGETS = ("kohya", "peft", "comfy")
PEFT_PARAMS = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}


def _modules(tensors: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        name, _, param = key.partition(".")
        grouped.setdefault(name, {})[param] = tensor
    return grouped


def detect_family(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]):
    from ..models.families.base import lora_family

    family = lora_family(sorted(_modules(tensors)), dict(metadata))
    if family is None:
        raise ModelError(
            "cannot tell which model family this LoRA is for: lorakit converts SD1.x and SDXL LoRAs "
            "(kohya lora_unet_/lora_te_ modules); SD2.x and other architectures are not converted"
        )
    return family


def from_kohya(
    tensors: dict[str, torch.Tensor],
    metadata: Mapping[str, str],
    to: str = "peft",
    family=None,
    unet_config: Mapping | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """A LoRA's tensors and metadata in `to`'s naming ("peft", "comfy", or "kohya" cleaned for
    diffusers). The input may be in any dialect to_kohya reads. `family` ("sd1"/"sdxl", default: from
    the names) and `unet_config` (default: the real SD1.5 / SDXL UNet) give the UNet's module paths."""
    if to not in TARGETS:
        raise ValueError(f"to must be one of {TARGETS}, not {to!r}")
    tensors = to_kohya(tensors, metadata, family, unet_config)
    family = family_of(family) if family is not None else detect_family(tensors, metadata)
    metadata = {k: v for k, v in metadata.items() if k != ADAPTER_METADATA_KEY}
    if to == "kohya":
        return with_te_out_proj(with_one_alpha(tensors)), metadata
    modules = _modules(tensors)
    table = unet_names(family, unet_config) if any(n.startswith("lora_unet_") for n in modules) else None
    if to == "comfy":
        return _to_comfy(modules, table, family), metadata
    out, configs = _to_peft(modules, table, family)
    metadata[ADAPTER_METADATA_KEY] = json.dumps(
        {f"{c}.{k}": v for c, config in configs.items() for k, v in config.items()}, indent=2, sort_keys=True
    )
    return out, metadata


def _unet_name(name: str, params: Mapping[str, torch.Tensor], table, family) -> str:
    """Our name for UNet module `name`, checked against the architecture's layer: LDM/SGM block numbers
    depend on it, so a LoRA of another UNet layout would get wrong names, not an error, without this."""
    ours = table.aliases.get(name, name)
    if ours not in table.paths:
        raise ModelError(
            f"LoRA module {name} is not a module of the {family.name} UNet this conversion uses; a LoRA for "
            "another architecture cannot be renamed"
        )
    down, up = params.get("lora_down.weight"), params.get("lora_up.weight")
    if down is not None and up is not None and (up.shape[0], down.shape[1]) != table.shapes[ours][:2]:
        raise ModelError(
            f"LoRA module {name} maps {down.shape[1]} -> {up.shape[0]} features, but that layer of the "
            f"{family.name} base architecture maps {table.shapes[ours][1]} -> {table.shapes[ours][0]}: the LoRA "
            "was made for a base of another UNet layout, whose module names lorakit cannot work out"
        )
    return ours


def _te_parts(name: str, family) -> tuple[str, str]:
    found = te_path(name)
    if found is None:
        raise ModelError(
            f"LoRA module {name}: lorakit converts text-encoder modules "
            "`lora_te[1|2]_text_model_encoder_layers_N_(self_attn_q/k/v/out_proj|mlp_fc1/fc2)` only"
        )
    part, path = found
    if (part == "te") != (family.key == "sd1"):
        raise ModelError(f"LoRA module {name} does not belong to an {family.name} LoRA")
    return part, path


def _to_comfy(modules, table, family) -> dict[str, torch.Tensor]:
    out = {}
    for name, params in modules.items():
        if name.startswith("lora_unet_"):
            ours = _unet_name(name, params, table, family)
            ldm = table.ldm_paths[ours]
            if ldm is None:
                raise ModelError(f"LoRA module {name} has no LDM path, which ComfyUI's names need")
            prefix = COMFY_UNET + ldm
        else:
            part, path = _te_parts(name, family)
            prefix = f"{COMFY_TE}{COMFY_CLIP[part]}.transformer.{path}"
        out.update({f"{prefix}.{param}": t for param, t in params.items()})
    return out


def _fit(t: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
    """`t` in `shape` (kohya stores 1x1 convs and Linears either way round); itself when it already is."""
    return t if tuple(t.shape) == shape else t.reshape(shape)


def _to_peft(modules, table, family) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    out: dict[str, torch.Tensor] = {}
    per_component: dict[str, dict[str, tuple[int, float]]] = {}
    dora: Counter[str] = Counter()
    for name, params in modules.items():
        extra = sorted(set(params) - {"lora_down.weight", "lora_up.weight", "alpha", "dora_scale"})
        if extra or "lora_down.weight" not in params or "lora_up.weight" not in params:
            raise ModelError(
                f"LoRA module {name} has {', '.join(sorted(params))}: a PEFT LoRA holds lora_down/lora_up "
                "(+ alpha, dora_scale) only, so LyCORIS modules (Tucker lora_mid, LoHa, LoKr, ...) cannot be "
                "converted to it; keep the kohya file (A1111, Forge and ComfyUI read it)"
            )
        down, up = params["lora_down.weight"], params["lora_up.weight"]
        rank = down.shape[0]
        if name.startswith("lora_unet_"):
            ours = _unet_name(name, params, table, family)
            component, path, pattern = "unet", table.paths[ours], table.paths[ours]
            kernel = table.shapes[ours][2:]  # the sizes come from the tensors: any width of this layout
        else:
            part, path = _te_parts(name, family)
            component, pattern, kernel = PEFT_PREFIX[part], path.removeprefix("text_model."), ()
        weight = (up.shape[0], down.shape[1], *kernel)
        out[f"{component}.{path}.lora_A.weight"] = _fit(down, (rank, weight[1], *kernel))
        out[f"{component}.{path}.lora_B.weight"] = _fit(up, (weight[0], rank, *(1,) * len(kernel)))
        if "dora_scale" in params:
            out[f"{component}.{path}.lora_magnitude_vector"] = _peft_magnitude(
                name, params["dora_scale"], weight
            )
            dora[component] += 1
        alpha = float(params["alpha"]) if "alpha" in params else float(rank)
        per_component.setdefault(component, {})[pattern] = (rank, alpha)
    for component, n in dora.items():
        if n != len(per_component[component]):  # LoraConfig.use_dora is one flag for the whole model
            raise ModelError(
                f"{n} of the {len(per_component[component])} {component} modules are DoRA (dora_scale): a PEFT "
                "LoRA is DoRA in every module of a model or in none, so this file has no PEFT form; keep the "
                "kohya file (ComfyUI and Forge read it)"
            )
    return out, {c: _lora_config(m, c in dora) for c, m in per_component.items()}


def _peft_magnitude(name: str, scale: torch.Tensor, weight: tuple[int, ...]) -> torch.Tensor:
    """kohya/LyCORIS dora_scale -> PEFT's lora_magnitude_vector: (out,) for a Linear, (1, out, 1, 1) for a
    conv. PEFT's DoRA normalises per output row; a per-input-column dora_scale (LyCORIS < 3.2) has no
    PEFT form."""
    out = weight[0]
    if scale.numel() != out or scale.shape[0] != out:
        raise ModelError(
            f"LoRA module {name}: its dora_scale {tuple(scale.shape)} is per input column (LyCORIS < 3.2, "
            "wd_on_output off); PEFT's DoRA magnitude is per output row, so this file has no PEFT form"
        )
    return scale.reshape(out) if len(weight) == 2 else scale.reshape(1, out, *(1,) * (len(weight) - 2))


def _lora_config(modules: dict[str, tuple[int, float]], use_dora: bool) -> dict:
    """The LoraConfig fields diffusers reads from lora_adapter_metadata for one component: the most
    common rank/alpha, and patterns (full module paths) for the modules that differ."""
    r = Counter(r for r, _ in modules.values()).most_common(1)[0][0]
    alpha = Counter(a for _, a in modules.values()).most_common(1)[0][0]
    return {
        "r": r,
        "lora_alpha": alpha,
        "rank_pattern": {p: rank for p, (rank, _) in sorted(modules.items()) if rank != r},
        "alpha_pattern": {p: a for p, (_, a) in sorted(modules.items()) if a != alpha},
        "target_modules": sorted(modules),
        "use_dora": use_dora,
    }


def with_te_out_proj(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` plus, for each text encoder with q/k/v modules and no out_proj module, a zero out_proj
    module beside the first q/k/v one (same rank, alpha, dtype): what diffusers needs to read the encoder's
    keys (see the module docstring). The same dict when nothing is missing."""
    modules = _modules(tensors)
    added: dict[str, torch.Tensor] = {}
    for part in ("te", "te1", "te2"):
        ours = {n: te_path(n) for n in modules if n.startswith(f"lora_{part}_")}
        attn = sorted(
            n for n, found in ours.items() if found and found[1].endswith(("q_proj", "k_proj", "v_proj"))
        )
        if not attn or any(n.endswith("_self_attn_out_proj") for n in ours):
            continue
        source = modules[attn[0]]
        if "lora_down.weight" not in source:
            continue  # a LyCORIS module: diffusers does not read these files anyway
        down, up = source["lora_down.weight"], source["lora_up.weight"]
        width = down.shape[1]  # q/k/v and out_proj: hidden -> hidden
        name = attn[0].rsplit("_self_attn_", 1)[0] + "_self_attn_out_proj"
        added[f"{name}.lora_down.weight"] = torch.zeros(down.shape[0], width, dtype=down.dtype)
        added[f"{name}.lora_up.weight"] = torch.zeros(width, up.shape[1], dtype=up.dtype)
        if "alpha" in source:
            added[f"{name}.alpha"] = source["alpha"].clone()
    return {**tensors, **added} if added else tensors


def with_one_alpha(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`tensors` with one alpha for every LoRA module (the most common; no alpha counts as the rank):
    a module with alpha a != A gets alpha A and lora_up * a/A, so alpha/rank·up·down is unchanged. The
    same dict when the alphas already agree."""
    modules = _modules(tensors)
    alphas = {
        n: float(p["alpha"]) if "alpha" in p else float(p["lora_down.weight"].shape[0])
        for n, p in modules.items()
        if "lora_down.weight" in p and "lora_up.weight" in p
    }
    if len(set(alphas.values())) <= 1 and all("alpha" in modules[n] for n in alphas):
        return tensors
    common = Counter(alphas.values()).most_common(1)[0][0]
    out = dict(tensors)
    for name, alpha in alphas.items():
        up = modules[name]["lora_up.weight"]
        dtype = modules[name]["alpha"].dtype if "alpha" in modules[name] else up.dtype
        out[f"{name}.alpha"] = torch.tensor(common, dtype=dtype)
        if alpha != common:
            out[f"{name}.lora_up.weight"] = (up.double() * (alpha / common)).to(up.dtype)
    return out


def save_dtype_name(tensors: Mapping[str, torch.Tensor]) -> str:
    """The save_lora_file precision that keeps the file's own dtype (its lora_down/lora_A tensors')."""
    names = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "float"}
    dtypes = Counter(t.dtype for k, t in tensors.items() if t.dim() >= 2)
    return names.get(dtypes.most_common(1)[0][0], "float") if dtypes else "float"


def convert_file(
    src: str | Path,
    dst: str | Path,
    to: str,
    overwrite: bool = False,
    precision: str | None = None,
    family=None,
    unet_config: Mapping | None = None,
) -> Path:
    """Read a LoRA file in any dialect, write it in `to`'s naming to `dst` (atomically), metadata kept
    (ss_*, modelspec.*) with new sshs_* hashes. `precision` None keeps the file's dtype."""
    from .file import read_lora_file, save_lora_file

    src, dst = Path(src), Path(dst)
    if dst.suffix.lower() != ".safetensors":
        raise ModelError(f"{dst}: lorakit writes LoRAs as .safetensors files; name the output *.safetensors")
    if dst.exists() and not overwrite:
        raise ModelError(f"{dst} exists; pass --overwrite to replace it")
    tensors, metadata = read_lora_file(src)
    try:
        out, meta = from_kohya(tensors, metadata, to, family, unet_config)
    except ModelError as e:
        raise ModelError(f"{src}: {e}") from None
    return save_lora_file(dst, out, meta, precision or save_dtype_name(tensors))
