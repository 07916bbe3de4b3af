"""Each training option has the effect kohya gives it, checked on what the training steps computed.

The expected values are written out here (kohya's formulas, diffusers' LR schedules, kohya's
get_hidden_states), not taken from the code under test. Tiny model, 64 px, 2-4 steps.
"""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from lorakit.network.targets import te_layers
from lorakit.train import noise as N
from lorakit.train.trainer import Trainer, build_trainer, train

LR = 1e-3  # the train_config fixture's learning rate
TE_LAYERS = 2  # the tiny text encoder's depth


def alphas_cumprod() -> torch.Tensor:
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


AC = alphas_cumprod()


@pytest.fixture
def steps(monkeypatch):
    """What each training step computed: latents, noise, t, target, per-sample loss, the step's loss."""
    rec: dict[str, list] = {
        k: [] for k in ("latents", "noise", "t", "target", "per_sample", "weights", "loss")
    }
    real_noisy, real_per_sample, real_loss_of = N.noisy_latents, N.per_sample_loss, Trainer.loss_of

    def noisy_latents(scheduler, latents, generator, noise_offset=None, timestep=None):
        out = real_noisy(scheduler, latents, generator, noise_offset, timestep)
        rec["latents"].append(latents.detach().clone())
        rec["noise"].append(out[1].detach().clone())
        rec["t"].append(out[2].clone())
        return out

    def per_sample_loss(pred, target):
        out = real_per_sample(pred, target)
        rec["target"].append(target.detach().clone())
        rec["per_sample"].append(out.detach().clone())
        return out

    def loss_of(self, batch, step):
        out = real_loss_of(self, batch, step)
        rec["weights"].append(batch.loss_weights.clone())
        rec["loss"].append(out.detach().clone())
        return out

    monkeypatch.setattr(N, "noisy_latents", noisy_latents)
    monkeypatch.setattr(N, "per_sample_loss", per_sample_loss)
    monkeypatch.setattr(Trainer, "loss_of", loss_of)
    return rec


def lora(path) -> dict[str, torch.Tensor]:
    return {k: v.float() for k, v in load_file(str(path)).items()}


def differs(a: dict, b: dict) -> bool:
    return any(not torch.equal(a[k], b[k]) for k in a)


LONG_CAPTION = ", ".join(f"word{i} bear" for i in range(70))  # about 210 tokens: 3 chunks


def caption_all(train_dir, text: str) -> None:
    for image in train_dir.rglob("*.png"):
        image.with_suffix(".caption").write_text(text)


@pytest.mark.parametrize("v_pred", [False, True], ids=["epsilon", "v"])
def test_min_snr_gamma_weights_each_sample_like_kohya(train_config, tiny_data, steps, v_pred):
    gamma = 1.0
    reg = dict(
        reg_data_dir=str(tiny_data[1]), prior_loss_weight=0.5
    )  # kohya: loss x weights, then x SNR weight
    train(train_config(min_snr_gamma=gamma, v_parameterization=v_pred, max_train_steps=3, **reg))
    assert len(steps["loss"]) == 3
    assert 0.5 in torch.cat(steps["weights"]).tolist()  # a reg sample was among them
    all_weights = []
    for t, per_sample, w, loss in zip(steps["t"], steps["per_sample"], steps["weights"], steps["loss"]):
        snr = (AC[t] / (1 - AC[t])).float()
        snr_weight = torch.clamp(snr, max=gamma) / (snr + 1 if v_pred else snr)
        all_weights.append(snr_weight)
        torch.testing.assert_close(loss, (per_sample * w * snr_weight).mean(), rtol=1e-5, atol=1e-7)
    all_weights = torch.cat(all_weights)
    assert (all_weights < 0.99).any()  # the steps did draw timesteps where the weight matters


def test_defaults_train_on_the_noise_with_the_plain_mean_loss(train_config, steps):
    train(train_config(max_train_steps=2))
    assert len(steps["loss"]) == 2
    for eps, target, per_sample, w, loss in zip(
        steps["noise"], steps["target"], steps["per_sample"], steps["weights"], steps["loss"]
    ):
        assert torch.equal(target, eps)
        torch.testing.assert_close(loss, (per_sample * w).mean(), rtol=1e-6, atol=1e-8)


def test_v_parameterization_trains_on_kohyas_velocity(train_config, steps):
    train(train_config(v_parameterization=True, max_train_steps=2))
    assert len(steps["target"]) == 2
    for x0, eps, t, target in zip(steps["latents"], steps["noise"], steps["t"], steps["target"]):
        a = AC[t].float().view(-1, 1, 1, 1)
        torch.testing.assert_close(target, a.sqrt() * eps - (1 - a).sqrt() * x0, rtol=1e-5, atol=1e-6)


def test_noise_offset_adds_one_constant_per_sample_and_channel(train_config, tmp_path, steps):
    noise = {}
    for offset in (None, 0.1, 0.2):
        steps["noise"].clear()
        train(train_config(output_dir=str(tmp_path / str(offset)), noise_offset=offset, max_train_steps=1))
        noise[offset] = steps["noise"][0]
    shift = noise[0.1] - noise[None]  # the same seed draws the same base noise first, as in kohya
    assert shift.abs().min() > 0
    torch.testing.assert_close(shift, shift[..., :1, :1].expand_as(shift), rtol=0, atol=1e-6)
    assert shift[..., 0, 0].unique().numel() == shift.shape[0] * shift.shape[1]
    torch.testing.assert_close(noise[0.2] - noise[None], 2 * shift, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "scheduler,warmup,accum,expected",
    [
        # diffusers' schedules (what kohya uses): warm-up lr = step / warmup; a float < 1 is a ratio of the steps
        ("constant_with_warmup", 2, 1, [0.0, 0.5, 1.0, 1.0]),
        ("cosine", 0.5, 1, [0.0, 0.5, 1.0, 0.5 * (1 + math.cos(math.pi * 0.5))]),
        ("linear", 2, 1, [0.0, 0.5, 1.0, 0.5]),
        ("linear", 2, 2, [0.0, 0.5, 1.0, 0.5]),  # steps count optimizer steps, not micro-batches
    ],
)
def test_learning_rate_of_each_step_follows_the_schedule(train_config, scheduler, warmup, accum, expected):
    cfg = train_config(
        lr_scheduler=scheduler, lr_warmup_steps=warmup, gradient_accumulation_steps=accum, max_train_steps=4
    )
    tr = build_trainer(cfg)
    seen = []
    real_step = tr.optimizer.step

    def step(*args, **kwargs):
        seen.append([g["lr"] for g in tr.optimizer.param_groups])
        return real_step(*args, **kwargs)

    tr.optimizer.step = step
    tr.run()
    assert len(seen) == 4
    for lrs, want in zip(seen, expected):
        assert lrs == pytest.approx([LR * want] * len(lrs), abs=1e-12)


def kohya_hidden_states(tokenizer, text_encoder, caption, clip_skip, max_token_length):
    """kohya's train_util.get_hidden_states for SD1: chunks of 75 tokens, BOS/EOS around each."""
    n = (max_token_length or 75) // 75
    ids = tokenizer(
        [caption], padding="max_length", truncation=True, max_length=n * 75 + 2, return_tensors="pt"
    ).input_ids
    chunks = [torch.cat([ids[:, :1], ids[:, i : i + 75], ids[:, -1:]], dim=1) for i in range(1, n * 75, 75)]
    ids = torch.cat(chunks)  # [n, 77]
    with torch.no_grad():
        if clip_skip is None:
            hidden = text_encoder(ids)[0]
        else:
            out = text_encoder(ids, output_hidden_states=True, return_dict=True)
            final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
            hidden = final_norm(out.hidden_states[-clip_skip])
    hidden = hidden.reshape(1, -1, hidden.shape[-1])  # [1, n*77, D]
    if max_token_length is None:
        return hidden
    parts = [hidden[:, :1]]  # <BOS>
    for i in range(1, max_token_length, 77):
        parts.append(hidden[:, i : i + 75])
    parts.append(hidden[:, -1:])  # <EOS>
    return torch.cat(parts, dim=1)


@pytest.mark.parametrize(
    "clip_skip,max_token_length,length",
    [(None, None, 77), (2, None, 77), (None, 150, 152), (2, 225, 227)],
)
def test_unet_gets_kohyas_text_encoder_output(train_config, tiny_data, clip_skip, max_token_length, length):
    caption_all(tiny_data[0], LONG_CAPTION)
    tr = build_trainer(
        train_config(clip_skip=clip_skip, max_token_length=max_token_length, max_train_steps=1)
    )
    # before the first step the TE LoRA is zero (lora_up starts at 0): the base TE's output is expected
    want = kohya_hidden_states(
        tr.base.tokenizer, tr.base.text_encoder, LONG_CAPTION, clip_skip, max_token_length
    )
    assert want.shape[1] == length
    seen = []
    tr.base.unet.register_forward_pre_hook(lambda m, args: seen.append(args[2].detach().clone()))
    tr.run()
    cond = seen[0]
    assert cond.shape == (2, length, want.shape[-1])
    for row in cond:
        torch.testing.assert_close(row, want[0], rtol=1e-5, atol=1e-6)
    if clip_skip:  # not vacuous: the last layer would have given something else
        other = kohya_hidden_states(
            tr.base.tokenizer, tr.base.text_encoder, LONG_CAPTION, None, max_token_length
        )
        assert (other - want).abs().max() > 1e-3


def test_clip_skip_2_leaves_the_last_text_encoder_layer_untrained(train_config, tmp_path):
    """kohya: with clip_skip 2 no gradient reaches the last layer's LoRA; its lora_up stays zero."""
    last = f"lora_te_text_model_encoder_layers_{TE_LAYERS - 1}_"
    for clip_skip, last_trained in ((None, True), (2, False)):
        cfg = train_config(output_dir=str(tmp_path / str(clip_skip)), clip_skip=clip_skip, max_train_steps=1)
        sd = lora(train(cfg))
        ups = {k: v for k, v in sd.items() if k.startswith("lora_te_") and k.endswith("lora_up.weight")}
        assert len(ups) == 6 * TE_LAYERS
        for k, v in ups.items():
            trained = bool(v.abs().sum() > 0)
            assert trained == (last_trained or not k.startswith(last)), (clip_skip, k)


def count_calls(module, counter: list) -> None:
    module.register_forward_pre_hook(lambda m, args: counter.append(1))


def test_gradient_checkpointing_gives_the_same_lora(train_config, tmp_path):
    """Text encoder trained too; CPU fp32: the recomputed forward is the same arithmetic."""
    results, calls = {}, {}
    for gc in (False, True):
        cfg = train_config(
            output_dir=str(tmp_path / str(gc)),
            gradient_checkpointing=gc,
            save_precision="float",
            max_train_steps=2,
        )
        tr = build_trainer(cfg)
        unet_calls, te_calls = [], []
        count_calls(tr.base.unet.down_blocks[0].attentions[0].transformer_blocks[0], unet_calls)
        # a submodule: transformers >= 5.24 recomputes the layer's forward outside its own hooks
        count_calls(te_layers(tr.base.text_encoder)[1][0].mlp, te_calls)
        results[gc] = lora(tr.run())
        calls[gc] = (len(unet_calls), len(te_calls))
    assert any(k.startswith("lora_te_") for k in results[True])
    # checkpointing really ran: the forward of each block is recomputed in the backward pass
    assert calls[False] == (2, 2)
    assert calls[True] == (4, 4)
    for k in results[False]:
        torch.testing.assert_close(results[True][k], results[False][k], rtol=1e-5, atol=1e-7, msg=k)
    ups = [v for k, v in results[False].items() if k.endswith("lora_up.weight")]
    assert min(v.abs().max() for v in ups) > 1e-4  # every module trained: atol 1e-7 is a tight bound


def test_fp16_training_on_cpu(train_config, tmp_path):
    """fp16: the frozen base runs in fp16, the LoRA stays fp32 and ends close to the fp32 run.

    On CPU accelerate gives no GradScaler (loss scaling is CUDA-only), so the scaler is not tested here.
    """
    fp32 = lora(train(train_config(output_dir=str(tmp_path / "fp32"), save_precision="float")))
    tr = build_trainer(
        train_config(output_dir=str(tmp_path / "fp16"), mixed_precision="fp16", save_precision="float")
    )
    dtypes = []
    tr.base.unet.register_forward_hook(lambda m, args, out: dtypes.append((args[0].dtype, out.sample.dtype)))
    te_dtypes = []
    tr.base.text_encoder.register_forward_hook(lambda m, args, out: te_dtypes.append(out[0].dtype))
    assert {p.dtype for p in tr.network.parameters()} == {torch.float32}
    fp16 = lora(tr.run())
    assert set(dtypes) == {(torch.float16, torch.float16)} and set(te_dtypes) == {torch.float16}
    assert {p.dtype for p in tr.network.parameters()} == {torch.float32}
    assert all(torch.isfinite(v).all() for v in fp16.values())
    assert differs(fp16, fp32)  # it did run in another precision
    ups = [k for k in fp32 if k.endswith("lora_up.weight")]
    delta = torch.cat([(fp16[k] - fp32[k]).flatten() for k in ups]).norm()
    size = torch.cat([fp32[k].flatten() for k in ups]).norm()
    assert size > 0 and delta < 0.05 * size, (delta, size)  # the same training, up to fp16 rounding
