"""diffusers <-> LDM key layout: exact round trips on tiny models, real SD1.5 names on the meta device."""

from __future__ import annotations

import pytest
import torch

from lorakit.models import ldm_layout
from lorakit.models.loader import build_from_arch, load_base_model, save_ldm_checkpoint, sd15_arch
from lorakit.models.tiny import build_models, tiny_arch


def _deeper_arch() -> dict:
    """Three UNet blocks, 2 layers per block, 3 VAE blocks: exercises other index arithmetic."""
    arch = tiny_arch()
    arch["unet"].update(
        block_out_channels=[32, 32, 64],
        layers_per_block=2,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        up_block_types=["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    )
    arch["vae"].update(
        block_out_channels=[8, 16, 16],
        layers_per_block=2,
        down_block_types=["DownEncoderBlock2D"] * 3,
        up_block_types=["UpDecoderBlock2D"] * 3,
    )
    arch["text_encoder"].update(num_hidden_layers=3)
    return arch


def _unwrapped(sd: dict) -> dict:
    """Keys without `text_model.`: transformers >= 5.6 dropped that wrapper, diffusers' converter keeps it."""
    return {k.removeprefix("text_model."): v for k, v in sd.items()}


@pytest.mark.parametrize("make_arch", [tiny_arch, _deeper_arch])
def test_round_trip_through_diffusers_converters(make_arch):
    arch = make_arch()
    models = build_models(arch, seed=1)
    sds = [m.state_dict() for m in models]
    ldm = ldm_layout.to_ldm_state_dict(*sds)
    assert len(ldm) == sum(len(sd) for sd in sds)  # TE has no persistent position_ids here
    assert all(k.startswith(ldm_layout.PREFIXES) for k in ldm)
    back = ldm_layout.from_ldm_state_dict(ldm, arch["unet"], arch["vae"])
    for want, got in zip(map(_unwrapped, sds), map(_unwrapped, back)):
        assert set(want) == set(got)
        for k in want:
            assert torch.equal(want[k], got[k]), k


def test_deeper_arch_loads_from_file(tmp_path):
    arch = _deeper_arch()
    models = build_models(arch, seed=2)
    base = load_base_model(save_ldm_checkpoint(tmp_path / "d.safetensors", *models, arch=arch))
    for want, got in zip(models, (base.unet, base.vae, base.text_encoder)):
        a, b = want.state_dict(), got.state_dict()
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_unknown_key_is_an_error():
    with pytest.raises(ValueError, match="class_embedding"):
        ldm_layout.unet_to_ldm({"class_embedding.linear_1.weight": torch.zeros(1)})


@pytest.fixture(scope="module")
def sd15_meta():
    arch = sd15_arch()
    with torch.device("meta"):
        models = build_from_arch(arch)
    return arch, models


def test_sd15_parameter_counts(sd15_meta):
    _, (unet, vae, te) = sd15_meta
    counts = [sum(p.numel() for p in m.parameters()) for m in (unet, vae, te)]
    assert counts == [859_520_964, 83_653_863, 123_060_480]


def test_sd15_ldm_names_and_counts(sd15_meta):
    arch, models = sd15_meta
    sds = [m.state_dict() for m in models]
    ldm = ldm_layout.to_ldm_state_dict(*sds)
    # key counts of runwayml's v1-5-pruned(-emaonly) (the TE there has one more: position_ids)
    assert sum(k.startswith("model.diffusion_model.") for k in ldm) == 686
    assert sum(k.startswith("first_stage_model.") for k in ldm) == 248
    assert sum(k.startswith("cond_stage_model.transformer.") for k in ldm) == 196
    expect = {
        "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3),
        "model.diffusion_model.input_blocks.1.1.proj_in.weight": (320, 320, 1, 1),
        "model.diffusion_model.input_blocks.3.0.op.weight": (320, 320, 3, 3),
        "model.diffusion_model.input_blocks.4.0.skip_connection.weight": (640, 320, 1, 1),
        "model.diffusion_model.input_blocks.11.0.out_layers.3.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_k.weight": (1280, 768),
        "model.diffusion_model.middle_block.2.emb_layers.1.weight": (1280, 1280),
        "model.diffusion_model.output_blocks.2.1.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.5.2.conv.weight": (1280, 1280, 3, 3),
        "model.diffusion_model.output_blocks.11.1.transformer_blocks.0.ff.net.0.proj.weight": (2560, 320),
        "model.diffusion_model.time_embed.0.weight": (1280, 320),
        "model.diffusion_model.out.2.weight": (4, 320, 3, 3),
        "first_stage_model.encoder.mid.attn_1.q.weight": (512, 512, 1, 1),
        "first_stage_model.decoder.mid.attn_1.proj_out.weight": (512, 512, 1, 1),
        "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight": (256, 128, 1, 1),
        "first_stage_model.decoder.up.0.block.0.nin_shortcut.weight": (128, 256, 1, 1),
        "first_stage_model.decoder.up.3.upsample.conv.weight": (512, 512, 3, 3),
        "first_stage_model.quant_conv.weight": (8, 8, 1, 1),
        "first_stage_model.encoder.norm_out.weight": (512,),
        "cond_stage_model.transformer.text_model.encoder.layers.11.mlp.fc2.weight": (768, 3072),
        "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
        "cond_stage_model.transformer.text_model.final_layer_norm.weight": (768,),
    }
    for key, shape in expect.items():
        assert tuple(ldm[key].shape) == shape, key
    # and diffusers' own converters take the names back (meta tensors carry shapes)
    back = ldm_layout.from_ldm_state_dict(ldm, arch["unet"], arch["vae"])
    for want, got in zip(map(_unwrapped, sds), map(_unwrapped, back)):
        assert set(want) == set(got)
        assert all(want[k].shape == got[k].shape for k in want)
