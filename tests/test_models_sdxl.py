"""SDXL: shipped configs (counts on the meta device), SGM single-file / .ckpt / diffusers loading, and
bigG's text_projection orientation against OpenCLIP's formula and diffusers' own conversion.

The round trips use a tiny SDXL-shaped model (tiny_sdxl_arch: SGM naming, size embedding 6 x 256,
context = TE1 + TE2 width, but shrunk widths: context 80 and vector 1584). The real widths (context 2048,
vector 2816, bigG 32 x 1280 with a 1280 x 1280 projection) are checked on the meta device instead.
"""

from __future__ import annotations

import json

import pytest
import torch

from lorakit.errors import ModelError
from lorakit.models.checkpoint import read_state_dict
from lorakit.models.families import sgm_layout
from lorakit.models.families.sdxl import (
    VAE_SCALE_FACTOR,
    build_sdxl_empty,
    load_sdxl,
    save_sgm_checkpoint,
    sdxl_arch,
)
from lorakit.models.loader import load_base_model
from lorakit.models.tiny import build_sdxl_models, tiny_sdxl_arch


def _count(model) -> int:
    return sum(p.numel() for p in model.parameters())


def test_shipped_configs_have_sdxl_base_sizes():
    arch = sdxl_arch()
    unet, vae, te1, te2 = build_sdxl_empty(arch)
    assert next(unet.parameters()).device.type == "meta"
    # diffusers' SDXL base 1.0 UNet and the SD VAE, as published
    assert _count(unet) == 2_567_463_684
    assert _count(vae) == 83_653_863
    assert vae.config.scaling_factor == VAE_SCALE_FACTOR == 0.13025
    assert _count(te1) == 123_060_480  # CLIP ViT-L/14 text tower
    # bigG: embeddings + 32 layers (4 biased 1280^2 attention projections, 1280->5120->1280 gelu MLP,
    # two LayerNorms) + final LayerNorm + the 1280 x 1280 projection (no bias)
    d, ff, layers = 1280, 5120, 32
    per_layer = 4 * (d * d + d) + (d * ff + ff) + (ff * d + d) + 4 * d
    assert _count(te2) == 49408 * d + 77 * d + layers * per_layer + 2 * d + d * d == 694_659_840
    assert (te2.config.hidden_act, te2.config.num_attention_heads) == ("gelu", 20)
    assert (te1.config.hidden_act, te1.config.num_hidden_layers) == ("quick_gelu", 12)
    # the conditioning widths kohya hard-codes (CONTEXT_DIM, ADM_IN_CHANNELS)
    assert unet.config.cross_attention_dim == te1.config.hidden_size + te2.config.hidden_size == 2048
    assert unet.add_embedding.linear_1.in_features == te2.config.projection_dim + 6 * 256 == 2816
    assert unet.config.transformer_layers_per_block == [1, 2, 10]


def test_sgm_key_names_of_the_real_architecture():
    """SGM names of the real SDXL, from our diffusers->SGM writer, and diffusers reads them back 1:1."""
    arch = sdxl_arch()
    models = build_sdxl_empty(arch)
    sgm = sgm_layout.to_sgm_state_dict(*(m.state_dict() for m in models))
    shapes = {k: tuple(v.shape) for k, v in sgm.items()}
    u, te2 = "model.diffusion_model.", sgm_layout.TE2_PREFIX
    assert shapes[u + "input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"] == (640, 640)
    assert shapes[u + "input_blocks.7.1.transformer_blocks.1.attn2.to_k.weight"] == (1280, 2048)
    assert shapes[u + "middle_block.1.transformer_blocks.9.ff.net.0.proj.weight"] == (10240, 1280)
    assert shapes[u + "output_blocks.2.2.conv.weight"] == (1280, 1280, 3, 3)
    assert shapes[u + "input_blocks.6.0.op.weight"] == (640, 640, 3, 3)
    assert shapes[u + "label_emb.0.0.weight"] == (1280, 2816)
    assert shapes[u + "output_blocks.0.1.proj_in.weight"] == (1280, 1280)  # linear, not 1x1 conv
    assert not any(k.startswith(u + "input_blocks.9") for k in sgm)  # SDXL has 9 input blocks
    assert shapes[te2 + "transformer.resblocks.31.attn.in_proj_weight"] == (3840, 1280)
    assert shapes[te2 + "text_projection"] == (1280, 1280)
    assert shapes["conditioner.embedders.0.transformer.text_model.encoder.layers.11.mlp.fc2.weight"] == (
        768,
        3072,
    )
    back = sgm_layout.from_sgm_state_dict(sgm, arch)
    for model, sd in zip(models, back):
        # transformers >= 5.6 has no `text_model.` wrapper in CLIPTextModel; load_sdxl maps it
        own = {k.removeprefix("text_model.") for k in model.state_dict() if not k.endswith("position_ids")}
        assert {k.removeprefix("text_model.") for k in sd} == own


@pytest.fixture(scope="module")
def tiny_sdxl():
    arch = tiny_sdxl_arch()
    return arch, build_sdxl_models(arch, seed=0)


@pytest.fixture(scope="module")
def tiny_sgm_file(tiny_sdxl, tmp_path_factory):
    arch, models = tiny_sdxl
    return save_sgm_checkpoint(tmp_path_factory.mktemp("xl") / "tiny_xl.safetensors", *models, arch=arch)


def _assert_same(models, base):
    for want, got in zip(models, (base.unet, base.vae, base.text_encoder_1, base.text_encoder_2)):
        a, b = want.state_dict(), got.state_dict()
        assert set(a) == set(b)
        for k in a:
            assert torch.equal(a[k], b[k]), k


def test_sgm_safetensors_round_trip(tiny_sdxl, tiny_sgm_file, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    arch, models = tiny_sdxl
    sd, metadata = read_state_dict(tiny_sgm_file)
    assert json.loads(metadata["lorakit.arch"]) == arch
    assert all(k.startswith(sgm_layout.PREFIXES) for k in sd)
    assert "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight" in sd
    base = load_sdxl(tiny_sgm_file)
    assert (base.kind, base.family.key, base.family.v_pred) == ("single_file", "sdxl", False)
    assert base.arch == arch
    _assert_same(models, base)
    # TE2's tokenizer pads with "!" (id 0) as open_clip does; TE1's with EOS
    ids2 = base.tokenizer_2("a cat", padding="max_length", max_length=6).input_ids
    ids1 = base.tokenizer_1("a cat", padding="max_length", max_length=6).input_ids
    assert (ids1, ids2) == ([49406, 320, 2368, 49407, 49407, 49407], [49406, 320, 2368, 49407, 0, 0])


def test_ckpt_and_markers(tiny_sdxl, tmp_path):
    arch, models = tiny_sdxl
    sd = sgm_layout.to_sgm_state_dict(*(m.state_dict() for m in models))
    sd.update({"v_pred": torch.tensor([]), "ztsnr": torch.tensor([])})
    path = tmp_path / "xl.ckpt"
    torch.save({"state_dict": sd, "lorakit.arch": json.dumps(arch), "global_step": 3}, path)
    base = load_base_model(path)  # the one entry point: detects SDXL from the pickle's keys
    assert (base.family.v_pred, base.family.zero_terminal_snr) == (True, True)
    assert base.spec.key == "sdxl" and base.kind == "single_file"
    _assert_same(models, base)


def test_diffusers_folder(tiny_sdxl, tmp_path):
    arch, models = tiny_sdxl
    for name, model in zip(("unet", "vae", "text_encoder", "text_encoder_2"), models):
        model.save_pretrained(tmp_path / name)
    index = {"_class_name": "StableDiffusionXLPipeline", "text_encoder": ["transformers", "CLIPTextModel"]}
    index["text_encoder_2"] = ["transformers", "CLIPTextModelWithProjection"]
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    base = load_base_model(tmp_path)
    assert (base.kind, base.spec.key, base.family.v_pred) == ("diffusers", "sdxl", False)
    _assert_same(models, base)
    # a v-pred diffusers SDXL says so in its scheduler config (NoobAI's diffusers release does)
    (tmp_path / "scheduler").mkdir()
    scheduler = {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}
    (tmp_path / "scheduler" / "scheduler_config.json").write_text(json.dumps(scheduler))
    family = load_base_model(tmp_path).family
    assert (family.v_pred, family.zero_terminal_snr) == (True, True)


def test_text_projection_orientation(tiny_sdxl, tiny_sgm_file, tmp_path):
    """pooled = ln_final(x)[EOS] @ P with P the file's OpenCLIP matrix (as SGM/OpenCLIP compute it), and
    diffusers' own single-file conversion of the file gives the same TE2 weights."""
    from diffusers.loaders.single_file_utils import create_diffusers_clip_model_from_ldm
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    arch, _ = tiny_sdxl
    sd, _ = read_state_dict(tiny_sgm_file)
    projection = sd["conditioner.embedders.1.model.text_projection"]
    assert not torch.allclose(projection, projection.T)  # a transposition would show
    base = load_sdxl(tiny_sgm_file)
    ids = base.tokenizer_2(
        "a photo of a cat", padding="max_length", max_length=77, return_tensors="pt"
    ).input_ids
    with torch.no_grad():
        out = base.text_encoder_2(ids, output_hidden_states=True)
    eos = int((ids[0] == 49407).nonzero()[0])
    open_clip_pooled = out.last_hidden_state[0, eos] @ projection
    torch.testing.assert_close(out.text_embeds[0], open_clip_pooled)
    torch.testing.assert_close(
        base.text_encoder_2.text_projection(out.last_hidden_state[0, eos]), open_clip_pooled
    )

    CLIPTextConfig.from_dict(arch["text_encoder_2"]).save_pretrained(tmp_path / "text_encoder_2")
    theirs = create_diffusers_clip_model_from_ldm(
        CLIPTextModelWithProjection,
        sd,
        subfolder="text_encoder_2",
        config=str(tmp_path),
        local_files_only=True,
    ).state_dict()
    ours = base.text_encoder_2.state_dict()
    assert set(theirs) == set(ours)
    assert all(torch.equal(theirs[k], ours[k]) for k in ours)


def test_refusals(tiny_sgm_file, tmp_path):
    sd, metadata = read_state_dict(tiny_sgm_file)
    from safetensors.torch import save_file

    te2 = sgm_layout.TE2_PREFIX + "transformer.resblocks.0.mlp.c_fc.weight"
    bad = dict(sd)
    bad[te2] = torch.zeros(7, 48)
    save_file(bad, str(tmp_path / "bad.safetensors"), metadata=metadata)
    with pytest.raises(
        ModelError, match=r"bad\.safetensors: text_encoder_2 .*mlp\.fc1\.weight' has shape \[7, 48\]"
    ):
        load_sdxl(tmp_path / "bad.safetensors")
    sd1 = {
        k.replace("conditioner.embedders.0.transformer.", "cond_stage_model.transformer."): v
        for k, v in sd.items()
    }
    sd1 = {k: v for k, v in sd1.items() if not k.startswith(sgm_layout.TE2_PREFIX)}
    save_file(sd1, str(tmp_path / "sd1.safetensors"))
    with pytest.raises(ModelError, match=r"sd1\.safetensors: this is SD1\.x, not an SDXL base"):
        load_sdxl(tmp_path / "sd1.safetensors")
