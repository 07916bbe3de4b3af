"""Run txt2img requests into a folder of PNGs named like A1111's (`00012-1234.png`)."""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

from ..errors import ConfigError
from .params import GenerationParams
from .pipeline import GeneratedImage, Generator

log = logging.getLogger("lorakit")


def next_index(outdir: Path) -> int:
    numbers = [int(m.group(1)) for p in outdir.glob("*.png") if (m := re.match(r"(\d{5})-", p.name))]
    return max(numbers, default=-1) + 1


def params_from_png(path: str | Path, base: GenerationParams | None = None) -> GenerationParams:
    """The request that drew an image, read back from its A1111 `parameters` chunk."""
    from .pnginfo import parse_parameters, read_png_parameters

    text = read_png_parameters(path)
    if not text:
        raise ConfigError(f"{path}: the PNG carries no generation parameters (A1111 'parameters' text chunk)")
    prompt, negative, kv = parse_parameters(text)
    p = dataclasses.replace(
        base or GenerationParams(), prompt=prompt, negative_prompt=negative, batch_count=1
    )
    try:
        if "Steps" in kv:
            p.steps = int(kv["Steps"])
        if "Sampler" in kv:
            p.sampler = kv["Sampler"]
            p.schedule_type = kv.get("Schedule type")
        if "CFG scale" in kv:
            p.cfg_scale = float(kv["CFG scale"])
        if "Seed" in kv:
            p.seed = int(kv["Seed"])
        if "Size" in kv:
            p.width, p.height = (int(v) for v in kv["Size"].split("x"))
        p.clip_skip = int(kv.get("Clip skip", 1))
        p.cfg_rescale = _cfg_rescale(kv)
        p.rng = _rng(kv, path)
    except ValueError as e:
        raise ConfigError(f"{path}: unreadable generation parameters ({e})") from None
    p.batch_size = 1  # redraw this one image: its own seed is in the chunk
    return p


def _rng(kv: dict[str, str], path) -> str:
    """A1111's RNG source from an infotext: "RNG: CPU" -> cpu; none written -> gpu (A1111's default,
    as its infotext reader assumes). "NV" (A1111's imitation of NVIDIA's Philox generator) is not drawn
    here: said, and redrawn with the GPU source (another image for the same seed)."""
    source = kv.get("RNG", "GPU").strip().lower()
    if source in ("gpu", "cpu"):
        return source
    log.warning(
        "%s was drawn with A1111's RNG source %r, which lorakit does not draw: redrawn with the GPU "
        "source, so the same seed gives another image (--rng cpu picks the CPU source)",
        path,
        kv["RNG"],
    )
    return "gpu"


def _cfg_rescale(kv: dict[str, str]) -> float:
    """CFG rescale phi from an infotext: Forge's "Rescale CFG", or reForge's RescaleCFG extension
    (rescale_cfg_enabled / rescale_cfg_multiplier); 0 when there is none."""
    if "Rescale CFG" in kv:
        return float(kv["Rescale CFG"])
    if kv.get("rescale_cfg_enabled", "").lower() == "true" and "rescale_cfg_multiplier" in kv:
        return float(kv["rescale_cfg_multiplier"])
    return 0.0


def check_request(params: GenerationParams, lora_dir: str | Path) -> None:
    """Everything about a request that can be wrong, checked before any model loads."""
    from .loras import list_loras, resolve
    from .prompt import extract_loras
    from .samplers import split_name

    params.check()
    split_name(params.sampler, params.schedule_type)
    _, refs = extract_loras(params.prompt)
    if refs:
        available = list_loras(lora_dir)
        for ref in refs:
            resolve(ref.name, available, lora_dir)


def run_txt2img(
    generator: Generator, params: GenerationParams, outdir: str | Path, show_progress: bool = False
) -> list[GeneratedImage]:
    """Generate and save every image as soon as it is drawn; returns them with their paths."""
    from .pnginfo import save_png_with_parameters
    from .progress import DrawProgress

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    index = [next_index(outdir)]

    def save(item: GeneratedImage) -> None:
        item.path = outdir / f"{index[0]:05d}-{item.seed}.png"
        index[0] += 1
        save_png_with_parameters(item.image, item.path, item.infotext)

    if not show_progress:
        return generator.generate(params, on_image=save)
    bar = DrawProgress(params.batch_count, params.steps, "batch" if params.batch_size > 1 else "image")
    items = generator.generate(params, on_image=save, on_step=bar.step)
    bar.close()
    return items
