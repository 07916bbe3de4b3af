"""Samplers as A1111 runs them (k-diffusion's algorithms, seeded CPU noise), checked against analytic
denoisers and hand-computed steps; the VAE decode and the CFG scale."""

import math

import numpy as np
import pytest
import torch

from lorakit.errors import ConfigError, GenerationError
from lorakit.generate import kdiffusion as K
from lorakit.generate.params import GenerationParams
from lorakit.generate.pipeline import Generator, decode_latents
from lorakit.generate.samplers import K_SAMPLERS, all_names, display_name, k_sigmas

README_SAMPLERS = ["Euler a", "Euler", "LMS", "Heun", "DPM2", "DPM2 a", "DPM++ 2M", "DPM++ 2M SDE",
                   "DPM++ SDE", "DPM++ 2S a", "DDIM", "PLMS", "UniPC"]  # fmt: skip
SD1_SIGMA_MIN, SD1_SIGMA_MAX = 0.0291675, 14.614642  # sqrt((1 - a) / a) at t = 0 and t = 999


@pytest.fixture(scope="module")
def gen(tiny_base, tmp_path_factory):
    return Generator.from_path(tiny_base, tmp_path_factory.mktemp("loras"), device="cpu")


def draw(gen, sampler, seed, steps=2):
    p = GenerationParams(prompt="bear", steps=steps, width=64, height=64, seed=seed, sampler=sampler)
    return np.asarray(gen.generate(p)[0].image, dtype=np.int16)


def test_readme_lists_every_sampler_with_a_karras_variant():
    assert set(README_SAMPLERS) <= set(all_names())
    for name in README_SAMPLERS:
        if name not in ("DDIM", "PLMS"):  # A1111 runs these on fixed timesteps, not sigmas
            assert f"{name} Karras" in all_names()


@pytest.mark.parametrize("sampler", README_SAMPLERS + ["Euler a Karras", "DPM++ SDE Karras", "DPM2 a Karras"])
def test_same_seed_same_image_whatever_the_global_rng(gen, sampler):
    torch.manual_seed(1)
    first = draw(gen, sampler, seed=42)
    torch.manual_seed(999)  # A1111's noise comes from the image seed alone
    torch.rand(100)
    again = draw(gen, sampler, seed=42)
    other = draw(gen, sampler, seed=43)
    assert np.array_equal(first, again)
    assert np.abs(first - other).mean() > 0.5


# --- sigma schedules --------------------------------------------------------------------------


def test_sigmas_follow_a1111_schedules():
    uniform = k_sigmas("Euler", None, 10)
    assert len(uniform) == 11 and uniform[-1] == 0
    assert uniform[0].item() == pytest.approx(SD1_SIGMA_MAX, rel=1e-5)
    assert uniform[-2].item() == pytest.approx(SD1_SIGMA_MIN, rel=1e-4)
    # Karras (rho 7) written out: sigma_i = (max^(1/7) + i/(n-1) (min^(1/7) - max^(1/7)))^7
    karras = k_sigmas("Euler", "Karras", 5)
    lo, hi = SD1_SIGMA_MIN ** (1 / 7), SD1_SIGMA_MAX ** (1 / 7)
    expected = [(hi + i / 4 * (lo - hi)) ** 7 for i in range(5)] + [0.0]
    np.testing.assert_allclose(karras.numpy(), expected, rtol=1e-4)
    # exponential: evenly spaced in log sigma
    expo = k_sigmas("DPM++ 2M SDE", None, 4)[:-1].log()
    np.testing.assert_allclose(
        np.diff(expo.numpy()), [math.log(SD1_SIGMA_MIN / SD1_SIGMA_MAX) / 3] * 3, rtol=1e-4
    )
    # DPM2 draws steps + 1 Karras sigmas and drops the next-to-last one (A1111's discard option)
    dpm2 = k_sigmas("DPM2", None, 5)
    karras6 = k_sigmas("Euler", "Karras", 6)
    assert torch.equal(dpm2, torch.cat([karras6[:-2], karras6[-1:]]))


def test_automatic_schedule_is_the_samplers_own_default_as_in_a1111():
    assert display_name("DPM++ 2M") == ("DPM++ 2M", "Karras")
    assert display_name("DPM++ 2M SDE") == ("DPM++ 2M SDE", "Exponential")
    assert display_name("DPM++ 2M", "Uniform") == ("DPM++ 2M", "Uniform")
    assert display_name("Euler a") == ("Euler a", None)
    assert display_name("DPM++ 2M SDE Karras") == ("DPM++ 2M SDE", "Karras")
    assert torch.equal(k_sigmas("DPM++ 2M", None, 7), k_sigmas("Euler", "Karras", 7))
    assert torch.equal(k_sigmas("DPM++ 2M", "Uniform", 7), k_sigmas("Euler", None, 7))
    with pytest.raises(ConfigError, match="DDIM.*no Karras"):
        display_name("DDIM Karras")


# --- noise: A1111's seeded CPU generators and Brownian tree -------------------------------------


class Recorder:
    """A denoiser that returns a fixed x0 and records what it was called with."""

    def __init__(self, x0):
        self.x0, self.calls = x0, []

    def __call__(self, x, sigma):
        self.calls.append((x.clone(), sigma.clone()))
        return self.x0.expand_as(x)


def test_initial_latent_and_ancestral_noise_are_the_seeds_cpu_draws():
    shape = (4, 3, 5)
    sigmas = torch.tensor([10.0, 2.0, 0.0])
    rng = K.SeededNoise([7, 8], shape, "cpu")
    x = rng.next() * sigmas[0]
    model = Recorder(torch.zeros(shape))
    K.sample_euler_ancestral(model, x, sigmas, rng)
    # written out independently: per seed, draw 1 is the latent, draw 2 the first step's noise
    draws = []
    for seed in (7, 8):
        g = torch.Generator().manual_seed(seed)
        draws.append((torch.randn(shape, generator=g), torch.randn(shape, generator=g)))
    latent = torch.stack([d[0] for d in draws])
    noise = torch.stack([d[1] for d in draws])
    sigma_up = math.sqrt(2.0**2 * (10.0**2 - 2.0**2) / 10.0**2)
    sigma_down = math.sqrt(2.0**2 - sigma_up**2)
    assert torch.equal(model.calls[0][0], latent * 10.0)
    # Euler step to sigma_down with D = 0 scales x by sigma_down / sigma, then adds sigma_up noise
    torch.testing.assert_close(model.calls[1][0], latent * sigma_down + noise * sigma_up)


def test_brownian_noise_depends_on_the_image_seed_only():
    sigmas = k_sigmas("DPM++ SDE", None, 4)
    shape = (4, 2, 2)

    def sample(seeds):
        b = K.BrownianNoise(seeds, shape, sigmas, "cpu")
        return torch.cat([b(sigmas[i], sigmas[i + 1]) for i in range(3)])

    torch.manual_seed(0)
    one = sample([5, 6])
    torch.manual_seed(1)
    assert torch.equal(sample([5, 6]), one)
    assert torch.equal(sample([6]), one.view(3, 2, *shape)[:, 1])  # the batch does not matter
    assert not torch.equal(sample([7]), sample([6]))
    # unit variance over a large tensor: the tree's increment divided by sqrt(|dt|)
    big = K.BrownianNoise([3], (20000,), sigmas, "cpu")(sigmas[1], sigmas[2])
    assert abs(big.std().item() - 1) < 0.03 and abs(big.mean().item()) < 0.03


# --- samplers against analytic denoisers and hand-computed steps --------------------------------


class GaussianData:
    """The exact denoiser for data ~ N(mu, s^2): D(x, sigma) = mu + s^2 / (s^2 + sigma^2) (x - mu)."""

    def __init__(self, mu=0.7, s=0.5):
        self.mu, self.s = mu, s

    def __call__(self, x, sigma):
        v = sigma.view(-1, *[1] * (x.ndim - 1)) ** 2
        return self.mu + self.s**2 / (self.s**2 + v) * (x - self.mu)


@pytest.mark.parametrize(
    "function, tol",
    [("sample_euler", 0.1), ("sample_heun", 5e-3), ("sample_dpm_2", 5e-3), ("sample_lms", 5e-3),
     ("sample_dpmpp_2m", 5e-3)],
)  # fmt: skip
def test_ode_samplers_follow_the_exact_probability_flow(function, tol):
    # the probability-flow ODE of Gaussian data maps x_T to mu + (x_T - mu) s / sqrt(s^2 + sigma_T^2)
    data = GaussianData()
    sigmas = k_sigmas("Euler", "Karras", 40)
    x_t = K.SeededNoise([1], (1, 8, 8), "cpu").next() * sigmas[0]
    out = getattr(K, function)(data, x_t.clone(), sigmas, None)
    exact = data.mu + (x_t - data.mu) * data.s / math.sqrt(data.s**2 + sigmas[0].item() ** 2)
    assert (out - exact).abs().max().item() < tol
    assert (x_t / sigmas[0]).std() > 0.5  # a real spread of starting points, not one point


@pytest.mark.parametrize("name", [n for n in K_SAMPLERS])
def test_every_k_sampler_draws_from_the_data_distribution(name):
    data = GaussianData(mu=0.7, s=0.5)
    sigmas = k_sigmas(name, "Karras", 100)
    seeds = [11, 12]
    shape = (1, 60, 60)
    rng = K.SeededNoise(seeds, shape, "cpu")
    x = rng.next() * sigmas[0]
    noise = K.BrownianNoise(seeds, shape, sigmas, "cpu") if K_SAMPLERS[name].brownian_noise else rng
    out = getattr(K, K_SAMPLERS[name].function)(data, x, sigmas, noise)
    assert abs(out.mean().item() - 0.7) < 0.03
    assert abs(out.std().item() - 0.5) < 0.03


def test_dpmpp_2m_two_steps_by_hand():
    sigmas = torch.tensor([8.0, 2.0, 0.5, 0.0])
    x = torch.tensor([[3.0, -1.0]])
    model = lambda x, s: 0.5 * x  # noqa: E731  a denoiser we can follow by hand
    out = K.sample_dpmpp_2m(model, x.clone(), sigmas)
    # DPM-Solver++(2M) in sigma terms: x' = (s1/s0) x + (1 - s1/s0) D, with D corrected on later steps
    d0 = 0.5 * x
    x1 = 2 / 8 * x + (1 - 2 / 8) * d0
    d1 = 0.5 * x1
    r = math.log(8 / 2) / math.log(2 / 0.5)  # h_last / h
    dd = (1 + 1 / (2 * r)) * d1 - 1 / (2 * r) * d0
    x2 = 0.5 / 2 * x1 + (1 - 0.5 / 2) * dd
    x3 = 0.5 * x2  # the last step to sigma 0 lands on the denoised image
    torch.testing.assert_close(out, x3)


def test_dpmpp_2s_ancestral_is_ancestral():
    # one step 4 -> 1 (then 1 -> 0) with D = 0: x = sigma_down / sigma * x, plus sigma_up of the seed's noise
    sigmas = torch.tensor([4.0, 1.0, 0.0])
    rng = K.SeededNoise([3], (5,), "cpu")
    x = rng.next() * 4
    model = Recorder(torch.zeros(5))
    K.sample_dpmpp_2s_ancestral(model, x.clone(), sigmas, rng)
    g = torch.Generator().manual_seed(3)
    latent, noise = torch.randn(5, generator=g), torch.randn(5, generator=g)
    sigma_up = math.sqrt(1.0 * (16.0 - 1.0) / 16.0)
    sigma_down = math.sqrt(1.0 - sigma_up**2)
    # calls: sigma 4, the midpoint sqrt(4 * sigma_down), then sigma 1
    assert model.calls[1][1].item() == pytest.approx(math.sqrt(4 * sigma_down), rel=1e-5)
    torch.testing.assert_close(model.calls[2][0][0], latent * sigma_down + noise * sigma_up)


def test_dpmpp_sde_first_step_by_hand():
    # D = 0: each half step scales x by the down-sigma ratio and adds Brownian noise of sigma_up
    sigmas = torch.tensor([4.0, 1.0, 0.0])
    shape = (6,)
    bn = K.BrownianNoise([9], shape, sigmas, "cpu")
    model = Recorder(torch.zeros(shape))
    x = torch.ones(1, *shape)
    K.sample_dpmpp_sde(model, x.clone(), sigmas, bn)
    s_mid = 2.0  # exp of the mid log-sigma between 4 and 1
    up1 = math.sqrt(s_mid**2 * (16 - s_mid**2) / 16)
    down1 = math.sqrt(s_mid**2 - up1**2)
    expected_mid = down1 / 4 * x + bn(torch.tensor(4.0), torch.tensor(s_mid)) * up1
    assert model.calls[1][1].item() == pytest.approx(s_mid, rel=1e-5)
    torch.testing.assert_close(model.calls[1][0], expected_mid)


# --- VAE and CFG (item 14) ------------------------------------------------------------------------


def test_fp16_vae_decodes_in_fp32_where_fp16_overflows(gen):
    import copy

    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 1e4
    vae16 = copy.deepcopy(gen.vae).half()
    with torch.no_grad():
        raw16 = vae16.decode(latents.half() / vae16.config.scaling_factor).sample
        assert not torch.isfinite(raw16).all()  # the overflow this guards against
        reference = np.asarray(decode_latents(copy.deepcopy(vae16).float(), latents)[0])
        upcast = np.asarray(decode_latents(vae16, latents)[0])
    assert vae16.dtype == torch.float16  # the caller's VAE is left as it was
    assert np.array_equal(upcast, reference) and reference.std() > 0


def test_generator_keeps_its_vae_in_fp32(tiny_base, tmp_path):
    g = Generator.from_path(tiny_base, tmp_path, device="cpu", dtype=torch.float16)
    assert g.vae.dtype == torch.float32 and g.unet.dtype == torch.float16


def test_non_finite_image_is_an_error_and_no_png_is_written(tiny_base, tmp_path, capsys, monkeypatch):
    from lorakit.cli import main
    from lorakit.generate import samplers

    monkeypatch.setattr(samplers, "k_sample", lambda *a, **k: torch.full((1, 4, 8, 8), float("nan")))
    out = tmp_path / "out"
    rc = main(["generate", "--model", str(tiny_base), "--lora_dir", str(tmp_path), "--outdir", str(out),
               "--prompt", "bear", "--steps", "2", "--width", "64", "--height", "64", "--seed", "5"])  # fmt: skip
    err = capsys.readouterr().err
    assert rc == 2 and "seed 5 came out NaN" in err
    assert not list(out.glob("*.png"))
    vae = Generator.from_path(tiny_base, tmp_path, device="cpu").vae
    with pytest.raises(GenerationError, match="seed 5 came out NaN"):
        decode_latents(vae, torch.full((1, 4, 8, 8), math.nan), [5])


@pytest.mark.parametrize("cfg", [float("nan"), -1.0, float("inf")])
def test_bad_cfg_scale_is_refused(cfg):
    with pytest.raises(ConfigError, match="CFG scale"):
        GenerationParams(prompt="x", cfg_scale=cfg).check()


def test_bad_cfg_scale_on_the_command_line_fails_before_loading(tmp_path, capsys):
    from lorakit.cli import main

    rc = main(
        ["generate", "--model", str(tmp_path / "missing.safetensors"), "--prompt", "x", "--cfg_scale", "nan"]
    )
    assert rc == 2 and "CFG scale" in capsys.readouterr().err


@pytest.mark.parametrize("command", [["generate", "--prompt", "x"], ["reg-images", "--class_prompt", "bear"]])
@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--width", "10000"], "width 10000: images are at most 2048 pixels a side"),
        (["--height", "4096"], "height 4096: images are at most 2048 pixels a side"),
        (["--seed", str(2**70)], f"seed {2**70}: a seed is -1 (random) or 0 to 4294967295"),
        (["--seed", "-2"], "seed -2: a seed is -1 (random)"),
    ],
)
def test_size_and_seed_limits_on_the_command_line_fail_before_loading(
    tiny_base, tmp_path, capsys, monkeypatch, command, option, message
):
    from lorakit.cli import main
    from lorakit.generate.pipeline import Generator

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the request was checked")

    monkeypatch.setattr(Generator, "from_path", no_load)
    out = (
        ["--outdir", str(tmp_path / "out")] if command[0] == "generate" else ["--out", str(tmp_path / "out")]
    )
    rc = main([*command, "--model", str(tiny_base), *out, *option])
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert not (tmp_path / "out").exists()


# --- one SD schedule (item 22) --------------------------------------------------------------------


def test_training_and_drawing_share_the_sd_schedule():
    from lorakit.generate.samplers import make_scheduler
    from lorakit.models.schedule import SD_SCHEDULE, sd_alphas_cumprod
    from lorakit.train.noise import noise_scheduler

    train = noise_scheduler()
    for key, value in SD_SCHEDULE.items():
        assert train.config[key] == value and make_scheduler("DDIM").config[key] == value
    # LDM computes the same betas in float64: the two agree to float32 rounding
    torch.testing.assert_close(train.alphas_cumprod, sd_alphas_cumprod(), rtol=1e-5, atol=1e-7)
    assert sd_alphas_cumprod()[-1].item() == pytest.approx(1 / (1 + SD1_SIGMA_MAX**2), rel=1e-4)


def test_a_nan_training_sample_is_skipped_with_a_warning(tmp_path, caplog):
    from lorakit.generate.sample_prompts import draw_samples

    class NaNGenerator:
        def generate(self, p):
            raise GenerationError("the image for seed 1 came out NaN/infinite")

    paths = draw_samples(NaNGenerator(), [GenerationParams(prompt="bear")], tmp_path, "tiny", epoch=1)
    assert paths == [] and not list(tmp_path.glob("*.png"))
    assert "sample 0 ('bear') not saved" in caplog.text and "NaN" in caplog.text
