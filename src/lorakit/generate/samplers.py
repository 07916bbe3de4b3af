"""A1111 sampler names -> how lorakit draws them, as A1111 (>= 1.9) does.

The k-diffusion samplers (Euler a ... DPM++ 2S a) run k-diffusion's algorithms (`kdiffusion.py`)
over A1111's sigma schedules, with A1111's per-seed noise (on the GPU or the CPU as its "RNG
source" says): an image depends only on its seed. DDIM,
PLMS and UniPC run diffusers' schedulers (A1111 runs its own ports of the original code).

A1111 >= 1.9 writes the schedule apart ("Sampler: DPM++ 2M, Schedule type: Karras"); older
versions fold it into the name ("DPM++ 2M Karras"). Both spellings are accepted. "Automatic" is
the sampler's own default schedule, as in A1111 (Karras for DPM++ 2M, for instance).
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from ..models.schedule import SD_SCHEDULE


@dataclass(frozen=True)
class KSampler:
    """A1111's samplers_k_diffusion entry: k-diffusion function and options."""

    function: str
    default_schedule: str = "Automatic"  # "Automatic" here: the model's own (uniform in t) sigmas
    discard_penultimate_sigma: bool = False
    brownian_noise: bool = False


K_SAMPLERS: dict[str, KSampler] = {
    "Euler a": KSampler("sample_euler_ancestral"),
    "Euler": KSampler("sample_euler"),
    "LMS": KSampler("sample_lms"),
    "Heun": KSampler("sample_heun"),
    "DPM2": KSampler("sample_dpm_2", "Karras", discard_penultimate_sigma=True),
    "DPM2 a": KSampler("sample_dpm_2_ancestral", "Karras", discard_penultimate_sigma=True),
    "DPM++ 2M": KSampler("sample_dpmpp_2m", "Karras"),
    "DPM++ 2M SDE": KSampler("sample_dpmpp_2m_sde", "Exponential", brownian_noise=True),
    "DPM++ SDE": KSampler("sample_dpmpp_sde", "Karras", brownian_noise=True),
    "DPM++ 2S a": KSampler("sample_dpmpp_2s_ancestral", "Karras"),
}
# name -> (diffusers class name, extra config, schedule types it accepts)
DIFFUSERS_SAMPLERS: dict[str, tuple[str, dict, tuple[str, ...]]] = {
    "DDIM": ("DDIMScheduler", {"set_alpha_to_one": False, "clip_sample": False}, ("Automatic",)),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}, ("Automatic",)),
    "UniPC": ("UniPCMultistepScheduler", {}, ("Automatic", "Karras")),
}
SAMPLERS = [*K_SAMPLERS, *DIFFUSERS_SAMPLERS]
SCHEDULE_TYPES = ("Automatic", "Uniform", "Karras", "Exponential")
# kohya's sample_prompts names (--ss), lower case
KOHYA_NAMES = {
    "ddim": "DDIM",
    "pndm": "PLMS",
    "lms": "LMS",
    "k_lms": "LMS",
    "euler": "Euler",
    "k_euler": "Euler",
    "euler_a": "Euler a",
    "k_euler_a": "Euler a",
    "heun": "Heun",
    "k_heun": "Heun",
    "dpm_2": "DPM2",
    "k_dpm_2": "DPM2",
    "dpm_2_a": "DPM2 a",
    "k_dpm_2_a": "DPM2 a",
    "dpmsolver": "DPM++ 2M",
    "dpmsolver++": "DPM++ 2M",
    "dpmsingle": "DPM++ 2S a",
}


def _schedules_of(name: str) -> tuple[str, ...]:
    return SCHEDULE_TYPES if name in K_SAMPLERS else DIFFUSERS_SAMPLERS[name][2]


def all_names() -> list[str]:
    """Every sampler name accepted, as A1111's dropdown lists them."""
    return SAMPLERS + [f"{n} Karras" for n in SAMPLERS if "Karras" in _schedules_of(n)]


def split_name(name: str, schedule_type: str | None = None) -> tuple[str, str]:
    """'DPM++ 2M Karras' -> ('DPM++ 2M', 'Karras'); kohya's 'euler_a' -> ('Euler a', 'Automatic')."""
    name = name.strip()
    schedule = schedule_type or "Automatic"
    if name.lower() in KOHYA_NAMES:
        return KOHYA_NAMES[name.lower()], schedule
    for suffix in ("Karras", "Exponential"):  # A1111 < 1.9 names
        if name.endswith(f" {suffix}") and name[: -len(suffix) - 1] in SAMPLERS:
            name, schedule = name[: -len(suffix) - 1], suffix
    if name not in SAMPLERS:
        close = difflib.get_close_matches(name, all_names(), n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"sampler {name!r} is unknown.{hint} Known: {', '.join(all_names())}")
    if schedule not in SCHEDULE_TYPES:
        raise ConfigError(f"schedule type {schedule!r} is unknown; use one of {', '.join(SCHEDULE_TYPES)}")
    if schedule not in _schedules_of(name):
        raise ConfigError(
            f"sampler {name!r} has no {schedule} schedule; use {', '.join(_schedules_of(name))}"
        )
    return name, schedule


def resolve(name: str, schedule_type: str | None = None) -> tuple[str, str]:
    """(sampler, schedule) with "Automatic" replaced by the sampler's default, as A1111 does."""
    base, schedule = split_name(name, schedule_type)
    if schedule == "Automatic" and base in K_SAMPLERS:
        schedule = K_SAMPLERS[base].default_schedule
    return base, schedule


def display_name(name: str, schedule_type: str | None = None) -> tuple[str, str | None]:
    """(Sampler, Schedule type) as A1111 >= 1.9 writes them into PNG info (none for the model's own)."""
    base, schedule = resolve(name, schedule_type)
    return base, (schedule if schedule != "Automatic" else None)


def make_scheduler(
    name: str, schedule_type: str | None = None, prediction_type: str = "epsilon", alphas_cumprod=None
):
    """A fresh diffusers scheduler for DDIM, PLMS or UniPC; `alphas_cumprod` (a zero-terminal-SNR
    schedule) replaces SD's own, as A1111's samplers take the model's alphas_cumprod."""
    import diffusers

    base, schedule = split_name(name, schedule_type)
    cls_name, extra, _ = DIFFUSERS_SAMPLERS[base]
    config = {**SD_SCHEDULE, **extra, "prediction_type": prediction_type}
    if alphas_cumprod is not None:
        ac = alphas_cumprod.double()
        config["trained_betas"] = (1 - ac / torch.cat([ac.new_ones(1), ac[:-1]])).tolist()
    if schedule == "Karras":
        config["use_karras_sigmas"] = True
    config["steps_offset"] = 1  # as in SD1.5's own scheduler config (diffusers warns otherwise)
    return getattr(diffusers, cls_name).from_config(config)


def is_k_sampler(name: str, schedule_type: str | None = None) -> bool:
    return split_name(name, schedule_type)[0] in K_SAMPLERS


# --- the k-diffusion route ----------------------------------------------------------------------


def k_sigmas(name: str, schedule_type: str | None, steps: int, alphas_cumprod=None) -> torch.Tensor:
    """A1111's KDiffusionSampler.get_sigmas: steps + 1 sigmas ending in 0 (float32, CPU), from SD's
    alphas_cumprod (SD1.x and SDXL) or the one given (zero terminal SNR)."""
    from ..models.schedule import sd_alphas_cumprod
    from . import kdiffusion as K

    base, schedule = resolve(name, schedule_type)
    spec = K_SAMPLERS[base]
    model = K.DiscreteSchedule(sd_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod)
    n = steps + 1 if spec.discard_penultimate_sigma else steps
    if schedule == "Karras":
        sigmas = K.karras_sigmas(n, model.sigma_min, model.sigma_max)
    elif schedule == "Exponential":
        sigmas = K.exponential_sigmas(n, model.sigma_min, model.sigma_max)
    else:  # Automatic without a default of its own, or Uniform: the model's sigmas
        sigmas = model.get_sigmas(n)
    if spec.discard_penultimate_sigma:
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    return sigmas


class CFGDenoiser:
    """The UNet as k-diffusion's denoiser D(x, sigma) (CompVisDenoiser, or CompVisVDenoiser for
    v-prediction) with A1111's classifier-free guidance on the denoised images; cond and uncond run
    as one batch. Sampling runs in float32 whatever the UNet's dtype.

    predict(x_in [n], t [n]) -> model outputs [2n] (cond rows, then uncond rows), float32: a model
    family's own call (lorakit.generate.family_draw); None calls an SD1.x UNet with cond/uncond
    context tensors. cfg_rescale: reForge's / Forge's RescaleCFG phi (0: plain CFG)."""

    def __init__(
        self,
        unet,
        cond,
        uncond,
        cfg_scale: float,
        prediction_type: str = "epsilon",
        *,
        alphas_cumprod=None,
        cfg_rescale: float = 0.0,
        predict=None,
    ):
        from ..models.schedule import sd_alphas_cumprod
        from .kdiffusion import DiscreteSchedule

        self.unet, self.cfg_scale, self.prediction_type = unet, cfg_scale, prediction_type
        self.schedule = DiscreteSchedule(sd_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod)
        self.cond, self.uncond = cond, uncond
        self.cfg_rescale, self.predict = cfg_rescale, predict
        self._context: torch.Tensor | None = None  # cond + uncond rows on the UNet's device, made once

    def context(self, n: int, device) -> torch.Tensor:
        """[2n] context rows (cond, then uncond) in the UNet's dtype on `device`, built on the first step
        only: a host-to-device copy per step would block the GPU every step."""
        if self._context is None or self._context.shape[0] != 2 * n or self._context.device != device:
            context = torch.cat([self.cond.expand(n, -1, -1), self.uncond.expand(n, -1, -1)])
            self._context = context.to(device, self.unet.dtype)
        return self._context

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        sigma = sigma.to(x.device, torch.float32)
        c_in = (sigma**2 + 1) ** -0.5
        t = self.schedule.sigma_to_t(sigma)
        if self.predict is not None:
            out = self.predict(x * c_in[:, None, None, None], t)
        else:
            x_in = torch.cat([x * c_in[:, None, None, None]] * 2)
            context = self.context(n, x.device)
            out = self.unet(
                x_in.to(context.dtype), torch.cat([t, t]), encoder_hidden_states=context
            ).sample.float()
        s, xx = torch.cat([sigma, sigma])[:, None, None, None], torch.cat([x, x])
        if self.prediction_type == "v_prediction":
            denoised = out * (-s * (s**2 + 1) ** -0.5) + xx / (s**2 + 1)
        else:
            denoised = xx - s * out
        cond, uncond = denoised.chunk(2)
        if self.cfg_rescale:
            return rescale_cfg(cond, uncond, x, sigma, self.cfg_scale, self.cfg_rescale)
        return uncond + (cond - uncond) * self.cfg_scale


def rescale_cfg(cond, uncond, x, sigma, cfg_scale: float, phi: float) -> torch.Tensor:
    """The guided denoised image with CFG rescale (Lin et al. 2023, eq. 15-16) as ComfyUI's RescaleCFG,
    reForge and Forge apply it: in v space, the guided v rescaled to the std of the conditional v (per
    image), mixed by phi with the plain guided v; back to a denoised image. cond/uncond: denoised [n],
    x: the noisy latents, sigma [n] (k-diffusion's, > 0)."""
    s = sigma.view(-1, *([1] * (x.ndim - 1)))
    x_scaled = x / (s * s + 1)

    def to_v(denoised):
        return (x_scaled - denoised) * (s * s + 1) ** 0.5 / s

    v_cond, v_uncond = to_v(cond), to_v(uncond)
    v_cfg = v_uncond + cfg_scale * (v_cond - v_uncond)
    dims = tuple(range(1, x.ndim))
    v_rescaled = v_cfg * (v_cond.std(dim=dims, keepdim=True) / v_cfg.std(dim=dims, keepdim=True))
    v_final = phi * v_rescaled + (1 - phi) * v_cfg
    return x_scaled - v_final * s / (s * s + 1) ** 0.5


def k_sample(
    unet,
    cond,
    uncond,
    seeds: list[int],
    shape,
    p,
    prediction_type: str = "epsilon",
    on_step=None,
    *,
    alphas_cumprod=None,
    predict=None,
) -> torch.Tensor:
    """Latents for one batch of seeds with a k-diffusion sampler, as A1111 draws them, the noise from
    p.rng (A1111's RNG source, kdiffusion.noise_device). on_step(done, total) after each sampling step
    (from host values, so reporting progress never waits for the GPU).
    alphas_cumprod / predict: see CFGDenoiser (a zero-terminal-SNR schedule, a family's model call)."""
    from . import kdiffusion as K

    base, _ = split_name(p.sampler, p.schedule_type)
    spec = K_SAMPLERS[base]
    device = unet.device
    rng_source = getattr(p, "rng", "gpu")
    sigmas = k_sigmas(p.sampler, p.schedule_type, p.steps, alphas_cumprod)
    rng = K.SeededNoise(seeds, shape, device, rng_source)
    x = rng.next() * sigmas[0]
    noise = K.BrownianNoise(seeds, shape, sigmas, device, rng_source) if spec.brownian_noise else rng
    model = CFGDenoiser(
        unet,
        cond,
        uncond,
        p.cfg_scale,
        prediction_type,
        alphas_cumprod=alphas_cumprod,
        cfg_rescale=getattr(p, "cfg_rescale", 0.0),
        predict=predict,
    )
    total = len(sigmas) - 1
    callback = (lambda done: on_step(done, total)) if on_step is not None else None
    return getattr(K, spec.function)(model, x, sigmas, noise, callback=callback)
