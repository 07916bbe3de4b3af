"""Tiny SD1.x-family models for tests and dry runs: same layout and key names as SD1.5, tiny widths.

The text encoder keeps the real 49408-token vocabulary so the real tokenizer works with it, and the
VAE keeps SD's 8x downscale (4 blocks), so a 64x64 image gives 8x8 latents.
"""

from __future__ import annotations

import copy

import torch

_TINY_ARCH = {
    "unet": {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "attention_head_dim": 8,
        "block_out_channels": [32, 64],
        "center_input_sample": False,
        "cross_attention_dim": 32,
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 1,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "sample_size": 8,
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    },
    "vae": {
        "_class_name": "AutoencoderKL",
        "act_fn": "silu",
        "block_out_channels": [8, 16, 16, 16],
        "down_block_types": ["DownEncoderBlock2D"] * 4,
        "in_channels": 3,
        "latent_channels": 4,
        "layers_per_block": 1,
        "norm_num_groups": 8,
        "out_channels": 3,
        "sample_size": 64,
        "scaling_factor": 0.18215,
        "up_block_types": ["UpDecoderBlock2D"] * 4,
    },
    "text_encoder": {
        "architectures": ["CLIPTextModel"],
        "attention_dropout": 0.0,
        "bos_token_id": 0,
        "dropout": 0.0,
        "eos_token_id": 2,
        "hidden_act": "quick_gelu",
        "hidden_size": 32,
        "initializer_factor": 1.0,
        "initializer_range": 0.02,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-05,
        "max_position_embeddings": 77,
        "model_type": "clip_text_model",
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "pad_token_id": 1,
        "projection_dim": 32,
        "vocab_size": 49408,
    },
}


def tiny_arch() -> dict:
    """Configs {"unet", "vae", "text_encoder"} of a tiny SD1.x-family model (a fresh copy)."""
    return copy.deepcopy(_TINY_ARCH)


def build_models(arch: dict | None = None, seed: int = 0):
    """(unet, vae, text_encoder) built from `arch` (default tiny_arch()) with a seeded random init."""
    from lorakit.models.loader import build_from_arch

    with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
        torch.manual_seed(seed)
        unet, vae, te = build_from_arch(arch or tiny_arch())
    return unet.eval(), vae.eval(), te.eval()


def tiny_sdxl_arch() -> dict:
    """Configs of a tiny SDXL-shaped model: SGM layout (UNet levels without then with attention, 2
    resnets per level, transformer depth 1 then 2, linear proj_in/out, text_time size embedding of
    6 x 256), two CLIP text encoders with the real vocabulary (TE2 with projection, gelu). Widths are
    shrunk: context = TE1 32 + TE2 48 = 80 (SDXL: 768 + 1280 = 2048), vector = 48 + 6 x 256 = 1584
    (SDXL: 1280 + 1536 = 2816). TE1 and TE2 differ in width as in SDXL (diffusers tells them apart by it)."""
    from lorakit.models.families.sdxl import VAE_SCALE_FACTOR

    te1 = dict(_TINY_ARCH["text_encoder"], hidden_size=32)
    te2 = dict(
        _TINY_ARCH["text_encoder"],
        architectures=["CLIPTextModelWithProjection"],
        hidden_act="gelu",
        hidden_size=48,
        intermediate_size=96,
        num_attention_heads=4,
        projection_dim=48,
    )
    unet = {
        "_class_name": "UNet2DConditionModel",
        "act_fn": "silu",
        "addition_embed_type": "text_time",
        "addition_time_embed_dim": 256,
        "attention_head_dim": [1, 2],
        "block_out_channels": [32, 64],
        "center_input_sample": False,
        "cross_attention_dim": te1["hidden_size"] + te2["hidden_size"],
        "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
        "downsample_padding": 1,
        "flip_sin_to_cos": True,
        "freq_shift": 0,
        "in_channels": 4,
        "layers_per_block": 2,
        "mid_block_scale_factor": 1,
        "norm_eps": 1e-05,
        "norm_num_groups": 32,
        "out_channels": 4,
        "projection_class_embeddings_input_dim": te2["projection_dim"] + 6 * 256,
        "sample_size": 8,
        "transformer_layers_per_block": [1, 2],
        "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
        "use_linear_projection": True,
    }
    vae = dict(_TINY_ARCH["vae"], scaling_factor=VAE_SCALE_FACTOR)
    return copy.deepcopy({"unet": unet, "vae": vae, "text_encoder": te1, "text_encoder_2": te2})


def build_sdxl_models(arch: dict | None = None, seed: int = 0):
    """(unet, vae, text_encoder_1, text_encoder_2) of `arch` (default tiny_sdxl_arch()), seeded."""
    from lorakit.models.families.sdxl import build_sdxl

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        models = build_sdxl(arch or tiny_sdxl_arch())
    return tuple(m.eval() for m in models)
