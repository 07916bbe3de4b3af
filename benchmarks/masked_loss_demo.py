"""Masked loss on the demo world: noisy backgrounds with and without the mask, against clean pictures.

Trains three LoRAs on the SD1 demo model (lorakit.demo.masked_study: clean, noisy+mask, noisy) and
prints the demo metric's usu score of their drawings and their denoising losses on held-out
pictures (the bear, the clean background, a noise background).

    python benchmarks/masked_loss_demo.py                       # 200 steps (the demo's), seed 42
    python benchmarks/masked_loss_demo.py --steps 100 --train_seed 7 --alpha
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from lorakit.demo.masked_study import measure


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
        "held-out denoising loss on pictures no LoRA saw: the bear / the clean background / a noise background"
    )
    print(
        f"{'variant':<12} {'usu score':>9} {'roughness':>9} {'subject':>8} {'backgr.':>8} {'noise':>8} {'train s':>8}"
    )
    for variant, r in res.items():
        print(
            f"{variant:<12} {r['usu']:>9.2f} {r['roughness']:>9.3f} {r.get('subject', 0):>8.4f} "
            f"{r.get('background', 0):>8.4f} {r.get('noise', 0):>8.4f} {r['seconds']:>8.1f}"
        )


if __name__ == "__main__":
    main()
