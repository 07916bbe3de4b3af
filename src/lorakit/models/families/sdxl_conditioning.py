"""SDXL conditioning as kohya's sdxl_train_network.py builds it (sd-scripts library/strategy_sdxl.py,
sdxl_train_util.get_size_embeddings, train_util's crop rule).

- context [B, T, 768 + 1280]: TE1 `hidden_states[11]` (= [-2] of CLIP-L's 12 layers) and TE2
  `hidden_states[-2]`, neither through the final LayerNorm, joined on the feature axis.
- pooled [B, 1280]: TE2's final-LN output at the first EOS token, through `text_projection`.
- `max_token_length` 150/225: 75-token chunks, each <BOS> 75 <EOS|pad> encoded alone, joined back as
  <BOS> chunks <last> -> T = 1 + k*75 + 1 = 152/227, the same as SD1 (kohya's SDXL reassembly loops
  `range(1, k*77, 77)` like SD1's); the pooled vector is the first chunk's (`pool2[::n_size]`).
- y [B, 2816]: pooled + 256-d cos|sin features of (orig h, w, crop top, left, target h, w), what
  diffusers' UNet builds from added_cond_kwargs {"text_embeds", "time_ids"}.

The text_projection orientation: the SGM file stores bigG's `text_projection` as OpenCLIP does
(pooled = x_eos @ P). lorakit follows OpenCLIP and diffusers' single-file converter, which load it
into transformers' Linear as P.T (checked numerically in tests/test_models_sdxl.py::
test_text_projection_orientation). kohya's own single-file loader (sdxl_model_util) maps the key
`text_projection` -> `text_projection.weight` with its own converter and writes it back the same way
when saving, so a kohya round trip is self-consistent whichever way it goes; if that mapping does not
transpose, kohya's pooled vector is x_eos @ P.T for single-file bases. That touches only the pooled
1280 of the 2816-wide y, never LoRA names or shapes; lorakit keeps the diffusers/OpenCLIP convention
(the one the base was trained with and that A1111/ComfyUI/diffusers sample with).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorakit.models.text import join_chunks, tokenize

SIZE_EMBED_DIM = 256  # kohya get_size_embeddings / diffusers addition_time_embed_dim


def _penultimate(text_encoder, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden_states[-2] [N, 77, D], final-LN last_hidden_state [N, 77, D]) for ids [N, 77]."""
    if ids.device != text_encoder.device:  # the training step's ids are there already
        ids = ids.to(text_encoder.device)
    out = text_encoder(ids, output_hidden_states=True, return_dict=True)
    return out.hidden_states[-2], out.last_hidden_state


def pooled_at_eos(text_encoder_2, last_hidden: torch.Tensor, ids: torch.Tensor, eos_id: int) -> torch.Tensor:
    """kohya's pool_workaround: final-LN state at the first EOS of each row, through text_projection
    (transformers' own pooling takes argmax(ids), which is the same token for plain CLIP vocab)."""
    eos_index = (ids == eos_id).int().argmax(dim=1)
    if eos_index.device != last_hidden.device:
        eos_index = eos_index.to(last_hidden.device)
    pooled = last_hidden[torch.arange(last_hidden.shape[0], device=last_hidden.device), eos_index]
    projection = text_encoder_2.text_projection
    return projection(pooled.to(projection.weight.dtype)).to(last_hidden.dtype)


def encode_sdxl_captions(
    model, captions: Sequence[str], max_token_length: int | None = None, clip_skip: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(context [B, 77 or 2 + k*75, D1 + D2], pooled [B, P]) for `model` (SdxlModel or anything with
    tokenizer_1/2, text_encoder_1/2). `clip_skip` is ignored, as kohya ignores it for SDXL (it only
    warns, sdxl_train_util.verify_sdxl_training_args): SDXL always takes the penultimate layers."""
    del clip_skip
    return encode_sdxl_ids(model, *tokenize_sdxl(model, captions, max_token_length))


def tokenize_sdxl(
    model, captions: Sequence[str], max_token_length: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Both encoders' token ids [B, k, 77]: TE1's padded with EOS, TE2's with 0."""
    captions = list(captions)
    return tokenize(model.tokenizer_1, captions, max_token_length), tokenize(
        model.tokenizer_2, captions, max_token_length
    )


def encode_sdxl_ids(model, ids1: torch.Tensor, ids2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """encode_sdxl_captions from tokenize_sdxl's ids (on the encoders' device: no copy here)."""
    b, k, n = ids1.shape
    hidden1, _ = _penultimate(model.text_encoder_1, ids1.reshape(b * k, n))
    hidden2, last2 = _penultimate(model.text_encoder_2, ids2.reshape(b * k, n))
    pooled = pooled_at_eos(
        model.text_encoder_2, last2, ids2.reshape(b * k, n), model.tokenizer_2.eos_token_id
    )
    context = torch.cat([join_chunks(hidden1, b, k), join_chunks(hidden2, b, k)], dim=-1)
    return context, pooled[::k]  # the first chunk's pooled vector


# --------------------------------------------------------------------------- size / crop vector


def sdxl_add_time_ids(
    original_size: tuple[int, int], crop_top_left: tuple[int, int], target_size: tuple[int, int]
) -> torch.Tensor:
    """The 6 numbers (orig h, orig w, crop top, crop left, target h, target w) as a float [6] tensor;
    all pairs are (height, width) / (top, left) as in kohya and diffusers' _get_add_time_ids."""
    return torch.tensor([*original_size, *crop_top_left, *target_size], dtype=torch.float32)


def size_embedding(time_ids: torch.Tensor, unet=None) -> torch.Tensor:
    """[B, 6] -> [B, 6*256] sinusoidal features (cos first, like kohya's timestep_embedding and diffusers'
    Timesteps(256, flip_sin_to_cos=True, 0)); uses the UNet's own add_time_proj when given."""
    from diffusers.models.embeddings import Timesteps

    proj = unet.add_time_proj if unet is not None else Timesteps(SIZE_EMBED_DIM, True, 0)
    b = time_ids.shape[0]
    return proj(time_ids.flatten()).reshape(b, -1)


def sdxl_vector(pooled: torch.Tensor, time_ids: torch.Tensor, unet=None) -> torch.Tensor:
    """kohya's vector_embedding y = cat(pooled, size features): [B, P + 6*256] (2816 for SDXL)."""
    if time_ids.ndim == 1:
        time_ids = time_ids.expand(pooled.shape[0], -1)
    feats = size_embedding(time_ids.to(pooled.device), unet).to(pooled.dtype)
    return torch.cat([pooled, feats], dim=-1)


def predict_with_vector(unet, noisy: torch.Tensor, timesteps, context: torch.Tensor, y: torch.Tensor):
    """Run a diffusers SDXL UNet with kohya's (context, y) instead of added_cond_kwargs: y goes straight
    into add_embedding (the SGM label_emb), which is what the UNet builds from text_embeds + time_ids."""
    b = noisy.shape[0]
    placeholder = {"text_embeds": y[:, :0], "time_ids": torch.zeros(b, 6, device=y.device)}
    handle = unet.add_embedding.register_forward_pre_hook(lambda _m, args: (y.to(args[0].dtype),))
    try:
        return unet(noisy, timesteps, encoder_hidden_states=context, added_cond_kwargs=placeholder).sample
    finally:
        handle.remove()


# --------------------------------------------------------------------------- kohya's crop rule


def crop_ltrb(bucket_size: tuple[int, int], image_size: tuple[int, int]) -> tuple[float, ...]:
    """kohya's BucketManager.get_crop_ltrb((bucket w, h), (image w, h)): "to match Stability AI's
    preprocessing" it fits the image INSIDE the bucket (letterbox) and returns the centred
    (left, top, right, bottom) of that fit, not the offset of kohya's own cover-resize + crop."""
    bucket_w, bucket_h = bucket_size
    bucket_ar = bucket_w / bucket_h
    image_ar = image_size[0] / image_size[1]
    if bucket_ar > image_ar:  # bucket wider: fit the height
        resized_w, resized_h = bucket_h * image_ar, bucket_h
    else:
        resized_w, resized_h = bucket_w, bucket_w / image_ar
    left = (bucket_w - resized_w) // 2
    top = (bucket_h - resized_h) // 2
    return left, top, left + resized_w, top + resized_h


def crop_top_left(
    bucket_size: tuple[int, int], image_size: tuple[int, int], flipped: bool = False
) -> tuple[int, int]:
    """(top, left) for the size vector, as kohya's dataset fills crop_top_lefts: with flip_aug the left
    offset is mirrored, left = bucket_w - crop_right; int() truncates like kohya's. random_crop does not
    change it (kohya's comment: it has no way to reflect it)."""
    left, top, right, _ = crop_ltrb(bucket_size, image_size)
    if flipped:
        left = bucket_size[0] - right
    return int(top), int(left)
