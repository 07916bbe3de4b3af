"""SDXL's single-file (SGM, Stability's generative-models) layout <-> diffusers/transformers keys.

SGM -> diffusers uses diffusers' own single-file converters. The reverse reuses ldm_layout for the
UNet and VAE (SGM names them as LDM does, plus `label_emb`), keeps CLIP-L in HF layout, and writes
OpenCLIP bigG's layout here: q/k/v stacked into `in_proj_weight`, and `text_projection` as OpenCLIP
stores it, the (width, embed_dim) matrix P with pooled = x_eos @ P, i.e. the transpose of HF's
Linear weight (diffusers transposes when loading, `convert_open_clip_checkpoint`).
"""

from __future__ import annotations

import torch
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)

from lorakit.models import ldm_layout

UNET_PREFIX = ldm_layout.UNET_PREFIX  # model.diffusion_model.
VAE_PREFIX = ldm_layout.VAE_PREFIX  # first_stage_model.
TE1_PREFIX = "conditioner.embedders.0.transformer."  # CLIP-L, HF layout
TE2_PREFIX = "conditioner.embedders.1.model."  # OpenCLIP bigG, OpenCLIP layout
PREFIXES = (UNET_PREFIX, VAE_PREFIX, TE1_PREFIX, TE2_PREFIX)

# Keys SGM files may carry that no parameter corresponds to (kohya keeps logit_scale to write it back;
# ComfyUI-saved files have position_ids; v-pred markers are empty tensors outside every prefix)
IGNORED_KEYS = (TE1_PREFIX + "text_model.embeddings.position_ids", TE2_PREFIX + "logit_scale")

_TE2_FIXED = {  # HF key (inside text_model.) -> OpenCLIP key
    "embeddings.token_embedding.weight": "token_embedding.weight",
    "embeddings.position_embedding.weight": "positional_embedding",
    "final_layer_norm.weight": "ln_final.weight",
    "final_layer_norm.bias": "ln_final.bias",
}
_TE2_LAYER = {
    "layer_norm1": "ln_1",
    "layer_norm2": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
    "self_attn.out_proj": "attn.out_proj",
}


# --------------------------------------------------------------------------- diffusers -> SGM


def te2_to_open_clip(te2_sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """transformers CLIPTextModelWithProjection state dict -> OpenCLIP keys (without the SGM prefix)."""
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in te2_sd.items():
        if key.endswith("position_ids"):
            continue
        if key == "text_projection.weight":
            out["text_projection"] = tensor.T.contiguous()  # OpenCLIP: x @ P; HF Linear: x @ W.T
            continue
        inner = key.removeprefix("text_model.")
        if inner in _TE2_FIXED:
            out[_TE2_FIXED[inner]] = tensor
            continue
        layer, rest = inner.removeprefix("encoder.layers.").split(".", 1)
        module, param = rest.rsplit(".", 1)
        if module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            qkv.setdefault((int(layer), param), {})[module[-6]] = tensor
        elif module in _TE2_LAYER:
            out[f"transformer.resblocks.{layer}.{_TE2_LAYER[module]}.{param}"] = tensor
        else:
            raise ValueError(f"text encoder 2 key {key!r} has no OpenCLIP equivalent")
    for (layer, param), parts in qkv.items():
        out[f"transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([parts[c] for c in "qkv"])
    return out


def to_sgm_state_dict(
    unet_sd: dict, vae_sd: dict, te1_sd: dict, te2_sd: dict, logit_scale: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Four diffusers/transformers state dicts -> one SGM single-file state dict (as SAI/kohya save)."""
    out = {UNET_PREFIX + k: v for k, v in ldm_layout.unet_to_ldm(unet_sd).items()}
    out.update({VAE_PREFIX + k: v for k, v in ldm_layout.vae_to_ldm(vae_sd).items()})
    out.update({TE1_PREFIX + k: v for k, v in ldm_layout.te_to_ldm(te1_sd).items()})
    out.update({TE2_PREFIX + k: v for k, v in te2_to_open_clip(te2_sd).items()})
    if logit_scale is not None:
        out[TE2_PREFIX + "logit_scale"] = logit_scale
    return out


# --------------------------------------------------------------------------- SGM -> diffusers


class _HiddenSize:  # what convert_open_clip_checkpoint reads from the model when text_projection is absent
    def __init__(self, hidden_size: int):
        self.config = type("Config", (), {"hidden_size": hidden_size})()


def from_sgm_state_dict(sgm_sd: dict, arch: dict) -> tuple[dict, dict, dict, dict]:
    """SGM single-file state dict -> (unet, vae, text_encoder_1, text_encoder_2) state dicts, by
    diffusers' converters (bigG's text_projection transposed to HF's Linear orientation there)."""
    unet = convert_ldm_unet_checkpoint(sgm_sd, dict(arch["unet"]))
    vae = convert_ldm_vae_checkpoint(
        {k: v for k, v in sgm_sd.items() if k.startswith(VAE_PREFIX)}, dict(arch["vae"])
    )
    te1 = convert_ldm_clip_checkpoint(
        {k: v for k, v in sgm_sd.items() if k.startswith(TE1_PREFIX) and k not in IGNORED_KEYS}
    )
    te2_sd = {k: v for k, v in sgm_sd.items() if k.startswith(TE2_PREFIX)}
    hidden = arch["text_encoder_2"]["hidden_size"]
    te2 = convert_open_clip_checkpoint(_HiddenSize(hidden), te2_sd, prefix=TE2_PREFIX)
    return unet, vae, te1, te2
