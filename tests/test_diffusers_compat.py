"""A lorakit file loads in diffusers' `load_lora_weights` with every key used, and diffusers'
LoRA-loaded model computes what lorakit's own merged weights compute."""

import logging

import torch

from lorakit.models.loader import load_base_model
from lorakit.models.text import encode_prompts
from lorakit.network.file import read_lora_file
from lorakit.network.merge import merge_lora


def pipeline(base):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=base.vae,
        text_encoder=base.text_encoder,
        tokenizer=base.tokenizer,
        unet=base.unet,
        scheduler=DDPMScheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def outputs(base, prompt="usu bear"):
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        cond = encode_prompts(base.tokenizer, base.text_encoder, [prompt])
        eps = base.unet(latents, torch.tensor([500]), cond).sample
    return cond, eps


def test_diffusers_loads_every_key_and_matches_merged_weights(trained_lora, tiny_base, caplog):
    tensors, _ = read_lora_file(trained_lora)
    modules = {k.split(".")[0] for k in tensors}
    assert any(m.startswith("lora_te_") for m in modules) and any("resnets" in m for m in modules)

    plain = load_base_model(tiny_base)
    cond0, eps0 = outputs(plain)

    # lorakit: merge the file into the weights
    merged = load_base_model(tiny_base)
    n = merge_lora(merged.unet, merged.text_encoder, tensors)
    assert n == len(modules)
    cond_m, eps_m = outputs(merged)

    # diffusers: load the same file as a PEFT adapter
    via_diffusers = load_base_model(tiny_base)
    pipe = pipeline(via_diffusers)
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(trained_lora), adapter_name="usu")
    unused = [
        r.message
        for r in caplog.records
        if "unexpected" in r.message.lower() or "not loaded" in r.message.lower()
    ]
    assert not unused, unused
    from peft.tuners.lora import LoraLayer

    wrapped = [m for mod in (pipe.unet, pipe.text_encoder) for m in mod.modules() if isinstance(m, LoraLayer)]
    assert len(wrapped) == len(modules)  # every module in the file became a LoRA layer
    cond_d, eps_d = outputs(via_diffusers)

    # The LoRA matters, and both loaders agree on what it does.
    assert (cond_m - cond0).abs().max() > 1e-3 and (eps_m - eps0).abs().max() > 1e-3
    torch.testing.assert_close(cond_d, cond_m, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(eps_d, eps_m, rtol=1e-4, atol=1e-5)


def test_merging_is_undone_by_reloading_and_scales_with_multiplier(trained_lora, tiny_base):
    tensors, _ = read_lora_file(trained_lora)
    half = load_base_model(tiny_base)
    full = load_base_model(tiny_base)
    plain = load_base_model(tiny_base)
    # text-encoder/UNet multipliers act only on their part: UNet-only merge leaves the TE as it was
    merge_lora(half.unet, half.text_encoder, tensors, te_multiplier=0.0, unet_multiplier=0.5)
    merge_lora(full.unet, full.text_encoder, tensors, te_multiplier=0.0, unet_multiplier=1.0)
    for (name, p0), p_half, p_full in zip(
        plain.unet.named_parameters(), half.unet.parameters(), full.unet.parameters()
    ):
        torch.testing.assert_close(p_half - p0, 0.5 * (p_full - p0), rtol=1e-4, atol=1e-6, msg=name)
    for p0, p in zip(plain.text_encoder.parameters(), half.text_encoder.parameters()):
        assert torch.equal(p0, p)
