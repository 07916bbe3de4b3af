"""A1111 prompt syntax: `<lora:...>` tags, `(emphasis:1.2)`, 75-token chunks and weighted encoding.

Follows AUTOMATIC1111's modules/extra_networks.py, modules/prompt_parser.py and
modules/sd_hijack_clip.py so the same prompt gives the same conditioning. torch is imported
lazily: parsing a prompt must stay cheap.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from lorakit.errors import ConfigError

CHUNK_TOKENS = 75  # tokens per chunk between BOS and EOS
COMMA_PADDING_BACKTRACK = 20  # A1111 default of opts.comma_padding_backtrack
LORA_KINDS = ("lora", "lyco")  # A1111 registers "lyco" as an alias of the Lora network

# A1111 extra-network tag: <kind:args>, args split on ':'
_RE_EXTRA_NET = re.compile(r"<(\w+):([^>]+)>")


@dataclass(frozen=True)
class LoraRef:
    """One `<lora:...>` tag: the LoRA's name and its text-encoder/UNet multipliers."""

    name: str
    te_multiplier: float = 1.0
    unet_multiplier: float = 1.0
    dyn: int | None = None  # DyLoRA rank to use; None = all


def _multiplier(value: str, tag: str) -> float:
    try:
        m = float(value)
    except ValueError:
        raise ConfigError(f"{tag}: multiplier {value!r} is not a number.") from None
    if not math.isfinite(m):
        raise ConfigError(f"{tag}: multiplier {value!r} must be a finite number.")
    return m


def _lora_ref(args: str, tag: str) -> LoraRef:
    positional: list[str] = []
    named: dict[str, str] = {}
    for item in args.split(":"):
        parts = item.split("=", 2)  # A1111: exactly one '=' makes a named argument
        if len(parts) == 2:
            named[parts[0].strip()] = parts[1]
        else:
            positional.append(item)
    unknown = sorted(set(named) - {"te", "unet", "dyn"})
    if unknown:
        raise ConfigError(f"{tag}: unknown argument {unknown[0]!r}; use te=, unet= or dyn=.")
    name = positional[0].strip() if positional else ""
    if not name:
        raise ConfigError(f"{tag}: the LoRA name is missing, write <lora:NAME:MULTIPLIER>.")
    te = _multiplier(positional[1], tag) if len(positional) > 1 else 1.0
    te = _multiplier(named["te"], tag) if "te" in named else te
    unet = _multiplier(positional[2], tag) if len(positional) > 2 else te
    unet = _multiplier(named["unet"], tag) if "unet" in named else unet
    dyn_text = named.get("dyn", positional[3] if len(positional) > 3 else None)
    dyn = None
    if dyn_text is not None:
        try:
            dyn = int(dyn_text)
        except ValueError:
            raise ConfigError(f"{tag}: dyn {dyn_text!r} must be a whole number (the DyLoRA rank).") from None
    return LoraRef(name, te, unet, dyn)


def extract_loras(prompt: str) -> tuple[str, list[LoraRef]]:
    """Remove `<lora:...>` tags from the prompt; returns the rest of the text (left as is) and the tags."""
    refs: list[LoraRef] = []

    def found(m: re.Match) -> str:
        kind, args = m.group(1), m.group(2)
        if kind not in LORA_KINDS:
            raise ConfigError(f"{m.group(0)}: lorakit supports only <lora:NAME:MULTIPLIER> extra networks.")
        refs.append(_lora_ref(args, m.group(0)))
        return ""

    return _RE_EXTRA_NET.sub(found, prompt), refs


# A1111's emphasis tokens, in order of precedence
_RE_ATTENTION = re.compile(
    r"""
\\\(|
\\\)|
\\\[|
\\]|
\\\\|
\\|
\(|
\[|
:\s*([+-]?[.\d]+)\s*\)|
\)|
]|
[^\\()\[\]:]+|
:
""",
    re.X,
)
_RE_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_ROUND = 1.1
_SQUARE = 1 / 1.1


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """Split text into (fragment, weight) like A1111; ("BREAK", -1) marks a chunk break.

    Unbalanced brackets are tolerated: an unclosed one applies to the rest of the text, an
    unopened closer is literal text. Adjacent fragments of equal weight are merged.
    """
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply_from(start: int, factor: float) -> None:
        for p in range(start, len(res)):
            res[p][1] *= factor

    for m in _RE_ATTENTION.finditer(text):
        piece, weight = m.group(0), m.group(1)
        if piece.startswith("\\"):
            res.append([piece[1:], 1.0])
        elif piece == "(":
            round_open.append(len(res))
        elif piece == "[":
            square_open.append(len(res))
        elif weight is not None and round_open:
            try:
                factor = float(weight)
            except ValueError:  # "(a:1.2.3)": A1111 fails here too
                raise ConfigError(f"Prompt emphasis {piece!r} is not a number.") from None
            multiply_from(round_open.pop(), factor)
        elif piece == ")" and round_open:
            multiply_from(round_open.pop(), _ROUND)
        elif piece == "]" and square_open:
            multiply_from(square_open.pop(), _SQUARE)
        else:
            for i, part in enumerate(_RE_BREAK.split(piece)):
                if i > 0:
                    res.append(["BREAK", -1])
                res.append([part, 1.0])

    for pos in round_open:
        multiply_from(pos, _ROUND)
    for pos in square_open:
        multiply_from(pos, _SQUARE)

    if not res:
        res = [["", 1.0]]
    i = 0
    while i + 1 < len(res):
        if res[i][1] == res[i + 1][1]:
            res[i][0] += res[i + 1][0]
            res.pop(i + 1)
        else:
            i += 1
    return [(t, w) for t, w in res]


def tokenize_weighted(tokenizer, text: str) -> tuple[list[list[int]], list[list[float]]]:
    """A1111's chunking: lists of 77 ids (BOS, 75 tokens or EOS padding, EOS) and their weights.

    `text` must already be free of `<lora:...>` tags (see extract_loras).
    """
    parsed = parse_prompt_attention(text)
    tokenized = tokenizer([t for t, _ in parsed], truncation=False, add_special_tokens=False)["input_ids"]
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    chunks: list[list[int]] = []
    weights: list[list[float]] = []
    cur_ids: list[int] = []
    cur_w: list[float] = []
    last_comma = -1

    def next_chunk() -> None:
        nonlocal cur_ids, cur_w, last_comma
        pad = CHUNK_TOKENS - len(cur_ids)
        chunks.append([bos] + cur_ids + [eos] * pad + [eos])
        weights.append([1.0] + cur_w + [1.0] * pad + [1.0])
        cur_ids, cur_w, last_comma = [], [], -1

    for ids, (frag, weight) in zip(tokenized, parsed):
        if frag == "BREAK" and weight == -1:
            next_chunk()
            continue
        for token in ids:
            if token == comma:
                last_comma = len(cur_ids)
            elif (
                len(cur_ids) == CHUNK_TOKENS
                and last_comma != -1
                and len(cur_ids) - last_comma <= COMMA_PADDING_BACKTRACK
            ):
                # full chunk with a comma near its end: move the words after it to the next chunk
                cut = last_comma + 1
                moved_ids, moved_w = cur_ids[cut:], cur_w[cut:]
                cur_ids, cur_w = cur_ids[:cut], cur_w[:cut]
                next_chunk()
                cur_ids, cur_w = moved_ids, moved_w
            if len(cur_ids) == CHUNK_TOKENS:
                next_chunk()
            cur_ids.append(token)
            cur_w.append(weight)

    if cur_ids or not chunks:
        next_chunk()
    return chunks, weights


def _empty_chunk(tokenizer) -> tuple[list[int], list[float]]:
    n = CHUNK_TOKENS + 2
    return [tokenizer.bos_token_id] + [tokenizer.eos_token_id] * (n - 1), [1.0] * n


def _encode_chunks(tokenizer, text_encoder, chunks, weights, clip_skip):
    import torch

    from lorakit.models.text import encode_tokens

    ids = torch.tensor(chunks, dtype=torch.long).unsqueeze(1)  # [k, 1, 77]: one chunk per row
    z = encode_tokens(text_encoder, ids, clip_skip)  # [k, 77, D]
    w = torch.tensor(weights, dtype=torch.float32, device=z.device).unsqueeze(-1)
    out = [emphasize(zi, wi) for zi, wi in zip(z.float(), w)]
    return torch.cat(out, dim=0).unsqueeze(0).to(z.dtype)


def emphasize(z, weights):
    """A1111's EmphasisOriginal for one chunk: z [77, D] times its token weights [77, 1], then scaled
    back to the chunk's original mean (each text encoder's output on its own, SDXL's two included)."""
    original_mean = z.mean()
    z = z * weights
    new_mean = z.mean()
    if new_mean != 0:  # 0/0 would give NaN (A1111 does not guard); z is unchanged then
        z = z * (original_mean / new_mean)
    return z


def encode_weighted(tokenizer, text_encoder, text: str, clip_skip: int | None = None):
    """Hidden states [1, 77*k, D] for a prompt with A1111 emphasis (k = number of chunks)."""
    chunks, weights = tokenize_weighted(tokenizer, text)
    return _encode_chunks(tokenizer, text_encoder, chunks, weights, clip_skip)


def encode_pair(tokenizer, text_encoder, prompt: str, negative: str, clip_skip: int | None = None):
    """(cond, uncond), each [1, 77*k, D]; the shorter one is padded with empty-prompt chunks like A1111."""
    c_chunks, c_weights = tokenize_weighted(tokenizer, prompt)
    u_chunks, u_weights = tokenize_weighted(tokenizer, negative)
    empty_ids, empty_w = _empty_chunk(tokenizer)
    k = max(len(c_chunks), len(u_chunks))
    for chunks, weights in ((c_chunks, c_weights), (u_chunks, u_weights)):
        chunks += [empty_ids] * (k - len(chunks))
        weights += [empty_w] * (k - len(weights))
    # one forward pass for both: the text encoder handles each chunk independently
    both = _encode_chunks(tokenizer, text_encoder, c_chunks + u_chunks, c_weights + u_weights, clip_skip)
    n = k * (CHUNK_TOKENS + 2)
    return both[:, :n], both[:, n:]
