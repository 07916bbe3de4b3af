"""train/noise.py against kohya's formulas, written out here independently of the code under test.

kohya (train_util.get_noise_noisy_latents_and_timesteps, custom_train_functions.apply_snr_weight):
DDPM scaled_linear betas 0.00085..0.012 over 1000 steps; noise = randn_like(latents), plus
`noise_offset * randn((b, c, 1, 1))`; t = randint(0, 1000, (b,)); x_t = sqrt(a_t) x0 + sqrt(1 - a_t) noise;
v target = sqrt(a_t) noise - sqrt(1 - a_t) x0; SNR = a_t / (1 - a_t); min-SNR weight min(SNR, gamma) / SNR
(v-prediction: min(SNR, gamma) / (SNR + 1)).
"""

from __future__ import annotations

import math

import pytest
import torch

from lorakit.train import noise as N


def kohya_alphas_cumprod() -> torch.Tensor:
    """SD's training schedule in float64: betas linear in sqrt space, then squared."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


AC = kohya_alphas_cumprod()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_schedule_is_sds_scaled_linear():
    for v in (False, True):
        s = N.noise_scheduler(v_parameterization=v)
        assert s.config.prediction_type == ("v_prediction" if v else "epsilon")
        torch.testing.assert_close(s.alphas_cumprod.double(), AC, rtol=2e-6, atol=1e-9)
    # the well-known end points of SD's schedule
    assert AC[0].item() == pytest.approx(0.99915, abs=1e-12)  # 1 - beta_start
    assert AC[-1].item() == pytest.approx(0.0046601, abs=1e-7)  # sqrt: 0.0683


def test_snr_table():
    snr = N.snr_table(N.noise_scheduler()).double()
    assert snr.shape == (1000,)
    torch.testing.assert_close(snr, AC / (1 - AC), rtol=1e-4, atol=0)  # fp32: 1 - 0.99915 keeps ~4 digits
    assert snr[0].item() == pytest.approx(0.99915 / 0.00085, rel=1e-4)  # 1175.47
    assert bool((snr[1:] < snr[:-1]).all())  # more noise, less signal


def test_noisy_latents_draw_kohyas_noise_offset_and_timesteps():
    s = N.noise_scheduler()
    latents = torch.randn(3, 4, 8, 8, generator=gen(1))
    noisy, noise, t = N.noisy_latents(s, latents, gen(7), noise_offset=0.1)

    # kohya's order of draws: randn_like(latents), then the offset randn((b, c, 1, 1)), then randint
    g = gen(7)
    want_noise = torch.randn(latents.shape, generator=g)
    want_noise = want_noise + 0.1 * torch.randn((3, 4, 1, 1), generator=g)
    want_t = torch.randint(0, 1000, (3,), generator=g)
    assert torch.equal(t, want_t) and t.dtype == torch.long
    torch.testing.assert_close(noise, want_noise, rtol=0, atol=1e-7)
    a = AC[t].float().view(3, 1, 1, 1)
    torch.testing.assert_close(noisy, a.sqrt() * latents + (1 - a).sqrt() * noise, rtol=1e-5, atol=1e-6)


def test_noise_offset_is_one_constant_per_sample_and_channel():
    s = N.noise_scheduler()
    latents = torch.zeros(2, 4, 8, 8)
    _, plain, _ = N.noisy_latents(s, latents, gen(3))
    _, off1, _ = N.noisy_latents(s, latents, gen(3), noise_offset=0.1)
    _, off2, _ = N.noisy_latents(s, latents, gen(3), noise_offset=0.2)
    shift = off1 - plain
    assert shift.abs().min() > 0  # the offset is there...
    torch.testing.assert_close(
        shift, shift[..., :1, :1].expand_as(shift), rtol=0, atol=1e-6
    )  # ...flat in H, W
    assert shift[..., 0, 0].unique().numel() == 8  # and drawn per (sample, channel)
    torch.testing.assert_close(off2 - plain, 2 * shift, rtol=1e-5, atol=1e-6)  # linear in noise_offset
    _, none, _ = N.noisy_latents(s, latents, gen(3), noise_offset=0.0)
    assert torch.equal(none, plain)


def test_timesteps_are_uniform_over_0_to_999():
    s = N.noise_scheduler()
    _, _, t = N.noisy_latents(s, torch.zeros(20000, 1, 1, 1), gen(0))
    assert t.min().item() == 0 and t.max().item() == 999
    assert t.float().mean().item() == pytest.approx(499.5, abs=8)  # sd of the mean is about 2
    counts = torch.bincount(t // 100, minlength=10)
    assert counts.min() > 1800 and counts.max() < 2200  # 2000 expected per tenth


def test_targets_epsilon_and_v():
    s = N.noise_scheduler(v_parameterization=True)
    x0 = torch.randn(4, 4, 8, 8, generator=gen(1))
    eps = torch.randn(4, 4, 8, 8, generator=gen(2))
    t = torch.tensor([0, 250, 700, 999])
    assert torch.equal(N.target_of(s, x0, eps, t, v_parameterization=False), eps)
    v = N.target_of(s, x0, eps, t, v_parameterization=True)
    a = AC[t].float().view(4, 1, 1, 1)
    torch.testing.assert_close(v, a.sqrt() * eps - (1 - a).sqrt() * x0, rtol=1e-5, atol=1e-6)
    # what makes v the right target: x0 = sqrt(a) x_t - sqrt(1 - a) v
    xt = a.sqrt() * x0 + (1 - a).sqrt() * eps
    torch.testing.assert_close(a.sqrt() * xt - (1 - a).sqrt() * v, x0, rtol=1e-4, atol=1e-5)


def test_min_snr_weights_hand_values():
    snr = torch.tensor([0.5, 5.0, 20.0])
    t = torch.tensor([0, 1, 2, 2])
    eps = N.min_snr_weights(snr, t, gamma=5.0, v_parameterization=False)
    torch.testing.assert_close(eps, torch.tensor([1.0, 1.0, 0.25, 0.25]))
    v = N.min_snr_weights(snr, t, gamma=5.0, v_parameterization=True)
    torch.testing.assert_close(v, torch.tensor([0.5 / 1.5, 5 / 6, 5 / 21, 5 / 21]))


def test_min_snr_weights_on_sds_schedule():
    snr = N.snr_table(N.noise_scheduler())
    t = torch.tensor([0, 999])
    s0, s999 = ((AC[i] / (1 - AC[i])).item() for i in (0, 999))
    eps = N.min_snr_weights(snr, t, 5.0, False)
    v = N.min_snr_weights(snr, t, 5.0, True)
    # t = 0: SNR 1175 > gamma, clipped; t = 999: SNR 0.0047 < gamma, eps weight 1
    torch.testing.assert_close(
        eps.double(), torch.tensor([5 / s0, 1.0], dtype=torch.float64), rtol=1e-4, atol=0
    )
    torch.testing.assert_close(
        v.double(), torch.tensor([5 / (s0 + 1), s999 / (s999 + 1)], dtype=torch.float64), rtol=1e-4, atol=0
    )


def test_per_sample_loss_is_fp32_mse_over_chw():
    pred = torch.zeros(2, 1, 2, 2, dtype=torch.float16)
    target = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]]], [[[0.0, 0.0], [0.0, 2.0]]]])
    loss = N.per_sample_loss(pred, target)
    assert loss.dtype == torch.float32 and loss.shape == (2,)
    torch.testing.assert_close(loss, torch.tensor([(1 + 4 + 9 + 16) / 4, 4 / 4]))


def test_step_generator_depends_on_seed_step_and_rank_only():
    cpu = torch.device("cpu")

    def draw(seed, step, rank):
        return torch.randn(4, generator=N.step_generator(seed, step, rank, cpu))

    assert torch.equal(draw(1, 5, 0), draw(1, 5, 0))
    others = [draw(2, 5, 0), draw(1, 6, 0), draw(1, 5, 1)]
    assert all(not torch.equal(draw(1, 5, 0), o) for o in others)
    assert math.isfinite(draw(2**32 - 1, 10**9, 7).sum().item())  # the largest seed kohya accepts
