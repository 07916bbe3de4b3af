"""Drawing on SDXL bases as A1111/Forge do: prompt encoding (checked against diffusers' SDXL pipeline),
every sampler, LoRAs, family refusals, PNG info, v-prediction / zero terminal SNR, CFG rescale, NaN
guard, samples while training and regularization images. All on the tiny SDXL model, on the CPU."""

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.errors import GenerationError, ModelError
from lorakit.generate.params import GenerationParams
from lorakit.generate.pipeline import Generator
from lorakit.generate.pnginfo import parse_parameters, read_png_parameters
from lorakit.generate.samplers import SAMPLERS
from lorakit.testing import cpu_generator_with_random_lora
from lorakit.testing import write_random_lora as random_lora

SMALL = dict(steps=3, width=64, height=64, seed=7, sampler="Euler a")


@pytest.fixture(scope="module")
def xl_gen(tiny_sdxl_base, tmp_path_factory):
    return cpu_generator_with_random_lora(tiny_sdxl_base, tmp_path_factory.mktemp("xl_loras"), "xl_style")


def pixels(item):
    return np.asarray(item.image, dtype=np.int16)


def snapshot(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def changed(before, module):
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


# --- every sampler ---------------------------------------------------------------------------------
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_sampler_draws_on_sdxl_and_repeats_for_a_seed(xl_gen, sampler):
    p = GenerationParams(
        prompt="a (bear:1.2) in a forest", negative_prompt="blurry", **{**SMALL, "sampler": sampler}
    )
    first, again = xl_gen.generate(p)[0], xl_gen.generate(p)[0]
    assert first.image.size == (64, 64) and pixels(first).std() > 0
    assert np.array_equal(pixels(first), pixels(again))
    other = xl_gen.generate(GenerationParams(**{**p.__dict__, "seed": 8}))[0]
    assert not np.array_equal(pixels(first), pixels(other))
    assert parse_parameters(first.infotext)[2]["Sampler"] == sampler


def test_an_image_depends_only_on_its_seed_not_on_the_batch(xl_gen):
    batch = xl_gen.generate(GenerationParams(prompt="bear", batch_size=2, **{**SMALL, "seed": 100}))
    alone = xl_gen.generate(GenerationParams(prompt="bear", **{**SMALL, "seed": 101}))[0]
    assert [i.seed for i in batch] == [100, 101]
    # the same noise; batched kernels may round differently (as on SD1: test_batches_use_consecutive_seeds)
    assert np.abs(pixels(batch[1]) - pixels(alone)).max() <= 2


# --- conditioning as diffusers' StableDiffusionXLPipeline builds it -------------------------------
def sdxl_pipeline(base, scheduler=None):
    import diffusers

    scheduler = scheduler or diffusers.EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"
    )
    pipe = diffusers.StableDiffusionXLPipeline(
        vae=base.vae, text_encoder=base.text_encoder_1, text_encoder_2=base.text_encoder_2,
        tokenizer=base.tokenizer_1, tokenizer_2=base.tokenizer_2, unet=base.unet, scheduler=scheduler,
    )  # fmt: skip
    pipe.set_progress_bar_config(disable=True)
    return pipe


def recording_predict(monkeypatch):
    """Records (cond, size_ids) of every call of the SDXL family's predict during a drawing."""
    from lorakit.models.families.sdxl import SDXLFamily

    calls = []
    original = SDXLFamily.predict

    def predict(self, base, noisy, t, cond, size_ids):
        calls.append((cond, size_ids))
        return original(self, base, noisy, t, cond, size_ids)

    monkeypatch.setattr(SDXLFamily, "predict", predict)
    return calls


def test_generation_conditioning_equals_diffusers_encode_prompt_and_add_time_ids(xl_gen, monkeypatch):
    prompt, (w, h) = "a photo of a brown bear, in a forest", (64, 96)
    calls = recording_predict(monkeypatch)
    xl_gen.generate(GenerationParams(prompt=prompt, **{**SMALL, "width": w, "height": h, "steps": 1}))
    cond, size_ids = calls[0]  # one batch: the cond row, then the uncond row
    pipe = sdxl_pipeline(xl_gen.base)
    with torch.no_grad():
        embeds, neg, pooled, neg_pooled = pipe.encode_prompt(
            prompt, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=True
        )
    assert cond.context.shape == (2, 77, 80) and cond.pooled.shape == (2, 48)
    torch.testing.assert_close(cond.context[:1], embeds, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cond.pooled[:1], pooled, rtol=1e-5, atol=1e-5)
    # an empty negative prompt is zeros, as in A1111 and in diffusers (force_zeros_for_empty_prompt)
    assert not neg.any() and not neg_pooled.any()
    assert not cond.context[1:].any() and not cond.pooled[1:].any()
    dim = xl_gen.base.text_encoder_2.config.projection_dim
    time_ids = pipe._get_add_time_ids((h, w), (0, 0), (h, w), torch.float32, text_encoder_projection_dim=dim)
    assert torch.equal(size_ids, time_ids.expand(2, -1)) and size_ids[0].tolist() == [96, 64, 0, 0, 96, 64]


def test_a_negative_prompt_is_encoded_like_the_prompt(xl_gen):
    from lorakit.generate.sdxl_prompt import encode_sdxl_pair, encode_sdxl_prompt

    cond, uncond = encode_sdxl_pair(xl_gen.base, "bear", "blurry, lowres")
    alone = encode_sdxl_prompt(xl_gen.base, "blurry, lowres")
    assert torch.equal(uncond.context, alone.context) and torch.equal(uncond.pooled, alone.pooled)
    assert uncond.context.abs().sum() > 0 and not torch.equal(cond.context, uncond.context)


def test_emphasis_weights_each_encoder_and_keeps_its_mean_and_the_pooled_vector(xl_gen):
    from lorakit.generate.sdxl_prompt import encode_sdxl_prompt

    plain = encode_sdxl_prompt(xl_gen.base, "a brown bear in a forest")
    heavy = encode_sdxl_prompt(xl_gen.base, "a (brown bear:1.5) in a [forest]")
    d1 = xl_gen.base.text_encoder_1.config.hidden_size
    for part in (slice(0, d1), slice(d1, None)):  # CLIP-L, then bigG: each weighted on its own
        a, b = plain.context[..., part], heavy.context[..., part]
        assert not torch.allclose(a, b)
        torch.testing.assert_close(a.mean(), b.mean(), rtol=1e-4, atol=1e-6)  # A1111 restores the mean
    assert torch.equal(plain.pooled, heavy.pooled)  # pooled: the unweighted first chunk


def test_long_prompts_and_break_make_77_token_chunks_pooled_from_the_first(xl_gen):
    from lorakit.generate.sdxl_prompt import encode_sdxl_prompt

    words = ", ".join(["bear"] * 40)  # 79 tokens: two chunks
    long = encode_sdxl_prompt(xl_gen.base, words)
    assert long.context.shape[1] == 154
    broken = encode_sdxl_prompt(xl_gen.base, "a bear BREAK a forest")
    first = encode_sdxl_prompt(xl_gen.base, "a bear")
    assert broken.context.shape[1] == 154
    torch.testing.assert_close(broken.context[:, :77], first.context)
    assert torch.equal(broken.pooled, first.pooled)


def test_prompt_and_negative_of_different_lengths_run_apart(xl_gen, monkeypatch):
    calls = recording_predict(monkeypatch)
    item = xl_gen.generate(
        GenerationParams(prompt="a BREAK b", negative_prompt="blurry", **{**SMALL, "steps": 1})
    )
    assert [c.context.shape[1] for c, _ in calls[:2]] == [154, 77]  # A1111's default: not padded
    assert pixels(item[0]).std() > 0


@pytest.mark.parametrize("sampler", ["DDIM", "UniPC", "PLMS"])
def test_scheduler_samplers_draw_what_diffusers_sdxl_pipeline_draws(xl_gen, sampler):
    """DDIM/PLMS/UniPC through the family seam == StableDiffusionXLPipeline with the same embeddings,
    size ids and first latents."""
    from lorakit.generate.family_draw import FamilyPredictor, scheduler_sample
    from lorakit.generate.kdiffusion import SeededNoise
    from lorakit.generate.samplers import make_scheduler
    from lorakit.generate.sdxl_prompt import encode_sdxl_pair, sdxl_size_ids

    p = GenerationParams(prompt="bear", negative_prompt="blurry", **{**SMALL, "sampler": sampler, "steps": 4})
    cond, uncond = encode_sdxl_pair(xl_gen.base, "bear", "blurry")
    predict = FamilyPredictor(xl_gen.base, cond, uncond, sdxl_size_ids(64, 64))
    ours = scheduler_sample(
        predict, [7], (4, 8, 8), p, "epsilon", xl_gen.alphas_cumprod(), torch.device("cpu")
    )
    pipe = sdxl_pipeline(xl_gen.base, make_scheduler(sampler))
    with torch.no_grad():
        theirs = pipe(
            prompt_embeds=cond.context, pooled_prompt_embeds=cond.pooled,
            negative_prompt_embeds=uncond.context, negative_pooled_prompt_embeds=uncond.pooled,
            num_inference_steps=4, guidance_scale=p.cfg_scale, height=64, width=64,
            latents=SeededNoise([7], (4, 8, 8), "cpu").next(), output_type="latent",
        ).images  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


# --- LoRAs -----------------------------------------------------------------------------------------
def test_lora_weight_zero_draws_the_same_image_as_no_lora_and_one_another(xl_gen):
    plain = xl_gen.generate(GenerationParams(prompt="usu bear", **SMALL))[0]
    zero = xl_gen.generate(GenerationParams(prompt="usu bear <lora:xl_style:0>", **SMALL))[0]
    full = xl_gen.generate(GenerationParams(prompt="usu bear <lora:xl_style:1>", **SMALL))[0]
    assert np.array_equal(pixels(plain), pixels(zero))
    assert np.abs(pixels(full) - pixels(plain)).mean() > 1.0
    assert parse_parameters(full.infotext)[2]["Lora hashes"].startswith("xl_style: ")
    back = xl_gen.generate(GenerationParams(prompt="usu bear", **SMALL))[0]
    assert np.array_equal(pixels(plain), pixels(back))  # the base is restored after the LoRA


def test_te_multiplier_reaches_both_sdxl_text_encoders_and_unet_only_the_unet(xl_gen):
    base = xl_gen.base
    before = [snapshot(m) for m in (base.unet, base.text_encoder_1, base.text_encoder_2)]
    try:
        xl_gen.apply_loras("x <lora:xl_style:te=1:unet=0>")
        moved = [changed(b, m) for b, m in zip(before, (base.unet, base.text_encoder_1, base.text_encoder_2))]
        assert not moved[0] and moved[1] and moved[2]
        xl_gen.apply_loras("x <lora:xl_style:te=0:unet=1>")
        moved = [changed(b, m) for b, m in zip(before, (base.unet, base.text_encoder_1, base.text_encoder_2))]
        assert moved[0] and not moved[1] and not moved[2]
    finally:
        xl_gen.restore_base()
    assert not any(
        changed(b, m) for b, m in zip(before, (base.unet, base.text_encoder_1, base.text_encoder_2))
    )


def test_lora_of_the_other_family_is_refused_both_ways_before_any_weight_changes(xl_gen, tiny_base, tmp_path):
    sd1 = Generator.from_path(tiny_base, xl_gen.lora_dir, device="cpu")
    random_lora(sd1.base, xl_gen.lora_dir / "sd1_style.safetensors", seed=2)
    xl_before = [snapshot(m) for m in (xl_gen.unet, *xl_gen.base.text_encoders)]
    xl_gen.apply_loras("x <lora:xl_style:1>")  # merged now; the refusal leaves the base as loaded
    with pytest.raises(
        ModelError, match=r"'sd1_style'.*SD1\.x LoRA.*tiny-sdxl\.safetensors is an SDXL model"
    ):
        xl_gen.apply_loras("x <lora:xl_style:1> <lora:sd1_style:1>")
    assert not any(changed(b, m) for b, m in zip(xl_before, (xl_gen.unet, *xl_gen.base.text_encoders)))
    sd1_before = [snapshot(sd1.unet), snapshot(sd1.text_encoder)]
    with pytest.raises(ModelError, match=r"'xl_style'.*SDXL LoRA.*is an SD1\.x model"):
        sd1.apply_loras("x <lora:sd1_style:1> <lora:xl_style:1>")
    assert not changed(sd1_before[0], sd1.unet) and not changed(sd1_before[1], sd1.text_encoder)
    (xl_gen.lora_dir / "sd1_style.safetensors").unlink()


# --- PNG info --------------------------------------------------------------------------------------
def test_png_info_round_trip_and_from_png_redraws_the_sdxl_image(xl_gen, tiny_sdxl_base, tmp_path):
    from lorakit.cli import main

    out = tmp_path / "outputs"
    args = [
        "generate",
        "--model",
        str(tiny_sdxl_base),
        "--lora_dir",
        str(xl_gen.lora_dir),
        "--outdir",
        str(out),
    ]
    prompt = "usu bear, (in a forest:1.2) <lora:xl_style:0.5>"
    rc = main(args + ["--prompt", prompt, "--negative_prompt", "blurry", "--steps", "3", "--width", "64",
                      "--height", "96", "--seed", "1234", "--sampler", "DPM++ 2M Karras", "--cfg_scale", "6.5",
                      "--cfg_rescale", "0.5"])  # fmt: skip
    assert rc == 0
    first = out / "00000-1234.png"
    text = read_png_parameters(first)
    p, neg, kv = parse_parameters(text)
    assert p == prompt and neg == "blurry"
    assert list(kv)[:8] == [
        "Steps",
        "Sampler",
        "Schedule type",
        "CFG scale",
        "Seed",
        "Size",
        "Model hash",
        "Model",
    ]
    assert kv["Sampler"] == "DPM++ 2M" and kv["Schedule type"] == "Karras" and kv["CFG scale"] == "6.5"
    assert kv["Size"] == "64x96" and kv["Model"] == "tiny-sdxl" and len(kv["Model hash"]) == 10
    assert kv["Rescale CFG"] == "0.5" and kv["Lora hashes"].startswith("xl_style: ")
    assert list(kv)[-1] == "Version" and "Noise Schedule" not in kv
    assert main(args + ["--from_png", str(first)]) == 0
    again = out / "00001-1234.png"
    assert np.array_equal(np.asarray(Image.open(first)), np.asarray(Image.open(again)))
    assert read_png_parameters(again) == text


def test_from_png_reads_reforge_rescale_cfg(tmp_path):
    from lorakit.generate.pnginfo import save_png_with_parameters
    from lorakit.generate.txt2img import params_from_png

    text = "bear\nSteps: 20, Sampler: Euler a, CFG scale: 5, Seed: 1, Size: 1024x1024, rescale_cfg_enabled: True, rescale_cfg_multiplier: 0.7"
    save_png_with_parameters(Image.new("RGB", (8, 8)), tmp_path / "a.png", text)
    assert params_from_png(tmp_path / "a.png").cfg_rescale == 0.7
    save_png_with_parameters(Image.new("RGB", (8, 8)), tmp_path / "b.png", text.replace("True", "False"))
    assert params_from_png(tmp_path / "b.png").cfg_rescale == 0.0


# --- v-prediction, zero terminal SNR, CFG rescale ----------------------------------------------------
def test_zero_terminal_snr_schedule_is_a1111s():
    from lorakit.generate.samplers import k_sigmas
    from lorakit.models.schedule import draw_alphas_cumprod, sd_alphas_cumprod

    ac = draw_alphas_cumprod(zero_terminal_snr=True)
    assert ac[-1].item() == pytest.approx(4.8973451890853435e-08, rel=1e-6)
    assert ac[0].item() == pytest.approx(sd_alphas_cumprod()[0].item(), rel=1e-6)
    assert bool((ac[1:] < ac[:-1]).all())
    sigmas = k_sigmas("Euler", "Karras", 10, ac)
    assert torch.isfinite(sigmas).all() and sigmas[0].item() == pytest.approx(4518.8, rel=1e-3)
    assert k_sigmas("Euler", "Karras", 10)[0].item() == pytest.approx(14.6146, rel=1e-4)


@pytest.mark.parametrize("sampler", ["Euler a", "DPM++ 2M", "DPM++ 2M SDE", "DDIM", "UniPC"])
def test_v_prediction_ztsnr_base_draws_finite_images(tiny_sdxl_bases, sampler):
    gen = Generator.from_path(tiny_sdxl_bases["vpred"], device="cpu")
    assert gen.prediction_type == "v_prediction" and gen.zero_terminal_snr
    for phi in (0.0, 0.7):
        item = gen.generate(
            GenerationParams(prompt="bear", cfg_rescale=phi, **{**SMALL, "sampler": sampler})
        )[0]
        assert pixels(item).std() > 0
    kv = parse_parameters(item.infotext)[2]
    assert kv["Noise Schedule"] == "Zero Terminal SNR" and kv["Rescale CFG"] == "0.7"


def test_cfg_rescale_matches_its_definition_and_zero_is_plain_cfg():
    from lorakit.generate.samplers import rescale_cfg

    g = torch.Generator().manual_seed(0)
    x, cond, uncond = (torch.randn(2, 4, 8, 8, generator=g) for _ in range(3))
    sigma = torch.tensor([3.0, 0.5])
    plain = uncond + 7 * (cond - uncond)
    torch.testing.assert_close(rescale_cfg(cond, uncond, x, sigma, 7.0, 0.0), plain)
    full = rescale_cfg(cond, uncond, x, sigma, 7.0, 1.0)
    s = sigma.view(-1, 1, 1, 1)

    def v(d):  # the v of a denoised image at sigma
        return (x / (s * s + 1) - d) * (s * s + 1) ** 0.5 / s

    torch.testing.assert_close(v(full).std(dim=(1, 2, 3)), v(cond).std(dim=(1, 2, 3)))
    half = rescale_cfg(cond, uncond, x, sigma, 7.0, 0.5)
    torch.testing.assert_close(half, (plain + full) / 2, rtol=1e-4, atol=1e-4)


def test_cfg_rescale_changes_the_image(xl_gen):
    plain = xl_gen.generate(GenerationParams(prompt="bear", negative_prompt="x", **SMALL))[0]
    rescaled = xl_gen.generate(
        GenerationParams(prompt="bear", negative_prompt="x", cfg_rescale=0.7, **SMALL)
    )[0]
    assert not np.array_equal(pixels(plain), pixels(rescaled))
    assert "Rescale CFG" not in parse_parameters(plain.infotext)[2]


# --- VAE precision and the NaN guard ---------------------------------------------------------------
def test_vae_decodes_in_float32_and_a_nan_image_raises(xl_gen, tiny_sdxl_base, monkeypatch):
    from lorakit.generate import samplers

    gen = Generator.from_path(tiny_sdxl_base, device="cpu", dtype=torch.bfloat16)
    assert gen.vae.dtype == torch.float32 and gen.unet.dtype == torch.bfloat16
    monkeypatch.setattr(samplers, "k_sample", lambda *a, **k: torch.full((1, 4, 8, 8), float("nan")))
    with pytest.raises(GenerationError, match="seed 7.*NaN"):
        xl_gen.generate(GenerationParams(prompt="bear", **SMALL))


# --- samples while training, regularization images ----------------------------------------------------
def test_training_samples_are_drawn_on_sdxl(sdxl_config, tmp_path):
    from lorakit.train.trainer import train

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("usu bear --n blurry --w 64 --h 96 --s 2 --l 5 --d 42 --ss euler_a\nbear --s 2\n")
    cfg = sdxl_config(sample_prompts=str(prompts), sample_every_n_steps=2, max_train_steps=2)
    train(cfg)
    samples = sorted((tmp_path / "out" / "sample").glob("*.png"))
    assert len(samples) == 2, samples
    by_prompt = {parse_parameters(read_png_parameters(s))[0]: s for s in samples}
    kv = parse_parameters(read_png_parameters(by_prompt["usu bear"]))[2]
    assert kv["Size"] == "64x96" and kv["Steps"] == "2" and kv["Seed"] == "42" and kv["Sampler"] == "Euler a"
    assert (
        kv["CFG scale"] == "5" and parse_parameters(read_png_parameters(by_prompt["usu bear"]))[1] == "blurry"
    )
    assert parse_parameters(read_png_parameters(by_prompt["bear"]))[2]["Size"] == "64x64"  # training size


def test_reg_images_on_sdxl(tiny_sdxl_base, tmp_path, capsys):
    from lorakit.cli import main

    args = ["reg-images", "--model", str(tiny_sdxl_base), "--class_prompt", "bear", "--count", "2",
            "--out", str(tmp_path / "reg"), "--steps", "2", "--width", "64", "--height", "64", "--seed", "3"]  # fmt: skip
    assert main(args) == 0
    files = sorted((tmp_path / "reg" / "1_bear").glob("*.png"))
    assert [f.name for f in files] == ["bear_00000.png", "bear_00001.png"]
    kv = [parse_parameters(read_png_parameters(f))[2] for f in files]
    assert [k["Seed"] for k in kv] == ["3", "4"] and kv[0]["Model"] == "tiny-sdxl"
    assert np.asarray(Image.open(files[0])).std() > 0
