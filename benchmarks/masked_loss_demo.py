"""Masked loss learns the subject, not the background: measured on the demo world.

Three LoRAs on the demo model (no reg images), the same 16 usu-bear pictures:
- clean:       the pictures as drawn;
- noisy+mask:  their background replaced by random noise, masked_loss with the bear's mask
               (mask images in conditioning_data_dir, or the PNG alpha with --alpha);
- noisy:       the noisy pictures without a mask.
Each is scored by the demo metric on `usu bear <lora>` drawings (how much they look like the usu bear),
and the drawings' background noise is measured (mean absolute difference of neighbouring pixels).

    python benchmarks/masked_loss_demo.py                    # SD1 demo model, 200 steps (the demo's)
    python benchmarks/masked_loss_demo.py --steps 100 --seeds 16
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

VARIANTS = ("clean", "noisy+mask", "noisy")


def make_data(root: Path, variant: str, alpha: bool = False) -> dict:
    """The train folder (and mask options) of one variant."""
    from lorakit.demo.world import make_masked_instance_dataset

    train, masks = make_masked_instance_dataset(root, noisy=variant != "clean")
    if variant != "noisy+mask":
        return {"train_data_dir": str(train)}
    if not alpha:
        return {"train_data_dir": str(train), "conditioning_data_dir": str(masks), "masked_loss": True}
    for image in (train / "10_usu bear").glob("*.png"):  # the mask as the PNG's alpha channel
        rgba = Image.open(image).convert("RGBA")
        rgba.putalpha(Image.open(masks / "10_usu bear" / image.name).convert("L"))
        rgba.save(image)
    return {"train_data_dir": str(train), "alpha_mask": True, "masked_loss": True}


def heldout_data(root: Path, n: int = 16) -> tuple[Path, Path, Path]:
    """Clean usu-bear pictures the LoRAs never saw (world seed 1), their masks, and the inverted
    masks: (train folder, subject masks, background masks)."""
    from PIL import ImageOps

    from lorakit.demo.world import make_masked_instance_dataset

    train, masks = make_masked_instance_dataset(root, n=n, repeats=1, seed=1, noisy=False)
    inverted = root / "background"
    for f in masks.rglob("*.png"):
        out = inverted / f.relative_to(masks)
        out.parent.mkdir(parents=True, exist_ok=True)
        ImageOps.invert(Image.open(f).convert("L")).save(out)
    return train, masks, inverted


def heldout_losses(lora: Path | None, model: Path, data: tuple[Path, Path, Path], rounds: int = 8) -> dict:
    """The LoRA's denoising loss on the clean held-out pictures, on the bear (subject) and on the
    background alone (masked_loss with the mask and with the inverted mask). The same seed gives
    every LoRA the same noise and timesteps, so the numbers compare pairwise."""
    import torch

    from lorakit.config import TrainConfig
    from lorakit.demo.workflow import TRAIN
    from lorakit.train.trainer import build_trainer

    train, subject, background = data
    out = {}
    for region, masks in (("subject", subject), ("background", background)):
        flat = {**TRAIN, "pretrained_model_name_or_path": str(model), "train_data_dir": str(train)}
        flat.update(conditioning_data_dir=str(masks), masked_loss=True, cache_latents=False, seed=7)
        flat.update(
            output_dir=str(train.parent / "eval-out"),
            output_name=f"eval-{region}-{lora.stem if lora else 'base'}",
        )
        if lora is not None:
            flat["network_weights"] = str(lora)
        trainer = build_trainer(TrainConfig.from_dict(flat, source="masked_loss_demo"))
        with torch.no_grad():
            losses = [
                trainer.loss_of(b, 10**9 + r * 1000 + i)
                for r in range(rounds)
                for i, b in enumerate(trainer.dataset.batches(r))
            ]
        out[region] = torch.stack(losses).mean().item()
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
) -> dict[str, dict[str, float]]:
    """{variant: {"usu": metric score, "roughness", "seconds": training time[, "subject", "background":
    held-out losses]}}, and "base" for the model without a LoRA."""
    from lorakit.demo import workflow as W

    model = W.demo_model(sdxl)
    gen = W.demo_generator(workdir / "Lora", model)
    (workdir / "Lora").mkdir(parents=True, exist_ok=True)
    data = heldout_data(workdir / "heldout") if heldout else None
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
            out[variant].update(heldout_losses(lora, model, data))
    base = W.draw(gen, "usu bear", first_seed, seeds)
    out["base"] = {"usu": W.instance_rate(base), "roughness": roughness(base), "seconds": 0.0}
    if data is not None:
        out["base"].update(heldout_losses(None, model, data))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--seeds", type=int, default=16, help="drawings per LoRA")
    ap.add_argument("--first_seed", type=int, default=2000)
    ap.add_argument(
        "--alpha", action="store_true", help="masks as PNG alpha instead of conditioning_data_dir"
    )
    ap.add_argument("--sdxl", action="store_true", help="the SDXL-family demo model")
    ap.add_argument("--train_seed", type=int, default=42, help="the training seed (the demo's: 42)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = measure(
            Path(tmp),
            args.steps,
            args.seeds,
            args.first_seed,
            args.alpha,
            args.sdxl,
            train_seed=args.train_seed,
        )
    print(f"{args.steps} steps, training seed {args.train_seed}, {args.seeds} drawings per LoRA")
    print(
        "held-out loss: denoising loss on clean usu-bear pictures no LoRA saw, on the bear / its background"
    )
    print(f"{'variant':<12} {'usu score':>9} {'roughness':>9} {'subject':>8} {'backgr.':>8} {'train s':>8}")
    for variant, r in res.items():
        print(
            f"{variant:<12} {r['usu']:>9.2f} {r['roughness']:>9.3f} {r.get('subject', 0):>8.4f} "
            f"{r.get('background', 0):>8.4f} {r['seconds']:>8.1f}"
        )


if __name__ == "__main__":
    main()
