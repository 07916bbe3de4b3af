"""A tiny random SD1.x-family model and a folder of drawn discs, built in a second: the fixtures
the tests train on (the shipped, pretrained demo model is lorakit.demo; `lorakit quickstart` is
demo/workflow.py)."""

from __future__ import annotations

import logging
import random
from pathlib import Path

log = logging.getLogger("lorakit")


def draw_shapes(path: Path, seed: int, colour: tuple[int, int, int], size: int = 64) -> None:
    """A disc of one colour on a random plain background, at a random place and size."""
    from PIL import Image, ImageDraw

    rng = random.Random(seed)
    bg = tuple(rng.randint(0, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    r = rng.randint(size // 6, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    ImageDraw.Draw(img).ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def make_dataset(root: Path, n_train: int = 6, n_reg: int = 6, repeats: int = 5) -> tuple[Path, Path]:
    """root/train/<repeats>_usu bear (black discs) and root/reg/1_bear (brown discs)."""
    train = root / "train" / f"{repeats}_usu bear"
    reg = root / "reg" / "1_bear"
    for i in range(n_train):
        draw_shapes(train / f"usu_{i:02d}.png", seed=i, colour=(20, 20, 20))
    for i in range(n_reg):
        draw_shapes(reg / f"bear_{i:02d}.png", seed=1000 + i, colour=(120, 80, 40))
    return root / "train", root / "reg"


def make_tiny_base(path: Path, seed: int = 0) -> Path:
    """A tiny SD1.x-family model as an LDM-layout .safetensors (random weights)."""
    from .models.loader import save_ldm_checkpoint
    from .models.tiny import build_models, tiny_arch

    arch = tiny_arch()
    unet, vae, te = build_models(arch, seed)
    save_ldm_checkpoint(path, unet, vae, te, arch)
    return path
