"""GPU memory and speed of lorakit's SDXL LoRA trainer at 1024x1024: the defaults against the "fits 12 GB" set.

Folded into benchmarks/train_speed.py (one training benchmark); this runs its three SDXL profiles there,
with the figures docs/benchmarks.md gives (setup peak, training peak allocated / reserved, device used):

    defaults   sdxl:b1:te            U-Net + both text-encoder LoRAs trained, AdamW, no checkpointing
    12gb       sdxl:b1:gc:cte:8bit   gradient_checkpointing + cache_text_encoder_outputs
                                     + network_train_unet_only + AdamW8bit (Adafactor without bitsandbytes)
    12gb_b4    sdxl:b4:gc:cte:8bit   12gb at batch 4

    PYTHONPATH=src python benchmarks/sdxl_memory.py [--profiles defaults,12gb] [train_speed.py options]
    PYTHONPATH=src python benchmarks/sdxl_memory.py --tiny      # the same code path on CPU, tiny SDXL, 64x64
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from random_models import fast_sdxl_loader, init_random_  # noqa: E402,F401  (benchmarks/sdxl_draw_speed.py's)

PROFILES = {"defaults": "sdxl:b1:te", "12gb": "sdxl:b1:gc:cte:8bit", "12gb_b4": "sdxl:b4:gc:cte:8bit"}


def main(argv: list[str]) -> None:
    import train_speed

    names, rest = "defaults,12gb,12gb_b4", []
    it = iter(argv)
    for arg in it:
        if arg == "--profiles":
            names = next(it, "")
        elif arg.startswith("--profiles="):
            names = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    unknown = [n for n in names.split(",") if n not in PROFILES]
    if unknown:
        raise SystemExit(f"--profiles: unknown {unknown}; use {', '.join(PROFILES)}")
    configs = ",".join(PROFILES[n] for n in names.split(","))
    done = train_speed.main(
        ["--configs", configs, "--steps", "25", "--warmup", "5", "--budget", "285", *rest]
    )
    if any(r.get("status") != "ok" for r in done):
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
