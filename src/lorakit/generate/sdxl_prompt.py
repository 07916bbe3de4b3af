"""SDXL prompts as A1111 encodes them (modules/sd_hijack_clip.py, sd_hijack_open_clip.py,
sd_models_xl.py), so the same prompt gives the same conditioning as in A1111 and Forge.

- Each encoder (CLIP-L, OpenCLIP bigG) splits the prompt into 75-token chunks on its own (the same
  BPE, so the same chunks; BREAK and A1111's comma backtrack included). CLIP-L pads a chunk with EOS,
  bigG with 0 after the first EOS (A1111's id_pad for OpenCLIP, as open_clip and diffusers pad).
- Each chunk goes through both encoders: penultimate hidden states (CLIP-L hidden_states[-2], bigG
  hidden_states[-2], no final LayerNorm), emphasis applied to each encoder's output apart (weights,
  then that encoder's chunk mean restored), joined on the feature axis: [1, 77*k, D1 + D2].
- pooled: bigG's final-LN state at the first EOS of the FIRST chunk, through text_projection,
  unweighted (A1111 keeps z.pooled from before the emphasis).
- An empty negative prompt is all zeros, context and pooled alike (sd_models_xl.get_learned_conditioning:
  force_zero_embeddings=['txt'] when every negative prompt is ""); the size numbers stay.
- clip_skip is not used: A1111 keeps SDXL on the penultimate layers (its sdxl_clip_l_skip is off by
  default), as kohya trains them.
- Size: original = target = (height, width) of the image, crop (0, 0) (A1111's sdxl_crop_top/left
  defaults).
"""

from __future__ import annotations

import torch

from lorakit.models.families.base import Conditioning

from .prompt import emphasize, tokenize_weighted


def _pad_after_eos(chunks: list[list[int]], eos: int, pad: int) -> list[list[int]]:
    """A1111's process_tokens for an encoder whose pad id is not EOS: everything after the first EOS
    of a chunk becomes the pad id."""
    if pad == eos:
        return chunks
    out = []
    for ids in chunks:
        end = ids.index(eos)
        out.append(ids[: end + 1] + [pad] * (len(ids) - end - 1))
    return out


def _encode_one(tokenizer, text_encoder, text: str, want_pooled: bool):
    """(context [77*k, D] emphasised, pooled [P] of the first chunk or None) for one encoder."""
    from lorakit.models.families.sdxl_conditioning import _penultimate, pooled_at_eos

    chunks, weights = tokenize_weighted(tokenizer, text)
    chunks = _pad_after_eos(chunks, tokenizer.eos_token_id, tokenizer.pad_token_id)
    ids = torch.tensor(chunks, dtype=torch.long)  # [k, 77]: each chunk encoded on its own
    hidden, last = _penultimate(text_encoder, ids)
    w = torch.tensor(weights, dtype=torch.float32, device=hidden.device).unsqueeze(-1)
    z = torch.cat([emphasize(zi, wi) for zi, wi in zip(hidden.float(), w)], dim=0).to(hidden.dtype)
    pooled = None
    if want_pooled:
        pooled = pooled_at_eos(text_encoder, last[:1], ids[:1], tokenizer.eos_token_id)[0]
    return z, pooled


def encode_sdxl_prompt(model, text: str) -> Conditioning:
    """Conditioning(context [1, 77*k, D1 + D2], pooled [1, P]) of one prompt (no <lora:> tags in it);
    `model` has tokenizer_1/2 and text_encoder_1/2 (a BaseModel)."""
    z1, _ = _encode_one(model.tokenizer_1, model.text_encoder_1, text, want_pooled=False)
    z2, pooled = _encode_one(model.tokenizer_2, model.text_encoder_2, text, want_pooled=True)
    if z1.shape[0] != z2.shape[0]:  # the two tokenizers are the same BPE; a custom one could differ
        raise ValueError(f"the SDXL tokenizers split {text!r} into different chunk counts")
    context = torch.cat([z1, z2.to(z1.device, z1.dtype)], dim=-1).unsqueeze(0)
    return Conditioning(context, pooled.unsqueeze(0).to(z1.device))


def encode_sdxl_pair(model, prompt: str, negative: str) -> tuple[Conditioning, Conditioning]:
    """(cond, uncond). Not padded to one length: A1111 (pad_cond_uncond off, its default) runs a prompt
    and a negative prompt of different lengths through the UNet apart; an empty negative is zeros."""
    cond = encode_sdxl_prompt(model, prompt)
    uncond = encode_sdxl_prompt(model, negative)
    if negative == "":
        uncond = Conditioning(torch.zeros_like(uncond.context), torch.zeros_like(uncond.pooled))
    return cond, uncond


def sdxl_size_ids(width: int, height: int) -> torch.Tensor:
    """[1, 6]: (original h, w, crop top, left, target h, w) as A1111 fills them for txt2img."""
    from lorakit.models.families.sdxl_conditioning import sdxl_add_time_ids

    return sdxl_add_time_ids((height, width), (0, 0), (height, width)).unsqueeze(0)
