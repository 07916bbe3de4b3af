"""LoRA key names: other tools' dialects -> kohya's (`to_kohya`), and the name tables both ways.

kohya names a module `lora_unet_<path>` / `lora_te_…` / `lora_te1_…` / `lora_te2_…` with '.' -> '_'
(SD1 UNet: diffusers path; SDXL UNet: SGM path; text encoders: HF CLIP path with `text_model.`), each
holding `lora_down.weight`, `lora_up.weight`, `alpha`, optional `dora_scale` and LyCORIS params.
The other dialects lorakit reads:

- diffusers / PEFT: `unet.<diffusers path>.lora_A.weight` (down) / `lora_B.weight` (up),
  `text_encoder.` / `text_encoder_2.` + `[text_model.]encoder.layers.N.<child>`; DoRA as
  `lora_magnitude_vector` ((out,) Linear, (1, out, 1, 1) conv: PEFT's per-output-row norm); alpha in the
  `lora_adapter_metadata` JSON diffusers writes (`unet.r`, `unet.lora_alpha`, `unet.rank_pattern`,
  `unet.alpha_pattern`, `unet.use_rslora`), else scale 1 (alpha = rank).
- old diffusers: `…attn1.processor.to_q_lora.down.weight`, `….lora.down.weight`,
  `….lora_linear_layer.down.weight` (attention-processor files may lack the `unet.` prefix).
- ComfyUI (what its LoraSave node writes, and its loader's generic names): `diffusion_model.<LDM/SGM
  path>` and `text_encoders.clip_l|clip_g.transformer.text_model.encoder.layers.N.<child>`, with kohya's
  per-module params.
- ai-toolkit: kohya names, DoRA as `<name>.magnitude` ((out,), Linear only), no alpha for DoRA modules.

Which UNet module a diffusers or LDM path names depends on the architecture (SGM block numbers follow
layers_per_block), so UNet names go through the family's module map / name_aliases built on a meta-device
UNet of the real SD1.5 / SDXL config (or the config given); text-encoder names are the same in every
architecture and are converted by rule.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ModelError

KOHYA_MODULE = re.compile(r"(?:lora_(?:unet|te\d?)|oft_unet)_[^.]+")
# per-module tensors of kohya LoRA / LoCon / DoRA and the LyCORIS types, as ComfyUI and A1111 read them
KOHYA_PARAMS = (
    "lora_down.weight", "lora_up.weight", "lora_mid.weight", "alpha", "dora_scale", "scale",
    "hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "hada_t1", "hada_t2",
    "lokr_w1", "lokr_w2", "lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "lokr_t2",
    "diff", "diff_b", "w_norm", "b_norm", "a1.weight", "a2.weight", "b1.weight", "b2.weight",
    "oft_blocks", "rescale", "on_input",
)  # fmt: skip
# other dialects' per-module tensors -> kohya's
PARAM_ALIASES = {
    "lora_A.weight": "lora_down.weight",
    "lora_B.weight": "lora_up.weight",
    "lora_A.default.weight": "lora_down.weight",
    "lora_B.default.weight": "lora_up.weight",
    "lora.down.weight": "lora_down.weight",
    "lora.up.weight": "lora_up.weight",
    "lora_linear_layer.down.weight": "lora_down.weight",
    "lora_linear_layer.up.weight": "lora_up.weight",
    "lora_magnitude_vector": "dora_scale",
    "lora_magnitude_vector.weight": "dora_scale",
    "lora_magnitude_vector.default.weight": "dora_scale",
    "magnitude": "dora_scale",  # ai-toolkit's DoRA
}
_PARAM_SUFFIXES = sorted([*PARAM_ALIASES, *KOHYA_PARAMS], key=len, reverse=True)
# old diffusers attention processors: `attn1.processor.to_q_lora.down.weight`
_PROCESSOR = re.compile(r"(.+?)(?:\.processor)?\.(to_q|to_k|to_v|to_out)_lora\.(down|up)\.weight")
_UNET_ROOTS = (
    "down_blocks.",
    "mid_block.",
    "up_blocks.",
    "conv_in",
    "conv_out",
    "time_embedding.",
    "add_embedding.",
)

# text encoders: kohya's child names <-> HF module paths (networks/lora.py targets)
TE_CHILDREN = {
    "self_attn_q_proj": "self_attn.q_proj",
    "self_attn_k_proj": "self_attn.k_proj",
    "self_attn_v_proj": "self_attn.v_proj",
    "self_attn_out_proj": "self_attn.out_proj",
    "mlp_fc1": "mlp.fc1",
    "mlp_fc2": "mlp.fc2",
}
_TE_KOHYA = re.compile(rf"lora_(te\d?)_text_model_encoder_layers_(\d+)_({'|'.join(TE_CHILDREN)})")
_TE_PATH = re.compile(
    rf"(?:text_model\.)?encoder\.layers\.(\d+)\.({'|'.join(map(re.escape, TE_CHILDREN.values()))})"
)
_OLD_TE_ATTN = {"to_q": "self_attn.q_proj", "to_k": "self_attn.k_proj", "to_v": "self_attn.v_proj", "to_out": "self_attn.out_proj"}  # fmt: skip

# PEFT / diffusers component prefixes and ComfyUI's CLIP names, per kohya text-encoder part
PEFT_PREFIX = {"unet": "unet", "te": "text_encoder", "te1": "text_encoder", "te2": "text_encoder_2"}
COMFY_CLIP = {"te": "clip_l", "te1": "clip_l", "te2": "clip_g"}
COMFY_UNET = "diffusion_model."
COMFY_TE = "text_encoders."
ADAPTER_METADATA_KEY = "lora_adapter_metadata"  # diffusers' LORA_ADAPTER_METADATA_KEY


# --------------------------------------------------------------------------- name tables


@dataclass(frozen=True)
class UNetNames:
    """A UNet architecture's module names: ours (kohya, the family's module_map) with the diffusers path,
    the LDM/SGM path (None where LDM has none) and the weight shape of each; and other tools' kohya-style
    spellings -> ours (the family's name_aliases)."""

    paths: dict[str, str]
    ldm_paths: dict[str, str | None]
    shapes: dict[str, tuple[int, ...]]
    aliases: dict[str, str]


def family_of(family) -> object:
    """A ModelFamily from a family object or key ("sd1", "sdxl")."""
    from ..models.families.base import family_spec

    return family_spec(family) if isinstance(family, str) else family


def real_unet_config(family_key: str) -> dict:
    """The UNet config lorakit ships for the family: SD1.5's or SDXL base 1.0's."""
    folder = (
        Path(__file__).resolve().parents[1]
        / "models"
        / "configs"
        / ("sdxl" if family_key == "sdxl" else "sd15")
    )
    return json.loads((folder / "unet.json").read_text())


def unet_names(family, unet_config: Mapping | None = None) -> UNetNames:
    """The name table of `family`'s UNet for `unet_config` (default: the real SD1.5 / SDXL one)."""
    family = family_of(family)
    config = dict(unet_config) if unet_config is not None else real_unet_config(family.key)
    return _unet_names(family.key, json.dumps(config, sort_keys=True, default=str))


@functools.lru_cache(maxsize=4)
def _unet_names(family_key: str, config_json: str) -> UNetNames:
    from diffusers import UNet2DConditionModel

    from ..models.ldm_layout import unet_module_paths_to_ldm

    family = family_of(family_key)
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(json.loads(config_json))
    path_of = {id(m): p for p, m in unet.named_modules()}
    modules = family.module_map(unet, ())
    paths = {name: path_of[id(m)] for name, m in modules.items()}
    ldm = unet_module_paths_to_ldm(list(paths.values()))
    return UNetNames(
        paths=paths,
        ldm_paths={name: ldm.get(p) for name, p in paths.items()},
        shapes={name: tuple(m.weight.shape) for name, m in modules.items()},
        aliases=family.name_aliases(unet),
    )


def te_kohya_name(part: str, path: str) -> str | None:
    """kohya name of text-encoder module `path` (`[text_model.]encoder.layers.N.<child>`) in `part`."""
    m = _TE_PATH.fullmatch(path)
    if not m:
        return None
    child = m[2].replace(".", "_")
    return f"lora_{part}_text_model_encoder_layers_{m[1]}_{child}"


def te_path(name: str) -> tuple[str, str] | None:
    """(part, `text_model.encoder.layers.N.<child>`) of a kohya text-encoder name, else None."""
    m = _TE_KOHYA.fullmatch(name)
    return (m[1], f"text_model.encoder.layers.{m[2]}.{TE_CHILDREN[m[3]]}") if m else None


# --------------------------------------------------------------------------- reading other dialects


@dataclass(frozen=True)
class ParsedKey:
    part: str  # "unet", "te" (one encoder, or which is not yet known), "te1", "te2"
    path: str  # diffusers UNet path, LDM/SGM path (ldm=True), or text-encoder path
    param: str  # kohya's param name
    ldm: bool = False
    component: str = ""  # the diffusers component it came from (unet, text_encoder, text_encoder_2)


def _split_param(key: str) -> tuple[str, str] | None:
    m = _PROCESSOR.fullmatch(key)
    if m:  # old attention processor: the module is in the param's name
        return f"{m[1]}.{m[2]}", f"lora_{m[3]}.weight"
    for suffix in _PARAM_SUFFIXES:
        if key.endswith("." + suffix):
            return key[: -len(suffix) - 1], PARAM_ALIASES.get(suffix, suffix)
    return None


def parse_key(key: str) -> ParsedKey | None:
    """Where a non-kohya LoRA tensor belongs, or None if lorakit does not know the key."""
    split = _split_param(key.removeprefix("base_model.model."))
    if split is None:
        return None
    module, param = split
    if module.startswith(COMFY_UNET):
        return ParsedKey("unet", module[len(COMFY_UNET) :], param, ldm=True, component="unet")
    m = re.fullmatch(r"text_encoders\.clip_([lgh])\.transformer\.(.+)", module)
    if m:
        part = {"l": "te", "g": "te2", "h": "te"}[m[1]]  # clip_h: SD2's one encoder
        return _te_key(part, m[2], param, "text_encoder_2" if part == "te2" else "text_encoder")
    m = re.fullmatch(r"(text_encoder|text_encoder_2)\.(.+)", module)
    if m:
        return _te_key("te2" if m[1] == "text_encoder_2" else "te", m[2], param, m[1])
    module = module.removeprefix("unet.")
    if module.startswith(_UNET_ROOTS):
        module = module.replace(".processor.", ".")
        if module.endswith(".to_out"):  # attention processors name to_out.0 `to_out`
            module += ".0"
        return ParsedKey("unet", module, param, component="unet")
    return None


def _te_key(part: str, path: str, param: str, component: str) -> ParsedKey | None:
    m = re.fullmatch(r"(.+)\.(to_q|to_k|to_v|to_out)", path)
    if m:  # old diffusers text-encoder attention: `self_attn.to_q_lora`
        path = f"{m[1].removesuffix('.self_attn')}.{_OLD_TE_ATTN[m[2]]}"
    if not _TE_PATH.fullmatch(path):
        return None
    return ParsedKey(part, path.removeprefix("text_model."), param, component=component)


def is_kohya_key(key: str) -> bool:
    return KOHYA_MODULE.fullmatch(key.split(".", 1)[0]) is not None


def needs_conversion(tensors: Mapping[str, torch.Tensor]) -> bool:
    """True if some tensor is a LoRA tensor in another tool's naming (to_kohya would rename it)."""
    return any(k.endswith(".magnitude") if is_kohya_key(k) else parse_key(k) is not None for k in tensors)


def _is_sdxl(parsed: list[ParsedKey], metadata: Mapping[str, str]) -> bool:
    if metadata.get("ss_base_model_version", "").startswith("sdxl_"):
        return True
    if metadata.get("modelspec.architecture", "").startswith("stable-diffusion-xl"):
        return True
    deep = re.compile(r"(.*transformer_blocks\.[1-9].*|add_embedding\..*|label_emb\..*)")
    return any(p.part == "te2" or (p.part == "unet" and deep.fullmatch(p.path)) for p in parsed)


def _kohya_unet_name(p: ParsedKey, table) -> str:
    name = f"lora_unet_{p.path.replace('.', '_')}"
    return table().aliases.get(name, name) if table is not None else name


def to_kohya(
    tensors: dict[str, torch.Tensor],
    metadata: Mapping[str, str] | None = None,
    family=None,
    unet_config: Mapping | None = None,
) -> dict[str, torch.Tensor]:
    """The tensors of a LoRA file in any dialect above, under kohya's names (lorakit's: SGM UNet names
    for SDXL). A kohya file comes back as it is (the same dict). `family` ("sd1"/"sdxl") and
    `unet_config` name the architecture when the keys and metadata cannot (default: detected, real)."""
    metadata = metadata or {}
    if all(is_kohya_key(k) and not k.endswith(".magnitude") for k in tensors):
        return tensors
    parsed: dict[str, ParsedKey] = {}
    unknown = []
    for key in tensors:
        if is_kohya_key(key):
            continue
        p = parse_key(key)
        if p is None:
            unknown.append(key)
        else:
            parsed[key] = p
    if unknown:
        raise ModelError(
            f"{len(unknown)} of {len(tensors)} tensors have names lorakit does not know as LoRA keys, e.g. "
            f"{', '.join(repr(k) for k in unknown[:5])}. lorakit reads kohya (`lora_unet_…`), diffusers/PEFT "
            "(`unet.….lora_A.weight`), ComfyUI (`diffusion_model.….lora_up.weight`) and ai-toolkit LoRAs "
            "for SD1.x and SDXL"
        )
    sdxl = (
        family_of(family).key == "sdxl" if family is not None else _is_sdxl(list(parsed.values()), metadata)
    )
    fam = family_of("sdxl" if sdxl else "sd1")
    # UNet names that need the architecture: diffusers paths on SDXL (SGM names are ours), LDM paths on SD1
    needs_table = any(p.part == "unet" and p.ldm != sdxl for p in parsed.values())
    table = functools.cache(lambda: unet_names(fam, unet_config)) if needs_table else None

    out: dict[str, torch.Tensor] = {}
    origin: dict[str, ParsedKey] = {}
    for key, tensor in tensors.items():
        if key not in parsed:
            name, _, param = key.partition(".")
            if param == "magnitude":  # ai-toolkit's DoRA: PEFT's per-output-row magnitude
                param, tensor = "dora_scale", tensor.reshape(-1, 1)
            out[f"{name}.{param}"] = tensor
            continue
        p = parsed[key]
        if p.part == "unet":
            name = _kohya_unet_name(p, table if p.ldm != sdxl else None)
        else:
            part = "te1" if (p.part == "te" and sdxl) else p.part
            name = te_kohya_name(part, p.path)
        new_key = f"{name}.{p.param}"
        if new_key in out:
            raise ModelError(f"LoRA tensors {key!r} and another one both name {new_key!r}")
        if p.param == "dora_scale" and tensor.dim() == 1:  # PEFT Linear magnitude (out,) -> (out, 1)
            tensor = tensor.reshape(-1, 1)
        elif p.param == "dora_scale" and tensor.dim() == 4 and tensor.shape[0] == 1:  # conv (1, out, 1, 1)
            tensor = tensor.transpose(0, 1)
        out[new_key] = tensor
        origin.setdefault(name, p)
    _fill_alphas(out, origin, metadata)
    return out


def _peft_configs(metadata: Mapping[str, str]) -> dict[str, dict]:
    """diffusers' lora_adapter_metadata, per component: {"unet": {"r": 4, "lora_alpha": 2, ...}}."""
    raw = metadata.get(ADAPTER_METADATA_KEY)
    if not raw:
        return {}
    try:
        flat = json.loads(raw)
    except ValueError as e:
        raise ModelError(f"the file's {ADAPTER_METADATA_KEY} metadata is not JSON ({e})") from None
    out: dict[str, dict] = {}
    for key, value in flat.items():
        component, _, field = key.partition(".")
        out.setdefault(component, {})[field] = value
    return out


def _pattern_value(patterns: Mapping[str, float], path: str):
    """A rank_pattern / alpha_pattern value for module `path`, matched as PEFT does (a key matches a
    module whose path ends with it at a '.' boundary)."""
    if path in patterns:
        return patterns[path]
    for key in sorted(patterns, key=len, reverse=True):
        if re.fullmatch(rf"(.*\.)?(?:{key})", path):
            return patterns[key]
    return None


def _fill_alphas(out: dict[str, torch.Tensor], origin: dict[str, ParsedKey], metadata) -> None:
    """An `alpha` for every converted module that has none: PEFT's lora_alpha (per module via alpha_pattern,
    times sqrt(r) under rsLoRA, whose scale is alpha/sqrt(r)), or the rank (diffusers' scale 1)."""
    configs = _peft_configs(metadata)
    for name, p in origin.items():
        down = out.get(f"{name}.lora_down.weight")
        if down is None or f"{name}.alpha" in out:
            continue
        rank = down.shape[0]
        alpha = float(rank)
        config = configs.get(p.component)
        if config and config.get("lora_alpha") is not None:
            path = p.path if p.part == "unet" else p.path.removeprefix("text_model.")
            alpha = _pattern_value(config.get("alpha_pattern") or {}, path)
            alpha = float(config["lora_alpha"] if alpha is None else alpha)
            if config.get("use_rslora"):
                alpha *= math.sqrt(rank)
        out[f"{name}.alpha"] = torch.tensor(alpha, dtype=down.dtype if down.is_floating_point() else None)
