"""Convert between the LDM single-file layout (A1111/kohya checkpoints) and diffusers/transformers keys.

LDM -> diffusers uses diffusers' own single-file converters. diffusers ships no reverse converter
in the package (only scripts/convert_diffusers_to_original_stable_diffusion.py, for SD1.5 shapes),
so the reverse is written here from the structure of the keys: it works for any block/channel config.
"""

from __future__ import annotations

import re

import torch
from diffusers.loaders.single_file_utils import (
    DIFFUSERS_TO_LDM_MAPPING,
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
)

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
TE_PREFIX = "cond_stage_model.transformer."
PREFIXES = (UNET_PREFIX, VAE_PREFIX, TE_PREFIX)

# Keys some LDM files carry that no model parameter corresponds to.
IGNORED_LDM_KEYS = (TE_PREFIX + "text_model.embeddings.position_ids",)

_UNET_FIXED = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
# SDXL's size/pooled-text embedding (label_emb in LDM); SD1 UNets have no add_embedding
_UNET_FIXED.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
_VAE_FIXED = dict(DIFFUSERS_TO_LDM_MAPPING["vae"])
_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "time_emb_proj": "emb_layers.1",
    "conv_shortcut": "skip_connection",
}
_VAE_ATTN = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def _rename_head(rest: str, table: dict[str, str]) -> str:
    """Rename the module part of 'module.param' (module names may contain dots, e.g. to_out.0)."""
    module, param = rest.rsplit(".", 1)
    if module not in table:
        raise KeyError(module)
    return f"{table[module]}.{param}"


# --------------------------------------------------------------------------- diffusers -> LDM


def _unet_key(key: str, layers: int, up_with_attn: set[int]) -> str:
    """One diffusers UNet key -> LDM name. `layers` = layers_per_block (up blocks have layers + 1)."""
    if key in _UNET_FIXED:
        return _UNET_FIXED[key]
    stride = layers + 1
    m = re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", key)
    if m:
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "resnets":
            return f"input_blocks.{1 + b * stride + j}.0.{_rename_head(rest, _UNET_RESNET)}"
        if kind == "attentions":
            return f"input_blocks.{1 + b * stride + j}.1.{rest}"
        return f"input_blocks.{(b + 1) * stride}.0.op.{rest.removeprefix('conv.')}"
    m = re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key)
    if m:
        kind, j, rest = m[1], int(m[2]), m[3]
        if kind == "resnets":
            return f"middle_block.{2 * j}.{_rename_head(rest, _UNET_RESNET)}"
        return f"middle_block.1.{rest}"
    m = re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", key)
    if m:
        b, kind, j, rest = int(m[1]), m[2], int(m[3]), m[4]
        if kind == "resnets":
            return f"output_blocks.{b * stride + j}.0.{_rename_head(rest, _UNET_RESNET)}"
        if kind == "attentions":
            return f"output_blocks.{b * stride + j}.1.{rest}"
        # the upsampler follows the resnet (.0) and, in cross-attention blocks, the transformer (.1)
        slot = 2 if b in up_with_attn else 1
        return f"output_blocks.{b * stride + layers}.{slot}.{rest}"
    raise KeyError(key)


def _unet_layout(keys) -> tuple[int, set[int]]:
    """(layers_per_block, up blocks with attention) of a UNet, read from its key names."""
    down = [int(m[1]) for k in keys if (m := re.match(r"down_blocks\.\d+\.resnets\.(\d+)\.", k))]
    up_with_attn = {int(m[1]) for k in keys if (m := re.match(r"up_blocks\.(\d+)\.attentions\.", k))}
    return (max(down) + 1 if down else 1), up_with_attn


def unet_to_ldm(unet_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers UNet2DConditionModel state dict -> LDM keys (without the model.diffusion_model. prefix)."""
    layers, up_with_attn = _unet_layout(unet_sd)
    out = {}
    for key, tensor in unet_sd.items():
        try:
            out[_unet_key(key, layers, up_with_attn)] = tensor
        except KeyError:
            raise ValueError(f"UNet key {key!r} has no SD1.x LDM equivalent") from None
    return out


def unet_module_paths_to_ldm(paths: list[str]) -> dict[str, str]:
    """diffusers UNet module path -> LDM module path (e.g. down_blocks.0.resnets.0.conv1 ->
    input_blocks.1.0.in_layers.2), for the paths that have one; `paths` are all the UNet's modules."""
    keys = [f"{p}.weight" for p in paths]
    layers, up_with_attn = _unet_layout(keys)
    out = {}
    for path, key in zip(paths, keys):
        try:
            out[path] = _unet_key(key, layers, up_with_attn).removesuffix(".weight")
        except KeyError:
            continue
    return out


def _vae_key(key: str, n_up: int) -> str:
    if key in _VAE_FIXED:
        return _VAE_FIXED[key]
    m = re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(resnets\.(\d+)|downsamplers\.0)\.(.+)", key)
    if m:
        i, rest = int(m[1]), m[4]
        if m[3] is not None:
            return f"encoder.down.{i}.block.{m[3]}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        return f"encoder.down.{i}.downsample.{rest}"
    m = re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(resnets\.(\d+)|upsamplers\.0)\.(.+)", key)
    if m:
        i, rest = n_up - 1 - int(m[1]), m[4]  # LDM numbers decoder blocks from the lowest resolution
        if m[3] is not None:
            return f"decoder.up.{i}.block.{m[3]}.{rest.replace('conv_shortcut', 'nin_shortcut')}"
        return f"decoder.up.{i}.upsample.{rest}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key)
    if m:
        return f"{m[1]}.mid.block_{int(m[2]) + 1}.{m[3].replace('conv_shortcut', 'nin_shortcut')}"
    m = re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)", key)
    if m:
        return f"{m[1]}.mid.attn_1.{_rename_head(m[2], _VAE_ATTN)}"
    raise KeyError(key)


def vae_to_ldm(vae_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """diffusers AutoencoderKL state dict -> LDM keys (without the first_stage_model. prefix)."""
    ups = [int(m[1]) for k in vae_sd if (m := re.match(r"decoder\.up_blocks\.(\d+)\.", k))]
    n_up = max(ups) + 1 if ups else 0
    out = {}
    for key, tensor in vae_sd.items():
        try:
            name = _vae_key(key, n_up)
        except KeyError:
            raise ValueError(f"VAE key {key!r} has no SD1.x LDM equivalent") from None
        if ".mid.attn_1." in name and name.endswith(".weight") and tensor.ndim == 2:
            tensor = tensor.reshape(*tensor.shape, 1, 1)  # LDM's attention projections are 1x1 convs
        out[name] = tensor
    return out


def te_to_ldm(te_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModel state dict -> LDM keys (without the cond_stage_model.transformer. prefix)."""
    out = {}
    for key, tensor in te_sd.items():
        if key.endswith("position_ids"):
            continue
        # transformers >= 5.6 drops the text_model wrapper; LDM files always have it
        out[key if key.startswith("text_model.") else "text_model." + key] = tensor
    return out


def to_ldm_state_dict(unet_sd: dict, vae_sd: dict, te_sd: dict) -> dict[str, torch.Tensor]:
    """Three diffusers/transformers state dicts -> one LDM single-file state dict."""
    out = {UNET_PREFIX + k: v for k, v in unet_to_ldm(unet_sd).items()}
    out.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(vae_sd).items()})
    out.update({TE_PREFIX + k: v for k, v in te_to_ldm(te_sd).items()})
    return out


# --------------------------------------------------------------------------- LDM -> diffusers


def fix_te_keys(ldm_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add the missing `text_model.` to old-style TE keys (as kohya does) and drop position_ids."""
    out = {}
    for key, tensor in ldm_sd.items():
        if key.startswith(TE_PREFIX) and not key.startswith(TE_PREFIX + "text_model."):
            key = TE_PREFIX + "text_model." + key[len(TE_PREFIX) :]
        if key.startswith(TE_PREFIX) and key.endswith("position_ids"):
            continue
        out[key] = tensor
    return out


def from_ldm_state_dict(ldm_sd: dict, unet_config: dict, vae_config: dict) -> tuple[dict, dict, dict]:
    """LDM single-file state dict -> (unet, vae, text encoder) state dicts, by diffusers' converters."""
    ldm_sd = fix_te_keys(ldm_sd)
    unet = convert_ldm_unet_checkpoint(ldm_sd, dict(unet_config))
    vae = convert_ldm_vae_checkpoint(
        {k: v for k, v in ldm_sd.items() if k.startswith(VAE_PREFIX)}, dict(vae_config)
    )
    te = convert_ldm_clip_checkpoint({k: v for k, v in ldm_sd.items() if k.startswith(TE_PREFIX)})
    return unet, vae, te
