"""`lorakit quickstart`: the whole training path on a tiny model that lorakit builds itself.

No real Stable Diffusion weights can be downloaded here, so this makes a tiny randomly
initialised SD1.x-family model (saved as an LDM single file, loaded through the same loader
as a real checkpoint), a kohya-style folder of drawn images, and trains a LoRA on them.
It shows the workflow and the file format, not image quality.
"""

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


def run_quickstart(workdir: str | Path, steps: int = 60) -> Path:
    from .config import TrainConfig
    from .train.trainer import build_trainer

    workdir = Path(workdir)
    base = workdir / "tiny-sd1.safetensors"
    if not base.exists():
        make_tiny_base(base)
    train_dir, reg_dir = make_dataset(workdir / "data")
    cfg = TrainConfig.from_dict(
        {
            "pretrained_model_name_or_path": str(base),
            "train_data_dir": str(train_dir),
            "reg_data_dir": str(reg_dir),
            "resolution": "64,64",
            "output_dir": str(workdir / "output"),
            "output_name": "usu-bear",
            "network_dim": 4,
            "network_alpha": 4,
            "learning_rate": 1e-3,
            "max_train_steps": steps,
            "train_batch_size": 2,
            "cache_latents": True,
            "seed": 42,
        },
        source="quickstart",
    )
    (workdir / "quickstart.toml").write_text(cfg.to_toml())
    trainer = build_trainer(cfg)
    before = trainer.mean_loss()
    lora = trainer.run()
    after = trainer.mean_loss()
    print(f"\nBase model (tiny, built here): {base}")
    print(f"Dataset: {train_dir} (+ regularization {reg_dir})")
    print(
        f"Config:  {workdir / 'quickstart.toml'}  (rerun: lorakit train --config {workdir / 'quickstart.toml'})"
    )
    print(f"LoRA:    {lora}")
    print(f"Loss on the training images, same noise: {before:.4f} before, {after:.4f} after training")
    return lora
