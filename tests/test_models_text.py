"""Prompt encoding like kohya's SD1 strategy: padding, 75-token chunks, clip_skip."""

from __future__ import annotations

import pytest
import torch

from lorakit.errors import ConfigError
from lorakit.models.text import encode_prompts, encode_tokens, tokenize
from lorakit.models.tiny import build_models, tiny_arch
from lorakit.models.tokenizer import BOS_ID, EOS_ID, load_tokenizer

LONG = ", ".join(f"word{i} cat" for i in range(60))  # well over 150 tokens


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def te():
    return build_models(tiny_arch(), seed=0)[2]


def test_tokenize_pads_with_eos(tok):
    ids = tokenize(tok, ["a photo of a cat", "dog"])
    assert ids.shape == (2, 1, 77) and ids.dtype == torch.long
    assert ids[0, 0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert (ids[0, 0, 7:] == EOS_ID).all()
    long = tokenize(tok, [LONG])
    assert long[0, 0, 0] == BOS_ID and long[0, 0, -1] == EOS_ID  # truncated, still ends with EOS


@pytest.mark.parametrize("max_len,k", [(75, 1), (150, 2), (225, 3)])
def test_tokenize_chunks(tok, max_len, k):
    ids = tokenize(tok, [LONG, "short"], max_len)
    assert ids.shape == (2, k, 77)
    assert (ids[:, :, 0] == BOS_ID).all() and (ids[:, :, -1] == EOS_ID).all()
    full = tok(LONG, add_special_tokens=False).input_ids
    body = ids[0, :, 1:-1].reshape(-1).tolist()  # 75 tokens of each chunk, in order
    assert body == full[: k * 75]
    assert ids[1, 0, :3].tolist() == [BOS_ID, *tok("short", add_special_tokens=False).input_ids, EOS_ID][:3]
    assert (ids[1, 1:, 1:] == EOS_ID).all()  # later chunks of a short prompt: padding


def test_bad_max_token_length(tok):
    with pytest.raises(ConfigError, match="max_token_length"):
        tokenize(tok, ["x"], 100)


def test_encode_plain_and_clip_skip(tok, te):
    prompts = ["a photo of a cat", "a dog"]
    ids = tok(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
    with torch.no_grad():
        out = encode_prompts(tok, te, prompts, clip_skip=None)
        assert out.shape == (2, 77, 32)
        assert torch.allclose(out, te(ids).last_hidden_state)
        assert torch.allclose(encode_prompts(tok, te, prompts, clip_skip=1), out)
        skip2 = encode_prompts(tok, te, prompts, clip_skip=2)
        hidden = te(ids, output_hidden_states=True).hidden_states[-2]
        final_norm = getattr(te, "text_model", te).final_layer_norm  # transformers >= 5.6: no text_model
        assert torch.allclose(skip2, final_norm(hidden))
        assert not torch.allclose(skip2, out)


@pytest.mark.parametrize("max_len,k", [(150, 2), (225, 3)])
def test_encode_long_prompts_like_kohya(tok, te, max_len, k):
    ids = tokenize(tok, [LONG, "short"], max_len)
    with torch.no_grad():
        out = encode_tokens(te, ids, clip_skip=2)
        assert out.shape == (2, 2 + 75 * k, 32)
        # each chunk through the text encoder on its own, penultimate layer + final norm (clip_skip 2)
        final_norm = getattr(te, "text_model", te).final_layer_norm  # transformers >= 5.6: no text_model
        per_chunk = [final_norm(te(ids[:, i], output_hidden_states=True).hidden_states[-2]) for i in range(k)]
    # kohya keeps the first BOS, every chunk's 75 tokens, the last EOS
    assert torch.allclose(out[:, 0], per_chunk[0][:, 0], atol=1e-6)
    for i in range(k):
        assert torch.allclose(out[:, 1 + 75 * i : 1 + 75 * (i + 1)], per_chunk[i][:, 1:76], atol=1e-6)
    assert torch.allclose(out[:, -1], per_chunk[-1][:, -1], atol=1e-6)
