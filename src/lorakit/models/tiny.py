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
