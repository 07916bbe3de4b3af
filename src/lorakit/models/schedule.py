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


# A1111 (modules/sd_models.py rescale_zero_terminal_snr_abar) and ComfyUI/reForge set the last
# alpha_bar to this instead of 0, so sigma_max = sqrt((1 - a) / a) ~ 4518 stays finite for k-diffusion.
ZTSNR_LAST_ALPHA_BAR = 4.8973451890853435e-08


def zero_terminal_snr_alphas_cumprod(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """Lin et al. (2023)'s zero-terminal-SNR rescale of alpha_bar, as A1111 draws ztsnr models with it:
    shift sqrt(alpha_bar) so its last value is 0, scale so its first is kept, then the last alpha_bar
    is ZTSNR_LAST_ALPHA_BAR rather than 0."""
    sqrt_ab = alphas_cumprod.sqrt()  # in the model's float32, as A1111 computes it
    first, last = sqrt_ab[0].clone(), sqrt_ab[-1].clone()
    sqrt_ab = (sqrt_ab - last) * (first / (first - last))
    out = sqrt_ab**2
    out[-1] = ZTSNR_LAST_ALPHA_BAR
    return out


def draw_alphas_cumprod(zero_terminal_snr: bool = False) -> torch.Tensor:
    """The alpha_bar that drawing uses: SD's own (SD1.x and SDXL share it), zero-terminal-SNR rescaled
    for a model marked or trained so."""
    ac = sd_alphas_cumprod()
    return zero_terminal_snr_alphas_cumprod(ac) if zero_terminal_snr else ac
