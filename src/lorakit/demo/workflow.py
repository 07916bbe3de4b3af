"""The whole user story on the demo model, as `lorakit quickstart` runs it.

1. the instance images: `data/train/10_usu bear/` (a black bear with a white crescent)
2. regularization images: the base model draws `bear` into `data/reg/1_bear/`
3. a LoRA trained on both: `output/usu-bear.safetensors`
4. a before/after grid: `usu bear` without and with `<lora:usu-bear:1>`, `bear` without and with
   it, scored by the demo metric (how much each drawing looks like the usu bear).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import DEMO_MODEL

log = logging.getLogger("lorakit")

# Settings measured on the demo model (src/lorakit/demo/assets/README.md)
DRAW = dict(steps=20, cfg_scale=6.0, sampler="DDIM", width=64, height=64)
TRAIN = {
    "resolution": "64",
    "network_dim": 8,
    "network_alpha": 8,
    "learning_rate": 1e-3,
    "max_train_steps": 200,
    "train_batch_size": 4,
    "cache_latents": True,
    "seed": 42,
    "output_name": "usu-bear",
    "overwrite": True,  # running the quickstart again redoes the demo
}
# The SDXL demo model learns the usu bear more slowly: 400 steps (measured, assets/README.md)
TRAIN_SDXL = {**TRAIN, "max_train_steps": 400}
GRID_ROWS = ("usu bear", "usu bear <lora:{name}:1>", "bear", "bear <lora:{name}:1>")


def demo_model(sdxl: bool = False) -> Path:
    """The shipped demo base: SD1.x-family, or the SDXL-family one (same world, same metric)."""
    if not sdxl:
        return DEMO_MODEL
    from . import DEMO_SDXL_MODEL

    return DEMO_SDXL_MODEL


def demo_generator(lora_dir: str | Path = "models/Lora", model: Path = DEMO_MODEL):
    from ..generate.pipeline import Generator

    return Generator.from_path(model, lora_dir, device="cpu")


def draw(gen, prompt: str, first_seed: int, n: int, **overrides) -> list:
    """n drawings of `prompt` on seeds first_seed.. (one batch), with the demo's settings."""
    from ..generate.params import GenerationParams

    p = GenerationParams(prompt=prompt, seed=first_seed, batch_size=n, **{**DRAW, **overrides})
    return [item.image for item in gen.generate(p)]


def instance_rate(images) -> float:
    """Mean instance score: 1 = the usu bear, 0 = a plain bear (or anything else)."""
    from .metric import instance_score

    return float(np.mean(instance_score(images)))


def pixel_distance(a: list, b: list) -> float:
    """Mean absolute pixel difference of paired drawings, in [0, 1]."""
    return float(
        np.mean([np.abs(np.asarray(x, float) - np.asarray(y, float)).mean() / 255 for x, y in zip(a, b)])
    )


def train_demo_lora(
    workdir: Path, with_reg: bool = True, n_reg: int = 32, gen=None, model: Path = DEMO_MODEL, **overrides
) -> Path:
    """Instance dataset (+ base-drawn reg bears) -> LoRA file, with the measured settings."""
    from ..config import TrainConfig
    from ..generate.params import GenerationParams
    from ..generate.reg_images import make_reg_images
    from ..train.trainer import train
    from .world import make_instance_dataset

    train_dir = make_instance_dataset(workdir / "data", n=16, repeats=10)
    settings = TRAIN if Path(model) == DEMO_MODEL else TRAIN_SDXL
    flat = {**settings, "pretrained_model_name_or_path": str(model), "train_data_dir": str(train_dir)}
    flat["output_dir"] = str(workdir / "output")
    if with_reg:
        gen = gen or demo_generator(model=model)
        params = GenerationParams(seed=0, **DRAW)
        make_reg_images(gen, "bear", n_reg, workdir / "data" / "reg", params, show_progress=True)
        flat["reg_data_dir"] = str(workdir / "data" / "reg")
    flat.update(overrides)
    cfg = TrainConfig.from_dict(flat, source="demo")
    (workdir / "demo.toml").write_text(cfg.to_toml())
    return train(cfg)


@dataclass
class GridResult:
    path: Path
    scores: dict[str, float]  # row prompt -> mean instance score


def write_grid(gen, lora_name: str, path: Path, seeds: int = 8, first_seed: int = 1000) -> GridResult:
    """Rows of GRID_ROWS x `seeds` columns, labelled, scored by the metric."""
    from PIL import Image, ImageDraw

    rows = [r.format(name=lora_name) for r in GRID_ROWS]
    images = {r: draw(gen, r, first_seed, seeds) for r in rows}
    gen.restore_base()
    cell, label_w, scale = 64, 190, 2
    grid = Image.new("RGB", (label_w + seeds * cell * scale, len(rows) * cell * scale), "white")
    d = ImageDraw.Draw(grid)
    scores = {}
    for i, r in enumerate(rows):
        scores[r] = instance_rate(images[r])
        d.text((6, i * cell * scale + 40), f"{r}\nusu score {scores[r]:.2f}", fill="black")
        for j, im in enumerate(images[r]):
            grid.paste(
                im.resize((cell * scale, cell * scale), Image.NEAREST),
                (label_w + j * cell * scale, i * cell * scale),
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    grid.save(path)
    return GridResult(path, scores)


def lorakit_command() -> str:
    """How the user can run this lorakit: the venv's script (`.venv/bin/lorakit`,
    `.venv\\Scripts\\lorakit.exe`), relative to the current folder when it lies below it."""
    import os
    import sys

    script = Path(sys.executable).parent / ("lorakit.exe" if os.name == "nt" else "lorakit")
    if not script.exists():
        return f"{sys.executable} -m lorakit"
    try:
        return str(script.relative_to(Path.cwd()))
    except ValueError:
        return str(script)


def run_demo(workdir: str | Path, steps: int | None = None, sdxl: bool = False) -> GridResult:
    workdir = Path(workdir)
    t0 = time.time()
    model = demo_model(sdxl)
    print(f"base model: {model.name} (lorakit's {'SDXL' if sdxl else 'SD1.x'}-family demo model)")
    gen = demo_generator(workdir / "output", model)
    overrides = {"max_train_steps": steps} if steps else {}
    print(f"1/4 instance images -> {workdir / 'data' / 'train'}")
    print(f"2/4 regularization images: the base model draws 'bear' -> {workdir / 'data' / 'reg' / '1_bear'}")
    lora = train_demo_lora(workdir, with_reg=True, gen=gen, model=model, **overrides)
    print(f"3/4 LoRA -> {lora}")
    result = write_grid(gen, lora.stem, workdir / "grid.png")
    print(f"4/4 before/after grid -> {result.path}")
    print("\nHow much the drawings look like the usu bear (demo metric, 8 seeds):")
    for row, score in result.scores.items():
        print(f"  {row:<28} {score:.2f}")
    print(f"\nDone in {time.time() - t0:.0f} s. Draw more with:")
    print(
        f"  {lorakit_command()} generate --model {model} --lora_dir {workdir / 'output'} --width 64 "
        f'--height 64 --sampler DDIM --cfg_scale 6 --prompt "usu bear, on grass <lora:{lora.stem}:1>"'
    )
    return result
