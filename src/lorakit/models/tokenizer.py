"""The SD1.x tokenizer (CLIP ViT-L/14 BPE), shipped with lorakit so nothing is fetched from the Hub.

kohya always uses openai/clip-vit-large-patch14's tokenizer, never one from the checkpoint;
the vocab/merges here are that tokenizer's, derived by tools/make_clip_tokenizer.py.
"""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import regex
from transformers import CLIPTokenizer

TOKENIZER_DIR = Path(__file__).resolve().parent / "tokenizer"
MAX_LENGTH = 77
BOS_ID = 49406
EOS_ID = 49407
_SPECIAL = regex.compile(r"(<\|startoftext\|>|<\|endoftext\|>)")
_WHITESPACE = regex.compile(r"\s+")


@lru_cache(maxsize=1)
def _files() -> tuple[dict[str, int], list[tuple[str, str]]]:
    vocab = json.loads((TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8"))
    lines = (TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8").splitlines()
    merges = [tuple(line.split(" ")) for line in lines[1:] if line]  # line 0: "#version: 0.2"
    return vocab, merges


def _clean(text: str) -> str:
    """The text cleaning of transformers 4.x's slow CLIPTokenizer, which kohya and A1111 run: per piece
    between special tokens, ftfy.fix_text (it unescapes HTML entities only when they end in `;` and the
    text has no `<`), whitespace runs to one space, strip, then Python's lower() (a final Σ gives ς)."""
    import ftfy

    pieces = _SPECIAL.split(text)
    return "".join(
        p if i % 2 else _WHITESPACE.sub(" ", ftfy.fix_text(p)).strip().lower() for i, p in enumerate(pieces)
    )


def _fix(text):
    if isinstance(text, str):
        return _clean(text)
    if isinstance(text, (list, tuple)) and text and all(isinstance(t, str) for t in text):
        return [_clean(t) for t in text]
    return text


class SDClipTokenizer(CLIPTokenizer):
    """CLIPTokenizer that cleans text like the slow transformers 4.x CLIPTokenizer (see `_clean`).

    That tokenizer, which A1111 and kohya run, applies ftfy (curly quotes, full-width letters,
    ligatures, mojibake, HTML entities) and Python's lower(); the transformers 5 tokenizers backend,
    like 4.x's CLIPTokenizerFast, skips ftfy and lowercases letter by letter (Σ always gives σ), so the
    same caption would give other ids than at inference time."""

    def _encode_plus(self, text, text_pair=None, *args, is_split_into_words=False, **kwargs):
        if not is_split_into_words:
            text, text_pair = _fix(text), _fix(text_pair)
        return super()._encode_plus(text, text_pair, *args, is_split_into_words=is_split_into_words, **kwargs)

    def tokenize(self, text, *args, **kwargs):
        return super().tokenize(_fix(text), *args, **kwargs)


def load_tokenizer() -> CLIPTokenizer:
    """A fresh CLIPTokenizer (SDClipTokenizer): model_max_length 77, BOS 49406, EOS = pad 49407."""
    vocab, merges = _files()
    tok = SDClipTokenizer(
        vocab=dict(vocab),
        merges=list(merges),
        unk_token="<|endoftext|>",
        bos_token="<|startoftext|>",
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        model_max_length=MAX_LENGTH,
    )
    assert tok.bos_token_id == BOS_ID and tok.eos_token_id == EOS_ID and tok.pad_token_id == EOS_ID
    return tok
