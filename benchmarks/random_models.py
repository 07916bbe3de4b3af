"""SD1.5 / SDXL base models with random weights, built straight on the device: the benchmarks' stand-in
for lorakit.models.loader.load_base_model (no checkpoint written or read, no fp32 copy on the CPU).

The parts are built on the meta device from lorakit's shipped configs (or the tiny test configs),
materialised on `device` in `dtype` and given a cheap random init. Speed and memory do not depend on
the values; they only must stay finite.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path


def init_random_(module, generator) -> None:
    """Cheap init that keeps activations O(1) in bf16: weights ~ N(0, 1/fan_in) (embeddings 0.02),
    norm scales 1, biases 0."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                std = 0.02 if "embedding" in name else fan_in**-0.5
                p.normal_(0.0, std, generator=generator)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def arch_of(family: str, tiny: bool) -> dict:
    """The configs of `family` ("sd15" or "sdxl"): the shipped full-size ones, or the tiny test ones."""
    from lorakit.models.families.sdxl import sdxl_arch
    from lorakit.models.loader import sd15_arch
    from lorakit.models.tiny import tiny_arch, tiny_sdxl_arch

    if family == "sdxl":
        return tiny_sdxl_arch() if tiny else sdxl_arch()
    if family == "sd15":
        return tiny_arch() if tiny else sd15_arch()
    raise ValueError(f"unknown family {family!r}: use sd15 or sdxl")


def _materialise(models, device, dtype, generator) -> None:
    import torch

    for m in models:
        torch.nn.Module.to(m, dtype=dtype)  # on meta: free; never an fp32 copy on the device
        buffers = {n: b.clone() for n, b in m.named_buffers()}  # real ones (CLIP's position_ids)
        m.to_empty(device=device)
        for n, b in m.named_buffers():
            b.copy_(buffers[n])
        init_random_(m, generator)
        m.eval()


def random_base_loader(
    family: str, arch: dict, device, dtype, report: Callable[[str], None] | None = None
) -> Callable:
    """A stand-in for load_base_model(path, ...) that returns `family`'s BaseModel with random weights."""
    import torch
    from accelerate import init_empty_weights

    from lorakit.models.families.detect import Family
    from lorakit.models.loader import BaseModel, build_from_arch
    from lorakit.models.tokenizer import load_tokenizer

    def load(path, *args, **kwargs):
        t = time.perf_counter()
        g = torch.Generator(device=device).manual_seed(0)
        if family == "sdxl":
            from lorakit.models.families.sdxl import build_sdxl_empty, sdxl_tokenizers

            unet, vae, te1, te2 = build_sdxl_empty(arch)
            _materialise((unet, vae, te1, te2), device, dtype, g)
            encoders, tokenizers = (te1, te2), sdxl_tokenizers()
            extra = {"family": Family("sdxl", "SDXL base")}
        else:
            with init_empty_weights():
                unet, vae, te = build_from_arch(arch)
            _materialise((unet, vae, te), device, dtype, g)
            encoders, tokenizers, extra = (te,), (load_tokenizer(),), {}
        if report:
            report(f"{family} models built on {device} in {dtype} in {time.perf_counter() - t:.1f}s")
        return BaseModel(
            unet, vae, encoders, tokenizers, source=Path(path), arch=arch, kind="single_file", **extra
        )

    return load


def fast_sdxl_loader(arch: dict, device, dtype, report: Callable[[str], None] | None = None) -> Callable:
    """The SDXL stand-in (benchmarks/sdxl_draw_speed.py's import)."""
    return random_base_loader("sdxl", arch, device, dtype, report)
