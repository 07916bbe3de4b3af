"""Latent cache: each unique image encoded once, kept in memory and optionally as .npz beside it.

Unlike kohya (whose disk cache is valid if its keys exist), a cache file here records a key
over the image bytes, bucket, resize, crop, flip setting, VAE, alpha_mask and the mask file's bytes
(conditioning_data_dir), and is recomputed when any of them change. With a mask source the
latent-size mask is stored beside the latents.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..atomic import atomic_file
from ..errors import DatasetError
from ..hashing import file_sha256
from .buckets import Placement
from .images import mask_tensor, to_tensor
from .masks import load_image_and_mask

Encode = Callable[[torch.Tensor], torch.Tensor]
Progress = Callable[[int, int], None]  # (images done, images to encode)


@dataclass
class CachedLatents:
    latents: torch.Tensor  # [4, h, w] float32
    latents_flipped: torch.Tensor | None = None
    mask: torch.Tensor | None = None  # [1, h, w] in [0, 1] with a mask source (unflipped; flip it to match)


def cache_path(image: Path, bucket: tuple[int, int]) -> Path:
    """`<stem>_<WWWW>x<HHHH>_lorakit.npz`: kohya's naming with our suffix, so neither reads the other's."""
    return image.with_name(f"{image.stem}_{bucket[0]:04d}x{bucket[1]:04d}_lorakit.npz")


def cache_key(
    image_sha256: str,
    placement: Placement,
    vae_fingerprint: str,
    flip_aug: bool,
    alpha_mask: bool = False,
    mask_id: str | None = None,
) -> str:
    """`mask_id`: the sha256 of the image's mask file from conditioning_data_dir ("ones" for an image
    without one), None without conditioning_data_dir."""
    parts: list = [
        image_sha256,
        list(placement.bucket),
        list(placement.resized),
        list(placement.crop_ltrb),
        vae_fingerprint,
        bool(flip_aug),
    ]
    if alpha_mask:  # appended only when on, so caches made before the option existed stay valid
        parts.append("alpha_mask")
    if mask_id is not None:
        parts.append(f"mask:{mask_id}")
    return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def load_npz(
    path: Path, key: str, placement: Placement, flip_aug: bool, with_mask: bool = False
) -> CachedLatents | None:
    """The cached latents if the file is there, readable and made for exactly this input."""
    try:
        with np.load(path, allow_pickle=False) as z:
            if str(z["key"]) != key:
                return None
            latents = torch.from_numpy(np.array(z["latents"], dtype=np.float32))
            flipped = torch.from_numpy(np.array(z["latents_flipped"], dtype=np.float32)) if flip_aug else None
            mask = torch.from_numpy(np.array(z["alpha_mask"], dtype=np.float32)) if with_mask else None
    except (OSError, ValueError, KeyError, EOFError):  # missing, truncated, foreign or old file
        return None
    w, h = placement.bucket
    if latents.shape[1:] != (h // 8, w // 8):
        return None
    if mask is not None and mask.shape != (1, h // 8, w // 8):
        return None
    return CachedLatents(latents, flipped, mask)


def save_npz(
    path: Path, key: str, placement: Placement, image_size: tuple[int, int], cached: CachedLatents
) -> None:
    arrays = {
        "latents": cached.latents.float().numpy(),
        "original_size": np.array(image_size, dtype=np.int64),
        "crop_ltrb": np.array(placement.crop_ltrb, dtype=np.int64),
        "key": np.array(key),
    }
    if cached.latents_flipped is not None:
        arrays["latents_flipped"] = cached.latents_flipped.float().numpy()
    if cached.mask is not None:
        arrays["alpha_mask"] = cached.mask.float().numpy()
    write_npz(path, arrays, "latent cache", "cache_latents_to_disk")


def write_npz(path: Path, arrays: dict, what: str, option: str) -> None:
    """np.savez through a temp file + rename (an interrupted run never leaves a half-written cache
    behind); a folder that cannot be written is a DatasetError naming `option`, the way out."""
    try:
        with atomic_file(path) as f:
            np.savez(f, **arrays)
    except OSError as e:
        raise DatasetError(
            f"cannot write the {what} beside {path.parent} ({e}); make the folder writable or turn off {option}"
        ) from e


def cache_latents(
    samples: Iterable[tuple[Path, Placement]],
    encode: Encode,
    vae_fingerprint: str,
    to_disk: bool,
    batch_size: int = 1,
    flip_aug: bool = False,
    progress: Progress | None = None,
    alpha_mask: bool = False,
    mask_files: dict[Path, Path] | None = None,
) -> dict[Path, CachedLatents]:
    """Latents for every unique image in `samples` (repeats are encoded once).

    `encode` maps pixels [B, 3, H, W] in [-1, 1] to latents [B, 4, H/8, W/8]; the trainer
    owns the VAE, its device and dtype, and whether it samples the posterior. With `alpha_mask`
    each entry also holds the image's alpha as a latent-size mask (ones where there is no alpha);
    with `mask_files` ({image: mask image}, conditioning_data_dir) the mask file's red channel
    (ones for an image not in it).
    """
    with_mask = alpha_mask or mask_files is not None
    unique: dict[Path, Placement] = {}
    for path, placement in samples:
        unique.setdefault(Path(path), placement)

    out: dict[Path, CachedLatents] = {}
    todo: list[tuple[Path, Placement, str]] = []
    for path, placement in unique.items():
        key = ""
        if to_disk:
            mask_id = None
            if mask_files is not None:
                mask_file = mask_files.get(path)
                mask_id = file_sha256(mask_file) if mask_file is not None else "ones"
            key = cache_key(file_sha256(path), placement, vae_fingerprint, flip_aug, alpha_mask, mask_id)
            hit = load_npz(cache_path(path, placement.bucket), key, placement, flip_aug, with_mask)
            if hit is not None:
                out[path] = hit
                continue
        todo.append((path, placement, key))

    # Same-bucket images only can share a VAE batch; sorting groups them like kohya does.
    todo.sort(key=lambda t: (t[1].bucket, str(t[0])))
    groups: list[list[tuple[Path, Placement, str]]] = []
    for item in todo:
        if groups and groups[-1][0][1].bucket == item[1].bucket and len(groups[-1]) < batch_size:
            groups[-1].append(item)
        else:
            groups.append([item])

    done = 0
    for group in groups:
        files = mask_files or {}
        loaded = [load_image_and_mask(p, alpha_mask, files.get(p)) for p, _, _ in group]
        images = [rgb for rgb, _ in loaded]
        pixels = torch.stack(
            [to_tensor(im, pl.bucket, pl.resized, pl.crop_ltrb) for im, (_, pl, _) in zip(images, group)]
        )
        with torch.no_grad():
            latents = encode(pixels).float().cpu()
            flipped = encode(torch.flip(pixels, dims=[3])).float().cpu() if flip_aug else None
        for i, ((path, placement, key), image) in enumerate(zip(group, images)):
            cached = CachedLatents(latents[i].clone(), None if flipped is None else flipped[i].clone())
            if with_mask:
                pl = placement
                cached.mask = mask_tensor(loaded[i][1], pl.bucket, pl.resized, pl.crop_ltrb)
            out[path] = cached
            if to_disk:
                save_npz(cache_path(path, placement.bucket), key, placement, image.size, cached)
        done += len(group)
        if progress is not None:
            progress(done, len(todo))
    return out
