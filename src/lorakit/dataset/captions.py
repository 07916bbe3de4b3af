"""Per-step caption processing (kohya's BaseDataset.process_caption, shuffle and keep_tokens)."""

from __future__ import annotations

import random


def process_caption(caption: str, shuffle_caption: bool, keep_tokens: int, rng: random.Random) -> str:
    """Split on ',', keep the first `keep_tokens` tags in place, shuffle the rest, join with ', '.

    Without shuffle_caption the caption is returned unchanged, as in kohya.
    """
    if not shuffle_caption:
        return caption
    tokens = [t.strip() for t in caption.strip().split(",")]
    fixed, flex = (tokens[:keep_tokens], tokens[keep_tokens:]) if keep_tokens > 0 else ([], tokens)
    rng.shuffle(flex)
    return ", ".join(fixed + flex)
