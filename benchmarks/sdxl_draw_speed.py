"""SDXL drawing speed: the real SDXL architecture with random weights, fp16 on CUDA (VAE fp32),
1024x1024, 20 steps, CFG 7, DPM++ 2M and Euler a, batch 1, lorakit's own Generator; 3 images timed after
a warm-up. Without CUDA: the same path on the tiny SDXL at 64 px (a check that it runs).

    PYTHONPATH=src python benchmarks/sdxl_draw_speed.py     (from the repository root; results in docs/benchmarks.md)
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch
from sdxl_memory import fast_sdxl_loader

from lorakit.generate.params import GenerationParams
from lorakit.generate.pipeline import Generator
from lorakit.models.families.sdxl import sdxl_arch
from lorakit.models.tiny import tiny_sdxl_arch

cuda = torch.cuda.is_available()
arch, size, dev, dtype = (
    (sdxl_arch(), 1024, "cuda", torch.float16) if cuda else (tiny_sdxl_arch(), 64, "cpu", torch.float32)
)
base = fast_sdxl_loader(arch, torch.device(dev), dtype)("random-sdxl.safetensors")
base.vae.float()
gen = Generator.from_base(base, lora_dir="/tmp/none")
for sampler in ("DPM++ 2M", "Euler a"):
    p = GenerationParams(
        prompt="a photo of a bear in a forest",
        negative_prompt="blurry",
        seed=1,
        steps=20,
        cfg_scale=7,
        sampler=sampler,
        width=size,
        height=size,
    )
    try:
        gen.generate(p)  # warm-up
        if cuda:
            torch.cuda.synchronize()
        t = time.perf_counter()
        n = 3
        for i in range(n):
            gen.generate(GenerationParams(**{**p.__dict__, "seed": 2 + i}))
        if cuda:
            torch.cuda.synchronize()
        dt = (time.perf_counter() - t) / n
        print(
            f"SDXL {size}x{size} {sampler} 20 steps CFG 7 batch 1 {dtype}: {dt:.2f} s/image, {20 / dt:.1f} it/s "
            f"(peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB)"
            if cuda
            else f"cpu {sampler}: {dt:.2f}s",
            flush=True,
        )
    except Exception as e:  # random weights may overflow fp16: say so, do not hide it
        print(f"{sampler}: {type(e).__name__}: {str(e)[:300]}", flush=True)
