"""SD1.x's noise schedule, shared by training (kohya's DDPM scheduler) and drawing (A1111's sigmas)."""

from __future__ import annotations

import torch

# DDPM "scaled_linear" betas 0.00085..0.012 over 1000 steps: what SD1.x was trained with, what kohya
# trains LoRAs with and what A1111 samples with. As diffusers scheduler config keys.
SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}


def sd_alphas_cumprod() -> torch.Tensor:
    """alpha_bar(t) for t = 0..999 as the SD checkpoint's own schedule computes it (LDM's
    make_beta_schedule: float64, then stored as float32), which is where A1111 takes its sigmas."""
    s = SD_SCHEDULE
    betas = torch.linspace(
        s["beta_start"] ** 0.5, s["beta_end"] ** 0.5, s["num_train_timesteps"], dtype=torch.float64
    )
    return torch.cumprod(1 - betas**2, dim=0).float()
