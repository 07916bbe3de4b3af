"""Drawing through the model-family seam (any family: SDXL, SD1.x with CFG rescale or zero terminal SNR).

The model is called only through `family.predict(base, noisy, t, cond, size_ids)`, with the
prompt's and the negative prompt's Conditioning (context, pooled) and A1111's size numbers.
k-diffusion samplers use it through samplers.CFGDenoiser; DDIM, PLMS and UniPC through
`scheduler_sample`, a diffusers scheduler loop like the diffusers pipelines' own.
"""

from __future__ import annotations

import torch

from lorakit.models.families.base import Conditioning


class FamilyPredictor:
    """predict(x [n], t [n] or scalar) -> the model's outputs [2n] in float32: the n cond rows, then the
    n uncond rows. Equal token lengths run as one batch; different lengths run apart, as A1111 does
    without its pad_cond_uncond option (ComfyUI/Forge repeat the shorter one, which gives the same
    attention)."""

    def __init__(self, base, cond: Conditioning, uncond: Conditioning, size_ids: torch.Tensor):
        self.base, self.family = base, base.spec
        self.cond, self.uncond, self.size_ids = cond, uncond, size_ids
        self._inputs: tuple | None = None  # (n, device, conditioning...) made on the first step

    def _rows(self, c: Conditioning, n: int, device, dtype) -> Conditioning:
        pooled = None if c.pooled is None else c.pooled.expand(n, -1)
        return Conditioning(c.context.expand(n, -1, -1), pooled).to(device, dtype)

    def inputs(self, n: int, device) -> tuple:
        """(n, device, joint, cond, uncond, ids): the model's conditioning for n images, moved to the
        device once per draw (a host-to-device copy per step would block the GPU every step). joint: cond
        and uncond rows with their size ids as one batch, None when their token lengths differ."""
        if self._inputs is None or self._inputs[:2] != (n, device):
            dtype = self.base.unet.dtype
            ids = self.size_ids.expand(n, -1).to(device)
            cond = self._rows(self.cond, n, device, dtype)
            uncond = self._rows(self.uncond, n, device, dtype)
            joint = None
            if cond.context.shape[1] == uncond.context.shape[1]:
                pooled = None if cond.pooled is None else torch.cat([cond.pooled, uncond.pooled])
                joint = (
                    Conditioning(torch.cat([cond.context, uncond.context]), pooled),
                    torch.cat([ids, ids]),
                )
            self._inputs = (n, device, joint, cond, uncond, ids)
        return self._inputs

    def __call__(self, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        n, device, dtype = x.shape[0], x.device, self.base.unet.dtype
        t = torch.as_tensor(t, device=device)
        t = t.expand(n) if t.ndim == 0 else t
        _, _, joint, cond, uncond, ids = self.inputs(n, device)
        x = x.to(dtype)
        predict = self.family.predict
        if joint is not None:
            both, both_ids = joint
            out = predict(self.base, torch.cat([x, x]), torch.cat([t, t]), both, both_ids)
        else:
            out = torch.cat([predict(self.base, x, t, cond, ids), predict(self.base, x, t, uncond, ids)])
        return out.float()


def _guide(out: torch.Tensor, x: torch.Tensor, alpha_bar: torch.Tensor, p, prediction_type: str):
    """CFG on the model's outputs (eps or v), as the diffusers pipelines do; with CFG rescale, the same
    v-space rescale as the k-diffusion route (samplers.rescale_cfg) through the denoised images."""
    from .samplers import rescale_cfg

    cond, uncond = out.chunk(2)
    phi = getattr(p, "cfg_rescale", 0.0)
    if not phi:
        return uncond + p.cfg_scale * (cond - uncond)
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()

    def denoised(o):  # x0 of the DDPM-scaled x
        return (x - s * o) / a if prediction_type == "epsilon" else a * x - s * o

    sigma = (s / a).reshape(1).expand(x.shape[0])
    x0 = rescale_cfg(denoised(cond), denoised(uncond), x / a, sigma, p.cfg_scale, phi)
    return (x - a * x0) / s if prediction_type == "epsilon" else (a * x - x0) / s


def scheduler_sample(
    predict: FamilyPredictor,
    seeds: list[int],
    shape,
    p,
    prediction_type: str,
    alphas_cumprod,
    device,
    on_step=None,
    scheduler=None,
) -> torch.Tensor:
    """Latents for one batch of seeds with DDIM, PLMS or UniPC (diffusers' schedulers), in float32;
    the first latents are A1111's per-seed noise (p.rng's source), as on the k-diffusion route."""
    from .kdiffusion import SeededNoise
    from .samplers import make_scheduler

    if scheduler is None:  # a Generator passes the one it keeps; set_timesteps resets its state
        scheduler = make_scheduler(p.sampler, p.schedule_type, prediction_type, alphas_cumprod)
    scheduler.set_timesteps(p.steps, device=device)
    latents = SeededNoise(seeds, shape, device, getattr(p, "rng", "gpu")).next() * scheduler.init_noise_sigma
    timesteps = scheduler.timesteps
    # each step's alpha_bar (for CFG rescale), looked up once: int(t) per step would wait for the GPU
    alpha_bars = scheduler.alphas_cumprod[timesteps.cpu().long()].to(device)
    for i, t in enumerate(timesteps):
        x_in = scheduler.scale_model_input(latents, t)
        out = predict(x_in, t)
        guided = _guide(out, x_in, alpha_bars[i], p, prediction_type)
        latents = scheduler.step(guided, t, latents).prev_sample
        if on_step is not None:
            on_step(i + 1, len(timesteps))
    return latents
