"""k-diffusion's samplers and sigma schedules, as A1111 runs them for SD1.x.

The sampling algorithms below are ported from Katherine Crowson's k-diffusion
(https://github.com/crowsonkb/k-diffusion, k_diffusion/sampling.py and external.py, v0.1.1;
MIT License, Copyright (c) 2022 Katherine Crowson), which A1111 runs. The PyPI package is not a
dependency: importing any part of it imports torchvision, clean-fid, kornia, wandb and more.

Each sampler is a plain function over (model, x, sigmas, noise): `model(x, sigma)` returns the
denoised x; `noise(sigma, sigma_next)` returns fresh unit noise shaped like x. Noise never comes
from torch's global RNG: A1111's seeded per-image generators, or its seeded Brownian trees, on the
device A1111's "RNG source" names (noise_device). `callback(steps_done)` after each step.
"""

from __future__ import annotations

import warnings

import torch

from .params import RNG_SOURCES  # A1111's "Random number generator source" (its "NV" is not drawn here)

# --- sigma schedules ----------------------------------------------------------------------------


class DiscreteSchedule:
    """k-diffusion's DiscreteEpsDDPMDenoiser schedule: sigma(t) = sqrt((1 - alpha_bar) / alpha_bar)
    for the 1000 training timesteps, with A1111's non-quantized (interpolated) sigma -> t."""

    def __init__(self, alphas_cumprod: torch.Tensor):
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod) ** 0.5
        self.log_sigmas = self.sigmas.log()
        self._on_device: dict[torch.device, torch.Tensor] = {}

    @property
    def sigma_min(self) -> float:
        return self.sigmas[0].item()

    @property
    def sigma_max(self) -> float:
        return self.sigmas[-1].item()

    def get_sigmas(self, n: int) -> torch.Tensor:
        """n sigmas evenly spaced in t from 999 to 0, then 0 (A1111's default and 'Uniform')."""
        t = torch.linspace(len(self.sigmas) - 1, 0, n)
        return _append_zero(self.t_to_sigma(t))

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = t.float()
        low, high, w = t.floor().long(), t.ceil().long(), t.frac()
        return ((1 - w) * self.log_sigmas[low] + w * self.log_sigmas[high]).exp()

    def log_sigmas_on(self, device) -> torch.Tensor:
        """log_sigmas on `device`, copied there once (a copy per step would block the GPU every step);
        non_blocking: the host keeps queueing work (the source lives as long as this schedule)."""
        device = torch.device(device)
        if device not in self._on_device:
            self._on_device[device] = self.log_sigmas.to(device, non_blocking=True)
        return self._on_device[device]

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        log_sigmas = self.log_sigmas_on(sigma.device)
        log_sigma = sigma.log()
        dists = log_sigma - log_sigmas[:, None]
        low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        return ((1 - w) * low_idx + w * high_idx).view(sigma.shape)


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0) -> torch.Tensor:
    """Karras et al. (2022)'s schedule."""
    ramp = torch.linspace(0, 1, n)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return _append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """Evenly spaced in log sigma."""
    import math

    return _append_zero(torch.linspace(math.log(sigma_max), math.log(sigma_min), n).exp())


def _append_zero(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, x.new_zeros([1])])


# --- noise sources ------------------------------------------------------------------------------


def noise_device(device, rng: str = "gpu") -> torch.device:
    """Where A1111 (modules/rng.py) draws a seed's noise: on the drawing device for its default "GPU"
    source, on the CPU for "CPU" (and always on Apple's MPS). On a CPU-only machine both are the CPU,
    so the two sources give the same images there."""
    if rng not in RNG_SOURCES:
        raise ValueError(f"RNG source {rng!r}: use one of {', '.join(RNG_SOURCES)}")
    device = torch.device(device)
    return torch.device("cpu") if rng == "cpu" or device.type == "mps" else device


class SeededNoise:
    """A1111's ImageRNG: one generator per image seed, on the device its RNG source names
    (noise_device). Its first draw is the image's initial latent, later draws are an ancestral
    sampler's noise, so an image depends only on its seed (and the RNG source): not on the batch or
    torch's global RNG. With the "GPU" source on CUDA nothing is drawn on the host during sampling."""

    def __init__(self, seeds: list[int], shape: tuple[int, ...], device, rng: str = "gpu"):
        self.source = noise_device(device, rng)
        self.generators = [torch.Generator(self.source).manual_seed(int(s)) for s in seeds]
        self.shape, self.device = tuple(shape), torch.device(device)

    def next(self) -> torch.Tensor:
        x = torch.stack([torch.randn(self.shape, generator=g, device=self.source) for g in self.generators])
        return x.to(self.device)

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        return self.next()


class BrownianNoise:
    """k-diffusion's BrownianTreeNoiseSampler with one tree per image seed (as A1111 builds it), in
    float32. The trees live where the RNG source draws (noise_device): with A1111's "GPU" source on
    CUDA they are CUDA trees seeded on the GPU (as A1111's randn_local), with "CPU" they are CPU trees,
    so the noise is the same on every device."""

    def __init__(
        self, seeds: list[int], shape: tuple[int, ...], sigmas: torch.Tensor, device, rng: str = "gpu"
    ):
        import torchsde

        self.source = noise_device(device, rng)
        sigmas = sigmas.detach().cpu().float()
        t0, t1 = sigmas[sigmas > 0].min(), sigmas.max()
        w0 = torch.zeros(shape, device=self.source)
        self.trees = [torchsde.BrownianTree(t0, w0, t1, entropy=int(s)) for s in seeds]
        self.device = torch.device(device)

    def __call__(self, sigma, sigma_next) -> torch.Tensor:
        t0, t1 = torch.as_tensor(sigma).cpu().float(), torch.as_tensor(sigma_next).cpu().float()
        lo, hi, sign = (t0, t1, 1) if t0 < t1 else (t1, t0, -1)
        with warnings.catch_warnings():
            # exp(-log(sigma)) lands an ulp outside the tree's interval: harmless, as in A1111
            warnings.filterwarnings("ignore", "Should have t", UserWarning)
            w = torch.stack([tree(lo, hi) for tree in self.trees]) * sign
        return (w / (t1 - t0).abs().sqrt()).to(self.device)


# --- samplers (k-diffusion's sample_* functions, without callbacks or progress bars) -------------


def to_d(x, sigma, denoised):
    """The Karras ODE derivative dx/dsigma."""
    return (x - denoised) / sigma


def ancestral_step(sigma_from, sigma_to, eta: float = 1.0):
    """(sigma_down, sigma_up): step down to sigma_down, then add sigma_up of fresh noise."""
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * (sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2) ** 0.5)
    sigma_down = (sigma_to**2 - sigma_up**2) ** 0.5
    return sigma_down, sigma_up


def _ones(x):
    return x.new_ones([x.shape[0]])


def sample_euler(model, x, sigmas, noise=None, callback=None):
    s_in = _ones(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        if callback is not None:  # after each step, from host values: no GPU sync
            callback(i + 1)
    return x


def sample_euler_ancestral(model, x, sigmas, noise, callback=None):
    s_in = _ones(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1])
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigma_up
        if callback is not None:  # after each step, from host values: no GPU sync
            callback(i + 1)
    return x


def sample_heun(model, x, sigmas, noise=None, callback=None):
    s_in = _ones(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        d = to_d(x, sigmas[i], denoised)
        dt = sigmas[i + 1] - sigmas[i]
        if sigmas[i + 1] == 0:
            x = x + d * dt  # Euler on the last step
        else:
            x_2 = x + d * dt
            d_2 = to_d(x_2, sigmas[i + 1], model(x_2, sigmas[i + 1] * s_in))
            x = x + (d + d_2) / 2 * dt
        if callback is not None:  # after each step, from host values: no GPU sync
            callback(i + 1)
    return x


def sample_dpm_2(model, x, sigmas, noise=None, callback=None):
    s_in = _ones(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        d = to_d(x, sigmas[i], denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigmas[i + 1].log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in))
            x = x + d_2 * (sigmas[i + 1] - sigmas[i])
        if callback is not None:  # after each step, from host values: no GPU sync
            callback(i + 1)
    return x


def sample_dpm_2_ancestral(model, x, sigmas, noise, callback=None):
    s_in = _ones(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1])
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = sigmas[i].log().lerp(sigma_down.log(), 0.5).exp()
            x_2 = x + d * (sigma_mid - sigmas[i])
            d_2 = to_d(x_2, sigma_mid, model(x_2, sigma_mid * s_in))
            x = x + d_2 * (sigma_down - sigmas[i])
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigma_up
        if callback is not None:  # after each step, from host values: no GPU sync
            callback(i + 1)
    return x


def _lms_coeff(order: int, t, i: int, j: int) -> float:
    from scipy import integrate

    def fn(tau):
        prod = 1.0
        for k in range(order):
            if j != k:
                prod *= (tau - t[i - k]) / (t[i - j] - t[i - k])
        return prod

    return integrate.quad(fn, t[i], t[i + 1], epsrel=1e-4)[0]


def sample_lms(model, x, sigmas, noise=None, order: int = 4, callback=None):
    s_in = _ones(x)
    sigmas_np = sigmas.detach().cpu().numpy()
    ds = []
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        ds = [*ds, to_d(x, sigmas[i], denoised)][-order:]
        cur_order = min(i + 1, order)
        coeffs = [_lms_coeff(cur_order, sigmas_np, i, j) for j in range(cur_order)]
        x = x + sum(c * d for c, d in zip(coeffs, reversed(ds)))
        if callback is not None:  # after each step, from host values: no GPU sync
            callback(i + 1)
    return x


def _sigma_fn(t):
    return t.neg().exp()


def _t_fn(sigma):
    return sigma.log().neg()


def sample_dpmpp_2s_ancestral(model, x, sigmas, noise, callback=None):
    s_in = _ones(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1])
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:  # DPM-Solver++(2S)
            t, t_next = _t_fn(sigmas[i]), _t_fn(sigma_down)
            h = t_next - t
            s = t + h / 2
            x_2 = (_sigma_fn(s) / _sigma_fn(t)) * x - (-h / 2).expm1() * denoised
            denoised_2 = model(x_2, _sigma_fn(s) * s_in)
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised_2
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * sigma_up
        if callback is not None:  # after each step, from host values: no GPU sync
            callback(i + 1)
    return x


def sample_dpmpp_sde(model, x, sigmas, noise, eta: float = 1.0, r: float = 0.5, callback=None):
    s_in = _ones(x)
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
            if callback is not None:
                callback(i + 1)
            continue
        t, t_next = _t_fn(sigmas[i]), _t_fn(sigmas[i + 1])
        h = t_next - t
        s = t + h * r
        fac = 1 / (2 * r)
        # step 1: to the intermediate time s
        sd, su = ancestral_step(_sigma_fn(t), _sigma_fn(s), eta)
        s_ = _t_fn(sd)
        x_2 = (_sigma_fn(s_) / _sigma_fn(t)) * x - (t - s_).expm1() * denoised
        x_2 = x_2 + noise(_sigma_fn(t), _sigma_fn(s)) * su
        denoised_2 = model(x_2, _sigma_fn(s) * s_in)
        # step 2: to t_next
        sd, su = ancestral_step(_sigma_fn(t), _sigma_fn(t_next), eta)
        t_next_ = _t_fn(sd)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (_sigma_fn(t_next_) / _sigma_fn(t)) * x - (t - t_next_).expm1() * denoised_d
        x = x + noise(_sigma_fn(t), _sigma_fn(t_next)) * su
        if callback is not None:  # after each step, from host values: no GPU sync
            callback(i + 1)
    return x


def sample_dpmpp_2m(model, x, sigmas, noise=None, callback=None):
    s_in = _ones(x)
    old_denoised = None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        t, t_next = _t_fn(sigmas[i]), _t_fn(sigmas[i + 1])
        h = t_next - t
        if old_denoised is None or sigmas[i + 1] == 0:
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised
        else:
            r = (t - _t_fn(sigmas[i - 1])) / h
            denoised_d = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * old_denoised
            x = (_sigma_fn(t_next) / _sigma_fn(t)) * x - (-h).expm1() * denoised_d
        old_denoised = denoised
        if callback is not None:  # after each step, from host values: no GPU sync
            callback(i + 1)
    return x


def sample_dpmpp_2m_sde(model, x, sigmas, noise, eta: float = 1.0, callback=None):
    """DPM-Solver++(2M) SDE, midpoint variant (A1111's 'DPM++ 2M SDE')."""
    s_in = _ones(x)
    old_denoised, h_last = None, None
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in)
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, s = -sigmas[i].log(), -sigmas[i + 1].log()
            h = s - t
            eta_h = eta * h
            x = sigmas[i + 1] / sigmas[i] * (-eta_h).exp() * x + (-h - eta_h).expm1().neg() * denoised
            if old_denoised is not None:
                r = h_last / h
                x = x + 0.5 * (-h - eta_h).expm1().neg() * (1 / r) * (denoised - old_denoised)
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * (-2 * eta_h).expm1().neg().sqrt()
            h_last = h
        old_denoised = denoised
        if callback is not None:  # after each step, from host values: no GPU sync
            callback(i + 1)
    return x
