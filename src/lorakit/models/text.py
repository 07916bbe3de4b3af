"""Prompt -> text-encoder hidden states, the way kohya's SD1 strategy (library/strategy_sd.py) does it.

max_token_length 150/225 splits the prompt into 2/3 chunks of 75 tokens, each wrapped as
<BOS> 75 tokens <EOS> and encoded separately; the outputs are joined back as
<BOS> chunk1 chunk2 [chunk3] <EOS> (first chunk's BOS, last chunk's EOS), i.e. 1 + n*75 + 1 tokens.
"""

from __future__ import annotations

import torch

from lorakit.errors import ConfigError

CHUNK = 77  # CLIP's context: BOS + 75 tokens + EOS


def _n_chunks(max_token_length: int | None) -> int:
    if max_token_length is None:
        return 1
    if max_token_length <= 0 or max_token_length % (CHUNK - 2):
        raise ConfigError(f"max_token_length must be empty, 75, 150 or 225, not {max_token_length}.")
    return max_token_length // (CHUNK - 2)


def tokenize(tokenizer, prompts: list[str], max_token_length: int | None = None) -> torch.Tensor:
    """Token ids [B, k, 77], k = max_token_length / 75 (1 when None); padded with the tokenizer's pad
    (SD1: EOS; SDXL's TE2: 0, whose chunk ends kohya patches as below)."""
    k = _n_chunks(max_token_length)
    length = k * (CHUNK - 2) + 2
    ids = tokenizer(
        list(prompts), padding="max_length", truncation=True, max_length=length, return_tensors="pt"
    ).input_ids  # [B, length]: BOS, tokens, EOS, pad (=EOS)...
    if k == 1:
        return ids.unsqueeze(1)
    bos, last = ids[:, :1], ids[:, -1:]  # last is EOS (SD1: the prompt's own EOS or padding) or pad
    chunks = [
        torch.cat([bos, ids[:, i : i + CHUNK - 2], last], dim=1) for i in range(1, length - 1, CHUNK - 2)
    ]
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id
    if pad != eos:  # kohya's "v2 or SDXL" branch (strategy_base._get_input_ids), e.g. SDXL's TE2 (pad 0)
        for chunk in chunks:
            cut = (chunk[:, -2] != eos) & (chunk[:, -2] != pad)  # a chunk cut mid-prompt ends in EOS
            chunk[cut, -1] = eos
            empty = chunk[:, 1] == pad  # an empty chunk is <BOS> <EOS> <pad>...
            chunk[empty, 1] = eos
    return torch.stack(chunks, dim=1)


def encode_tokens(text_encoder, ids: torch.Tensor, clip_skip: int | None = None) -> torch.Tensor:
    """Hidden states [B, 77, D] (k == 1) or [B, 2 + k*75, D] for ids [B, k, 77] from tokenize()."""
    b, k, n = ids.shape
    flat = ids.reshape(b * k, n)
    if flat.device != text_encoder.device:  # the training step's ids are there already
        flat = flat.to(text_encoder.device)
    if clip_skip is None or clip_skip <= 1:
        hidden = text_encoder(flat)[0]  # last_hidden_state, already final-layer-normed
    else:
        out = text_encoder(flat, output_hidden_states=True, return_dict=True)
        # transformers >= 5.6 has no text_model wrapper
        final_norm = getattr(text_encoder, "text_model", text_encoder).final_layer_norm
        hidden = final_norm(out.hidden_states[-clip_skip])
    return join_chunks(hidden, b, k)


def join_chunks(hidden: torch.Tensor, b: int, k: int) -> torch.Tensor:
    """[B*k, 77, D] -> [B, 77, D] (k == 1) or [B, 2 + k*75, D]: each chunk's BOS/EOS dropped except the
    first BOS and the last token (kohya's states_list, the same for SD1 and both SDXL encoders)."""
    n = hidden.shape[1]
    hidden = hidden.reshape(b, k * n, hidden.shape[-1])
    if k == 1:
        return hidden
    parts = [hidden[:, :1]] + [hidden[:, i : i + n - 2] for i in range(1, k * n, n)] + [hidden[:, -1:]]
    return torch.cat(parts, dim=1)


def encode_prompts(
    tokenizer,
    text_encoder,
    prompts: list[str],
    clip_skip: int | None = None,
    max_token_length: int | None = None,
) -> torch.Tensor:
    """tokenize() then encode_tokens(): [B, 77, D] or [B, 2 + k*75, D]."""
    return encode_tokens(text_encoder, tokenize(tokenizer, prompts, max_token_length), clip_skip)
