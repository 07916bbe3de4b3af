"""Loss masks from mask images in conditioning_data_dir (kohya's masked_loss with a ControlNet-style
dataset, sd-scripts library/train_util.py ControlNetDataset).

kohya gives each TOML subset its own conditioning_data_dir and matches a mask by the image's stem
(any image extension, the first in sorted order). lorakit's one option covers every
`<repeats>_<prompt>` folder, so the mask folder mirrors train_data_dir:

    train_data_dir/10_usu bear/a.png  ->  conditioning_data_dir/10_usu bear/a.<png|jpg|...>

A flat conditioning_data_dir (kohya's layout for one subset) is searched when it has no folder of
that name. The mask's red channel is the weight (255 = train, 0 = ignore, grey = partial), as kohya
reads it. A mask may be smaller or larger than its image but must have the same aspect ratio: it
is scaled to the image's size, then resized, cropped and flipped exactly as the image.
Regularization images and validation_data_dir images have no mask (a mask of ones).
"""

from __future__ import annotations

import os
from pathlib import Path

from PIL import Image

from ..errors import DatasetError
from .folders import IMAGE_EXTENSIONS, DatasetPlan
from .images import load_image, load_image_and_alpha

ASPECT_TOLERANCE = 0.01  # relative: a mask saved at another scale may round its sides by a pixel


def find_mask(image: Path, train_data_dir: Path, conditioning_data_dir: Path) -> Path | None:
    """The mask file of `image` (an image in a subfolder of train_data_dir), or None."""
    mirrored = conditioning_data_dir / image.parent.name
    folder = mirrored if mirrored.is_dir() else conditioning_data_dir
    found = sorted(
        p for p in folder.glob(f"{glob_escape(image.stem)}.*") if p.suffix.lower() in IMAGE_EXTENSIONS
    )
    return found[0] if found else None


def glob_escape(text: str) -> str:
    """`text` with glob's special characters taken literally (glob.escape for pathlib patterns)."""
    return "".join(f"[{c}]" if c in "*?[" else c for c in text)


def _same_folder(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def mask_files(plan: DatasetPlan, train_data_dir: str, conditioning_data_dir: str) -> dict[Path, Path]:
    """{train image: its mask file} for every image of train_data_dir (train and validation_split
    samples). A missing mask, or one with another aspect ratio, is a DatasetError naming the image."""
    root, cond = Path(train_data_dir), Path(conditioning_data_dir)
    if not cond.is_dir():
        raise DatasetError(
            f"conditioning_data_dir {cond} is not a folder: give the folder of mask images, laid out like "
            "train_data_dir ('<repeats>_<prompt>' subfolders, one mask per image with the image's name)"
        )
    samples = list(plan.samples) + (list(plan.validation.samples) if plan.validation is not None else [])
    images = {s.image: s.size for s in samples if not s.is_reg and _same_folder(s.image.parent.parent, root)}
    found: dict[Path, Path] = {}
    missing: list[str] = []
    mismatched: list[str] = []
    for image, size in images.items():
        mask = find_mask(image, root, cond)
        if mask is None:
            missing.append(str(image))
            continue
        msize = mask_size(mask)
        if not same_aspect(size, msize):
            mismatched.append(f"{image} is {size[0]}x{size[1]}, its mask {mask} is {msize[0]}x{msize[1]}")
            continue
        found[image] = mask
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise DatasetError(
            f"conditioning_data_dir: no mask image for {len(missing)} image(s): {shown}. Put a mask with the "
            f"image's name (any of {', '.join(IMAGE_EXTENSIONS)}) in {cond}/<the image's folder name>/ "
            "(white = train, black = ignore)"
        )
    if mismatched:
        raise DatasetError(
            "conditioning_data_dir: a mask must have its image's aspect ratio (it is scaled to the image's "
            "size): " + "; ".join(mismatched[:5])
        )
    return found


def mask_size(path: Path) -> tuple[int, int]:
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as e:
        raise DatasetError(f"{path}: mask cannot be read ({type(e).__name__}: {e}); fix or delete it") from e


def same_aspect(a: tuple[int, int], b: tuple[int, int]) -> bool:
    return abs(a[0] * b[1] - a[1] * b[0]) <= ASPECT_TOLERANCE * a[0] * b[1]


def load_mask(path: Path, image_size: tuple[int, int]) -> Image.Image:
    """The mask's red channel (kohya's rule) as an 'L' image at `image_size`."""
    try:
        with Image.open(path) as im:
            red = im.convert("RGB").getchannel("R")
    except Exception as e:
        raise DatasetError(f"{path}: mask cannot be read ({type(e).__name__}: {e}); fix or delete it") from e
    if red.size != tuple(image_size):
        shrinking = red.width >= image_size[0] and red.height >= image_size[1]
        red = red.resize(tuple(image_size), Image.Resampling.BOX if shrinking else Image.Resampling.BILINEAR)
    return red


def load_image_and_mask(
    image: Path, alpha_mask: bool, mask_file: Path | None
) -> tuple[Image.Image, Image.Image | None]:
    """The image as RGB and its mask as an 'L' image at the image's size: the alpha channel with
    `alpha_mask`, else the mask file's red channel; None for no mask (the loss then uses ones)."""
    if alpha_mask:
        return load_image_and_alpha(image)
    rgb = load_image(image)
    return rgb, None if mask_file is None else load_mask(mask_file, rgb.size)
