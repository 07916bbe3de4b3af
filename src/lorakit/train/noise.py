"""kohya's noise schedule, timestep sampling, targets and loss weights.

All randomness of a step is drawn from the run's one generator (on the device), reseeded by
(seed, step, rank) before each step, so a resumed run draws exactly what the uninterrupted run drew.
"""

from __future__ import annotations

import torch


def noise_scheduler(v_parameterization: bool = False, zero_terminal_snr: bool = False):
    """DDPM scaled_linear 0.00085-0.012 over 1000 steps, as kohya trains SD1.x and SDXL; with
    zero_terminal_snr the betas rescaled so the last step is pure noise (kohya's
    fix_noise_scheduler_betas_for_zero_terminal_snr is the same rescale as diffusers')."""
    from diffusers import DDPMScheduler

    from ..models.schedule import SD_SCHEDULE

    return DDPMScheduler(
        **SD_SCHEDULE,
        clip_sample=False,
        prediction_type="v_prediction" if v_parameterization else "epsilon",
        rescale_betas_zero_snr=zero_terminal_snr,
    )


NOISE, POSTERIOR = 0, 1  # a step's streams: diffusion noise and timesteps; the VAE posterior sample


def step_seed(seed: int, step: int, rank: int, stream: int = NOISE) -> int:
    return (seed * 1_000_003 + step * 7919 + rank + stream * 0x9E3779B97F4A7C15) % (2**63)


def reseed(
    generator: torch.Generator, seed: int, step: int, rank: int, stream: int = NOISE
) -> torch.Generator:
    """A run's generator set to the stream of (seed, step, rank): the same numbers as a new generator
    with that seed, without creating one per step (a reseed is host-side: no GPU sync). The posterior
    sample of an uncached run has its own stream, so its noise and timesteps are a cached run's."""
    generator.manual_seed(step_seed(seed, step, rank, stream))
    return generator


def step_generator(seed: int, step: int, rank: int, device: torch.device) -> torch.Generator:
    return reseed(torch.Generator(device=device), seed, step, rank)


def noisy_latents(
    scheduler,
    latents: torch.Tensor,
    generator: torch.Generator,
    noise_offset: float | None = None,
    timestep: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(noisy latents, noise, timesteps): t uniform in 0..999 like kohya, or `timestep` for every
    sample (the validation loss: no timestep is drawn, so the noise stream is the same)."""
    b, c = latents.shape[:2]
    noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if noise_offset:
        offset = torch.randn((b, c, 1, 1), generator=generator, device=latents.device, dtype=latents.dtype)
        noise = noise + noise_offset * offset
    if timestep is not None:
        t = torch.full((b,), int(timestep), dtype=torch.long, device=latents.device)
    else:
        t = torch.randint(
            0, scheduler.config.num_train_timesteps, (b,), generator=generator, device=latents.device
        ).long()
    return scheduler.add_noise(latents, noise, t), noise, t


def target_of(
    scheduler, latents: torch.Tensor, noise: torch.Tensor, t: torch.Tensor, v_parameterization: bool
):
    return scheduler.get_velocity(latents, noise, t) if v_parameterization else noise


def snr_table(scheduler) -> torch.Tensor:
    """SNR(t) = alpha_bar / (1 - alpha_bar) for every training timestep."""
    ac = scheduler.alphas_cumprod
    return ac / (1 - ac)


def min_snr_weights(
    snr: torch.Tensor, t: torch.Tensor, gamma: float, v_parameterization: bool
) -> torch.Tensor:
    """kohya's apply_snr_weight: min(snr, gamma) / snr (v-prediction: / (snr + 1))."""
    s = _on(snr, t.device)[t]
    clipped = torch.clamp(s, max=gamma)
    if v_parameterization:
        return clipped / (s + 1)
    # zero terminal SNR makes s = 0 at the last step, where min(s, gamma) / s tends to 1
    return torch.where(s > 0, clipped / s.clamp(min=torch.finfo(s.dtype).tiny), torch.ones_like(s))


def v_pred_like_noise_pred_weights(snr: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """kohya's scale_v_prediction_loss_like_noise_prediction: SNR / (SNR + 1)."""
    s = _on(snr, t.device)[t]
    return s / (s + 1)


def per_sample_loss(
    pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """MSE over C,H,W in fp32, one value per sample. With `mask` [B, 1, h, w] in [0, 1] (area-resized
    to the loss's size if it differs, as kohya's apply_masked_loss does) the per-pixel error is
    weighed by it and normalised by the mask's area: sum(mask * err) / sum(mask). kohya instead
    averages mask * err over all pixels, so a small mask there also means a small loss. An empty
    mask gives a loss of 0."""
    err = torch.nn.functional.mse_loss(pred.float(), target.float(), reduction="none")
    if mask is None:
        return err.mean(dim=(1, 2, 3))
    from ..dataset.images import mask_to_latent_size

    m = mask_to_latent_size(_on(mask, err.device).float(), tuple(err.shape[2:]))
    area = m.sum(dim=(1, 2, 3)) * err.shape[1]  # the mask covers every channel
    return (err * m).sum(dim=(1, 2, 3)) / area.clamp(min=torch.finfo(torch.float32).tiny)


def _on(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """`t` on `device`; the step's tensors are there already (moved before the step), so no copy."""
    return t if t.device == device else t.to(device)
