"""SDXL conditioning (issue 10.3) against diffusers' SDXL pipeline on the tiny SDXL-shaped model
(context 32 + 48 = 80 wide, vector 48 + 6 x 256 = 1584; SDXL: 2048 and 2816), and kohya's crop rule."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from lorakit.models.families.sdxl import sdxl_tokenizers
from lorakit.models.families.sdxl_conditioning import (
    crop_ltrb,
    crop_top_left,
    encode_sdxl_captions,
    predict_with_vector,
    sdxl_add_time_ids,
    sdxl_vector,
)
from lorakit.models.text import tokenize
from lorakit.models.tiny import build_sdxl_models, tiny_sdxl_arch

PROMPT = "a photo of a red fox sitting in the snow, masterpiece"
LONG = ", ".join(f"tag{i}" for i in range(30))  # 109 tokens: two chunks


@pytest.fixture(scope="module")
def tiny():
    unet, vae, te1, te2 = build_sdxl_models(tiny_sdxl_arch(), seed=0)
    tok1, tok2 = sdxl_tokenizers()
    model = SimpleNamespace(
        unet=unet, vae=vae, text_encoder_1=te1, text_encoder_2=te2, tokenizer_1=tok1, tokenizer_2=tok2
    )
    return model


@pytest.fixture(scope="module")
def pipe(tiny):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    return StableDiffusionXLPipeline(
        vae=tiny.vae,
        text_encoder=tiny.text_encoder_1,
        text_encoder_2=tiny.text_encoder_2,
        tokenizer=tiny.tokenizer_1,
        tokenizer_2=tiny.tokenizer_2,
        unet=tiny.unet,
        scheduler=EulerDiscreteScheduler(),
    )


@torch.no_grad()
def test_captions_match_diffusers_encode_prompt(tiny, pipe):
    prompts = [PROMPT, "1girl, solo"]
    context, pooled = encode_sdxl_captions(tiny, prompts)
    embeds, _, pooled_ref, _ = pipe.encode_prompt(
        prompts, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False
    )
    assert context.shape == (2, 77, 32 + 48) and pooled.shape == (2, 48)
    torch.testing.assert_close(context, embeds, rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, pooled_ref, rtol=0, atol=1e-6)
    # the TE1 half is not final-layer-normed (penultimate layer, as kohya's hidden_states[11])
    ids = tokenize(tiny.tokenizer_1, prompts)[:, 0]
    final = tiny.text_encoder_1(ids)[0]
    assert not torch.allclose(context[..., :32], final, atol=1e-3)


def test_te2_chunks_follow_kohyas_pad_rule(tiny):
    eos = tiny.tokenizer_2.eos_token_id
    ids = tokenize(tiny.tokenizer_2, [LONG, "fox"], 225)  # [2, 3, 77]
    assert ids.shape == (2, 3, 77)
    # long prompt: chunk 1 is cut mid-prompt, so it ends in EOS (not the pad 0 that sat there)
    assert ids[0, 0, -1] == eos and ids[0, 0, -2] not in (eos, 0)
    # its second chunk holds the rest then EOS then pads; its empty third chunk is <BOS> <EOS> 0 ...
    assert ids[0, 1, 0] == tiny.tokenizer_2.bos_token_id and (ids[0, 1] == eos).sum() == 1
    assert ids[0, 2, 1] == eos and (ids[0, 2, 2:] == 0).all()
    # short prompt: every chunk after the first is <BOS> <EOS> 0 ...
    assert ids[1, 1, 1] == eos and ids[1, 2, 1] == eos and ids[1, 0, -1] == 0
    # TE1 (pad = EOS) keeps SD1's chunks: <BOS> 75 tokens <EOS>
    ids1 = tokenize(tiny.tokenizer_1, [LONG], 150)
    assert ids1.shape == (1, 2, 77) and ids1[0, 0, -1] == eos and ids1[0, 1, -1] == eos


@torch.no_grad()
@pytest.mark.parametrize(("max_len", "width"), [(150, 152), (225, 227)])
def test_long_prompts_are_152_or_227_tokens_like_kohya(tiny, max_len, width):
    """kohya's SDXL reassembly (strategy_sdxl: range(1, k*77, 77)) keeps BOS, k*75 tokens and the last
    token: 1 + k*75 + 1, the same as SD1, not k*77."""
    context, pooled = encode_sdxl_captions(tiny, [LONG, PROMPT], max_token_length=max_len)
    short_context, short_pooled = encode_sdxl_captions(tiny, [LONG, PROMPT])
    assert context.shape == (2, width, 80)
    # the first chunk is the 77-token encoding; its EOS slot is dropped, the pooled vector is its own
    torch.testing.assert_close(context[:, :76], short_context[:, :76], rtol=0, atol=1e-6)
    torch.testing.assert_close(pooled, short_pooled, rtol=0, atol=1e-6)
    # the rest of the long prompt reaches the context: chunk 2 differs from what padding would give
    assert not torch.allclose(context[0, 76:90], context[1, 76:90], atol=1e-3)


@torch.no_grad()
def test_time_ids_and_vector_match_diffusers_unet(tiny, pipe):
    original, crop, target = (1500, 1001), (13, 0), (1216, 832)
    ours = sdxl_add_time_ids(original, crop, target)
    theirs = pipe._get_add_time_ids(original, crop, target, torch.float32, text_encoder_projection_dim=48)
    torch.testing.assert_close(ours[None], theirs, rtol=0, atol=0)
    assert ours.tolist() == [1500, 1001, 13, 0, 1216, 832]

    context, pooled = encode_sdxl_captions(tiny, [PROMPT, "1girl"])
    y = sdxl_vector(pooled, ours, tiny.unet)
    assert y.shape == (2, 48 + 6 * 256)
    torch.testing.assert_close(y, sdxl_vector(pooled, ours), rtol=0, atol=1e-6)  # kohya's own embedding
    # hand values: frequency 0 of the first number is cos(1500) / sin(1500), cos first like kohya
    assert y[0, 48].item() == pytest.approx(torch.cos(torch.tensor(1500.0)).item(), abs=1e-6)
    assert y[0, 48 + 128].item() == pytest.approx(torch.sin(torch.tensor(1500.0)).item(), abs=1e-6)

    gen = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 700])
    time_ids = theirs.expand(2, -1)
    want = tiny.unet(
        noisy,
        t,
        encoder_hidden_states=context,
        added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids},
    ).sample
    got = predict_with_vector(tiny.unet, noisy, t, context, y)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
    # the size vector matters: another crop gives another prediction, and the hook is gone afterwards
    other = predict_with_vector(
        tiny.unet,
        noisy,
        t,
        context,
        sdxl_vector(pooled, sdxl_add_time_ids(original, (0, 0), target), tiny.unet),
    )
    assert not torch.allclose(other, want, atol=1e-4)
    assert not tiny.unet.add_embedding._forward_pre_hooks


@pytest.mark.parametrize(
    ("bucket", "image", "ltrb", "top_left", "flipped_top_left"),
    [
        # wide image in a less wide bucket: fit the width, letterbox top/bottom
        ((1024, 768), (2000, 1000), (0, 128, 1024, 640), (128, 0), (128, 0)),
        # square image in a portrait bucket
        ((832, 1216), (1000, 1000), (0, 192, 832, 1024), (192, 0), (192, 0)),
        # 1000x700 in 1216x832: fit height, width 832*10/7 = 1188.57, left (27.43)//2 = 13,
        # right 1201.57; flipped left = 1216 - 1201.57 = 14.43 -> 14
        ((1216, 832), (1000, 700), (13, 0, 13 + 832 * 10 / 7, 832), (0, 13), (0, 14)),
        # nearly square: left (1024 - 1022.98)//2 = 0, flipped left = 1.02 -> 1
        ((1024, 1024), (1000, 1001), (0, 0, 1024 * 1000 / 1001, 1024), (0, 0), (0, 1)),
    ],
)
def test_crop_top_left_is_kohyas_rule(bucket, image, ltrb, top_left, flipped_top_left):
    assert crop_ltrb(bucket, image) == pytest.approx(ltrb)
    assert crop_top_left(bucket, image) == top_left
    assert crop_top_left(bucket, image, flipped=True) == flipped_top_left
