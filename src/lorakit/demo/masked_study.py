"""Masked loss on the demo world: LoRAs trained on the usu bear with noisy backgrounds, with and
without the bear's mask, against clean pictures (benchmarks/masked_loss_demo.py prints it,
tests/test_demo_masked_loss.py checks a light version).

Variants, the same 16 usu-bear pictures (world.make_masked_instance_dataset), no reg images:
- clean:       the pictures as drawn;
- noisy+mask:  their background replaced by random noise, masked_loss with the bear's mask
               (mask images in conditioning_data_dir, or the PNG alpha with alpha=True);
- noisy:       the noisy pictures without a mask.

Measures: the demo metric's usu score of `usu bear <lora>` drawings; the drawings' roughness
(neighbouring-pixel difference: noise would raise it); and denoising losses on 16 held-out
pictures (world seed 1) under fixed noise and timesteps, so they compare pairwise: on the clean
pictures' bear ("subject") and background, and on the background of noisy-background pictures
("noise": low when a LoRA has learned to expect noise there).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps

VARIANTS = ("clean", "noisy+mask", "noisy")
FOLDER = "10_usu bear"


def make_data(root: Path, variant: str, alpha: bool = False) -> dict:
    """Write one variant's pictures (and masks) under `root`; its config options."""
    from .world import make_masked_instance_dataset

    train, masks = make_masked_instance_dataset(root, noisy=variant != "clean")
    if variant != "noisy+mask":
        return {"train_data_dir": str(train)}
    if not alpha:
        return {"train_data_dir": str(train), "conditioning_data_dir": str(masks), "masked_loss": True}
    for image in (train / FOLDER).glob("*.png"):  # the mask as the PNG's alpha channel instead
        rgba = Image.open(image).convert("RGBA")
        rgba.putalpha(Image.open(masks / FOLDER / image.name).convert("L"))
        rgba.save(image)
    return {"train_data_dir": str(train), "alpha_mask": True, "masked_loss": True}


def _inverted(masks: Path, out: Path) -> Path:
    for f in masks.rglob("*.png"):
        target = out / f.relative_to(masks)
        target.parent.mkdir(parents=True, exist_ok=True)
        ImageOps.invert(Image.open(f).convert("L")).save(target)
    return out


def heldout_data(root: Path, n: int = 16) -> dict[str, tuple[Path, Path]]:
    """{measure: (train folder, mask folder)} over pictures no LoRA saw (world seed 1)."""
    from .world import make_masked_instance_dataset

    clean, masks = make_masked_instance_dataset(root / "clean", n=n, repeats=1, seed=1, noisy=False)
    noisy, _ = make_masked_instance_dataset(root / "noisy", n=n, repeats=1, seed=1, noisy=True)
    background = _inverted(masks, root / "background")
    return {"subject": (clean, masks), "background": (clean, background), "noise": (noisy, background)}


def heldout_losses(
    lora: Path | None, model: Path, data: dict[str, tuple[Path, Path]], rounds: int = 8
) -> dict[str, float]:
    """The LoRA's (None: the base's) mean denoising loss per measure of heldout_data: masked_loss
    over the region, `rounds` passes with fixed noise and timesteps (the same for every LoRA)."""
    import torch

    from ..config import TrainConfig
    from ..train.trainer import build_trainer
    from .workflow import TRAIN

    out = {}
    for measure, (train, masks) in data.items():
        flat = {**TRAIN, "pretrained_model_name_or_path": str(model), "train_data_dir": str(train)}
        flat.update(conditioning_data_dir=str(masks), masked_loss=True, cache_latents=False, seed=7)
        name = f"eval-{measure}-{lora.stem if lora else 'base'}"
        flat.update(output_dir=str(train.parent / "eval-out"), output_name=name)
        if lora is not None:
            flat["network_weights"] = str(lora)
        trainer = build_trainer(TrainConfig.from_dict(flat, source="masked_study"))
        with torch.no_grad():
            losses = [
                trainer.loss_of(b, 10**9 + r * 1000 + i)
                for r in range(rounds)
                for i, b in enumerate(trainer.dataset.batches(r))
            ]
        out[measure] = torch.stack(losses).mean().item()
    return out


def roughness(images) -> float:
    """Mean absolute difference of horizontally neighbouring pixels, in [0, 1]: noise raises it."""
    return float(np.mean([np.abs(np.diff(np.asarray(im, np.float32), axis=1)).mean() / 255 for im in images]))


def measure(
    workdir: Path,
    steps: int = 200,
    seeds: int = 16,
    first_seed: int = 2000,
    alpha: bool = False,
    sdxl: bool = False,
    variants=VARIANTS,
    train_seed: int = 42,
    heldout: bool = True,
    heldout_n: int = 16,
    rounds: int = 8,
    measures: tuple[str, ...] = ("subject", "background", "noise"),
) -> dict[str, dict[str, float]]:
    """{variant: {"usu", "roughness", "seconds" (training)[, "subject", "background", "noise"]}},
    and "base" for the model without a LoRA."""
    from . import workflow as W

    model = W.demo_model(sdxl)
    gen = W.demo_generator(workdir / "Lora", model)
    (workdir / "Lora").mkdir(parents=True, exist_ok=True)
    data = None
    if heldout:
        data = {k: v for k, v in heldout_data(workdir / "heldout", heldout_n).items() if k in measures}
    out: dict[str, dict[str, float]] = {}
    for variant in variants:
        name = variant.replace("+", "-")
        # not under <run>/data: train_demo_lora writes the clean instance pictures there
        overrides = make_data(workdir / name / "masked-data", variant, alpha)
        t0 = time.time()
        lora = W.train_demo_lora(
            workdir / name,
            with_reg=False,
            model=model,
            max_train_steps=steps,
            output_name=name,
            seed=train_seed,
            **overrides,
        )
        seconds = time.time() - t0
        (workdir / "Lora" / lora.name).write_bytes(lora.read_bytes())
        images = W.draw(gen, f"usu bear <lora:{name}:1>", first_seed, seeds)
        gen.restore_base()
        out[variant] = {"usu": W.instance_rate(images), "roughness": roughness(images), "seconds": seconds}
        if data is not None:
            out[variant].update(heldout_losses(lora, model, data, rounds))
    base = W.draw(gen, "usu bear", first_seed, seeds)
    out["base"] = {"usu": W.instance_rate(base), "roughness": roughness(base), "seconds": 0.0}
    if data is not None:
        out["base"].update(heldout_losses(None, model, data, rounds))
    return out
