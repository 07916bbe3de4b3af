"""A VAE given apart from the base model (`vae = ...`), e.g. SDXL's fp16-fix VAE: a diffusers folder,
or one .safetensors/.ckpt in diffusers' or LDM's key layout (with or without `first_stage_model.`)."""

from __future__ import annotations

from pathlib import Path

import torch

from lorakit.errors import ModelError
from lorakit.models.checkpoint import read_state_dict

_EXPECTED = "a VAE .safetensors (diffusers or LDM keys) or a diffusers VAE folder with config.json"


def _diffusers_keys(state_dict: dict, config: dict) -> dict:
    """The VAE state dict in diffusers' layout, whichever layout the file uses."""
    if any(k.startswith("encoder.down_blocks.") for k in state_dict):
        return state_dict
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    return convert_ldm_vae_checkpoint(state_dict, dict(config))


def load_vae(path: str | Path, config: dict, dtype: torch.dtype = torch.float32):
    """An AutoencoderKL with the base model's `config` (its latent scaling kept) and the weights at `path`."""
    from diffusers import AutoencoderKL

    path = Path(path).expanduser()
    if not path.exists():
        raise ModelError(f"vae: {path} does not exist. Expected {_EXPECTED}.")
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"vae: {path} is a folder without config.json. Expected {_EXPECTED}.")
        try:
            vae = AutoencoderKL.from_pretrained(path, local_files_only=True, torch_dtype=dtype)
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelError(f"vae: {path}: could not load the diffusers VAE: {str(e)[:300]}") from e
        vae.register_to_config(scaling_factor=config.get("scaling_factor", vae.config.scaling_factor))
        return vae.eval()
    state_dict, _ = read_state_dict(path)
    state_dict = {k: v for k, v in state_dict.items() if not k.startswith(("model_ema.", "loss."))}
    if not any(k.startswith(("encoder.", "first_stage_model.encoder.")) for k in state_dict):
        raise ModelError(f"vae: {path} has no VAE encoder weights ('encoder.*'). Expected {_EXPECTED}.")
    vae = AutoencoderKL.from_config(config)
    try:
        sd = _diffusers_keys(state_dict, config)
        vae.load_state_dict({k: v.to(dtype) for k, v in sd.items()}, strict=True)
    except (RuntimeError, KeyError, ValueError) as e:
        raise ModelError(
            f"vae: {path} does not fit the base model's VAE ({str(e)[:300]}): give a VAE made for this "
            "model family"
        ) from e
    return vae.to(dtype).eval()
