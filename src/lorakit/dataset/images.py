"""Image file -> training tensor: resize to cover the bucket, crop, flip, scale to [-1, 1]."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..errors import DatasetError


def load_image(path: str | Path) -> Image.Image:
    """The image as RGB. Like kohya, alpha is dropped by convert('RGB'), not composited."""
    try:
        with Image.open(path) as im:
            return im.convert("RGB") if im.mode != "RGB" else im.copy()
    except Exception as e:
        raise DatasetError(f"{path}: cannot be read ({type(e).__name__}: {e}); fix or delete it") from e


def resize_crop(
    img: Image.Image, resized: tuple[int, int], crop_ltrb: tuple[int, int, int, int], flip: bool = False
) -> Image.Image:
    if img.size != tuple(resized):
        # kohya: area filter when shrinking (cv2 INTER_AREA ~ PIL BOX), Lanczos when enlarging.
        shrinking = img.width >= resized[0] and img.height >= resized[1]
        img = img.resize(tuple(resized), Image.Resampling.BOX if shrinking else Image.Resampling.LANCZOS)
    if crop_ltrb != (0, 0, img.width, img.height):
        img = img.crop(tuple(crop_ltrb))
    if flip:
        img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    return img


def to_tensor(
    img: Image.Image,
    bucket: tuple[int, int],
    resized: tuple[int, int],
    crop_ltrb: tuple[int, int, int, int],
    flip: bool = False,
) -> torch.Tensor:
    """float32 [3, H, W] in [-1, 1] (kohya: ToTensor + Normalize(0.5, 0.5))."""
    out = resize_crop(img, resized, crop_ltrb, flip)
    if out.size != tuple(bucket):
        raise ValueError(f"internal error: cropped to {out.size}, bucket is {bucket}")
    arr = np.asarray(out, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).div(127.5).sub(1.0).contiguous()


def has_alpha(path: str | Path) -> bool:
    """Whether the file carries transparency (RGBA, LA, or a palette/greyscale with a transparent colour)."""
    try:
        with Image.open(path) as im:
            return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info
    except Exception as e:
        raise DatasetError(f"{path}: cannot be read ({type(e).__name__}: {e}); fix or delete it") from e


def load_image_and_alpha(path: str | Path) -> tuple[Image.Image, Image.Image | None]:
    """The image as RGB and its alpha channel as an 'L' image (None when it has none), from one read."""
    try:
        with Image.open(path) as im:
            alpha = None
            if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info:
                alpha = im.convert("RGBA").getchannel("A")
            rgb = im.convert("RGB") if im.mode != "RGB" else im.copy()
            return rgb, alpha
    except Exception as e:
        raise DatasetError(f"{path}: cannot be read ({type(e).__name__}: {e}); fix or delete it") from e


def mask_to_latent_size(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """[B, 1, H, W] -> [B, 1, h, w] by area averaging (kohya's apply_masked_loss: F.interpolate "area"),
    so a latent pixel half covered by the mask weighs 0.5."""
    if tuple(mask.shape[-2:]) == tuple(size):
        return mask
    return torch.nn.functional.interpolate(mask.float(), size=tuple(size), mode="area")


def mask_tensor(
    alpha: Image.Image | None,
    bucket: tuple[int, int],
    resized: tuple[int, int],
    crop_ltrb: tuple[int, int, int, int],
    flip: bool = False,
) -> torch.Tensor:
    """float32 [1, h, w] in [0, 1] at latent size (bucket / 8): the alpha channel resized, cropped and
    flipped exactly as the pixels are, then area-averaged; no alpha is a mask of ones."""
    w, h = bucket
    if alpha is None:
        return torch.ones(1, h // 8, w // 8)
    out = resize_crop(alpha, resized, crop_ltrb, flip)
    if out.size != tuple(bucket):
        raise ValueError(f"internal error: mask cropped to {out.size}, bucket is {bucket}")
    full = torch.from_numpy(np.asarray(out, dtype=np.float32) / 255.0)[None, None]
    return mask_to_latent_size(full, (h // 8, w // 8))[0]
