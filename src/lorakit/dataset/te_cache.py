"""Text-encoder output cache: each unique caption encoded once, kept in memory and optionally as one
.npz per image beside it (kohya's cache_text_encoder_outputs_to_disk).

kohya writes `<stem>_te_outputs.npz` and trusts it whenever its keys exist. Here the file is
`<stem>_lorakit_te.npz` (neither tool reads the other's) and records a key over the caption, the
token length, clip_skip and the text encoders' weights; it is recomputed when any of them change.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import numpy as np
import torch

from ..models.families.base import Conditioning
from .cache import write_npz

EncodeOne = Callable[[str], Conditioning]  # one caption -> its Conditioning row (context [T, D])
# part of every key: raise it when the encoding itself changes (layers taken, pooling), so files
# written by an older lorakit are recomputed rather than trusted
FORMAT_VERSION = 1


def te_cache_path(image: Path) -> Path:
    """`<stem>_lorakit_te.npz` beside the image."""
    return image.with_name(f"{image.stem}_lorakit_te.npz")


def text_encoders_fingerprint(text_encoders: Iterable[torch.nn.Module]) -> str:
    """sha256 over the encoders' frozen weights (raw bytes in their own dtype: no float copy)."""
    h = hashlib.sha256()
    for index, te in enumerate(text_encoders):
        for name, t in sorted(te.state_dict().items()):
            if "lora_" in name:  # a LoRA injected into the encoder is not part of the base
                continue
            name = name.replace(".base_layer.", ".")
            h.update(f"{index}:{name}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def te_cache_key(caption: str, max_token_length: int | None, clip_skip: int | None, fingerprint: str) -> str:
    parts = [FORMAT_VERSION, caption, max_token_length, clip_skip, fingerprint]
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def load_te_npz(path: Path, key: str) -> Conditioning | None:
    """The cached outputs if the file is there, readable and made for exactly this caption and encoders."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            context = torch.from_numpy(np.array(z["context"], dtype=np.float32))
            pooled = torch.from_numpy(np.array(z["pooled"], dtype=np.float32)) if "pooled" in z else None
    except (OSError, ValueError, KeyError, EOFError):  # missing, truncated, foreign or old file
        return None
    if context.ndim != 2 or (pooled is not None and pooled.ndim != 1):
        return None
    return Conditioning(context, pooled)


def save_te_npz(path: Path, key: str, cond: Conditioning) -> None:
    arrays = {"context": cond.context.detach().float().cpu().numpy(), "key": np.array(key)}
    if cond.pooled is not None:  # SDXL's bigG projection; SD1 has none
        arrays["pooled"] = cond.pooled.detach().float().cpu().numpy()
    write_npz(path, arrays, "text-encoder cache", "cache_text_encoder_outputs_to_disk")


def cache_text_encoder_outputs(
    items: Iterable[tuple[Path, str]],
    encode: EncodeOne,
    key_of: Callable[[str], str] | None = None,
) -> dict[str, Conditioning]:
    """caption -> Conditioning for every (image, caption) in `items`, each caption encoded at most once.

    With `key_of` (caption -> cache key) the outputs are also read from / written to one .npz per image
    (`te_cache_path`): an image whose file matches its key is not encoded."""
    out: dict[str, Conditioning] = {}
    todo: dict[Path, str] = {}
    for image, caption in items:
        image = Path(image)
        if key_of is None:
            if caption not in out:
                out[caption] = encode(caption)
            continue
        if image in todo:
            continue
        hit = load_te_npz(te_cache_path(image), key_of(caption))
        if hit is None:
            todo[image] = caption
        else:
            out.setdefault(caption, hit)
    for image, caption in todo.items():
        if caption not in out:
            out[caption] = encode(caption)
        save_te_npz(te_cache_path(image), key_of(caption), out[caption])
    return out
