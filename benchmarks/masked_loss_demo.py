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

VARIANTS = ("clean", "noisy+mask", "noisy")


def make_data(root: Path, variant: str, alpha: bool = False) -> dict:
    """The train folder (and mask options) of one variant."""
    from PIL import Image

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


def roughness(images) -> float:
    """Mean absolute difference of horizontally neighbouring pixels, in [0, 1]: noise raises it."""
    return float(np.mean([np.abs(np.diff(np.asarray(im, np.float32), axis=1)).mean() / 255 for im in images]))


def measure(
    workdir: Path, steps: int = 200, seeds: int = 16, first_seed: int = 2000, alpha: bool = False, sdxl=False
) -> dict[str, dict[str, float]]:
    """{variant: {"usu": metric score, "roughness": ..., "seconds": training time}}."""
    from lorakit.demo import workflow as W

    model = W.demo_model(sdxl)
    gen = W.demo_generator(workdir / "Lora", model)
    out: dict[str, dict[str, float]] = {}
    for variant in VARIANTS:
        name = variant.replace("+", "-")
        overrides = make_data(
            workdir / name / "masked-data", variant, alpha
        )  # not "data": train_demo_lora writes there
        t0 = time.time()
        lora = W.train_demo_lora(
            workdir / name, with_reg=False, model=model, max_train_steps=steps, output_name=name, **overrides
        )
        seconds = time.time() - t0
        (workdir / "Lora").mkdir(exist_ok=True)
        (workdir / "Lora" / lora.name).write_bytes(lora.read_bytes())
        images = W.draw(gen, f"usu bear <lora:{name}:1>", first_seed, seeds)
        gen.restore_base()
        out[variant] = {"usu": W.instance_rate(images), "roughness": roughness(images), "seconds": seconds}
    base = W.draw(gen, "usu bear", first_seed, seeds)
    out["base"] = {"usu": W.instance_rate(base), "roughness": roughness(base), "seconds": 0.0}
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
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        res = measure(Path(tmp), args.steps, args.seeds, args.first_seed, args.alpha, args.sdxl)
    print(f"{'variant':<12} {'usu score':>9} {'roughness':>9} {'train s':>8}")
    for variant, r in res.items():
        print(f"{variant:<12} {r['usu']:>9.2f} {r['roughness']:>9.3f} {r['seconds']:>8.1f}")


if __name__ == "__main__":
    main()
