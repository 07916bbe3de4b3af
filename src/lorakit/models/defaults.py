"""Defaults that depend on the base model: its native resolution and a learning rate that moves it.

Read from the file's header only (fast, no weights), in this order:
- `modelspec.resolution` ("512x512"), the Stability AI model-spec key that kohya and A1111 write;
- the UNet's `sample_size` x the VAE's downscale, from the `lorakit.arch` metadata of a lorakit
  model or from a diffusers folder's `unet/` and `vae/` config.json;
- otherwise SD1.x: 512 px.
The learning rate comes from `lorakit.recommended_learning_rate` (the shipped demo model says 1e-3),
else 1e-4, the rate kohya's LoRA docs use for SD1.x.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("lorakit")

RESOLUTION_KEY = "modelspec.resolution"
LEARNING_RATE_KEY = "lorakit.recommended_learning_rate"
ARCH_KEY = "lorakit.arch"
SD1_RESOLUTION = (512, 512)
SD1_LEARNING_RATE = 1e-4
FAR = 2.0  # a side under half or over twice the native one draws and trains poorly


@dataclass(frozen=True)
class ModelDefaults:
    resolution: tuple[int, int]  # (width, height) the model was trained at
    learning_rate: float
    source: str  # where the resolution came from, for messages: "modelspec.resolution in its metadata", ...
    learning_rate_source: str = "the SD1.x default"
    family: object = None  # lorakit.models.families.detect.Family, when it could be read cheaply

    @property
    def size_text(self) -> str:
        return f"{self.resolution[0]}x{self.resolution[1]}"


def header_metadata(path: str | Path) -> dict[str, str]:
    """The `__metadata__` of a .safetensors file; {} for other files or an unreadable header."""
    from lorakit.errors import ModelError
    from lorakit.models.checkpoint import safetensors_header

    try:
        return safetensors_header(path).metadata
    except ModelError:  # not safetensors (.ckpt), truncated, a folder...: no metadata to go by
        return {}


def _parse_resolution(text: str) -> tuple[int, int] | None:
    m = re.fullmatch(r"\s*(\d+)\s*(?:[x,]\s*(\d+))?\s*", text or "")
    if not m:
        return None
    w = int(m.group(1))
    h = int(m.group(2) or w)
    return (w, h) if min(w, h) >= 8 else None


def _native_of_arch(unet: dict, vae: dict) -> tuple[int, int] | None:
    """The UNet's latent sample_size times the VAE's downscale (2 per down block after the first)."""
    try:
        side = int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)
    except (KeyError, TypeError, ValueError):
        return None
    return (side, side) if side >= 8 else None


def _learning_rate(meta: dict[str, str]) -> float | None:
    try:
        lr = float(meta[LEARNING_RATE_KEY])
    except (KeyError, ValueError):
        return None
    return lr if 0 < lr < 1 else None


def detect_base_family(path: str | Path, read_pickles: bool = True):
    """The Family of a base model from a .safetensors header, a diffusers folder's JSON or (with
    read_pickles) a .ckpt's keys, which means reading the whole pickle; None when it cannot be read
    (a missing or broken file is reported when it loads)."""
    from lorakit.errors import ModelError
    from lorakit.models.loader import base_family, model_kind

    path = Path(path)
    try:
        family = base_family(path, model_kind(path))
        if family is None and read_pickles:
            from lorakit.models.families.detect import detect_file_family

            family = detect_file_family(path)
        return family
    except (ModelError, OSError, ValueError, KeyError):
        return None


def _family_resolution(family) -> tuple[tuple[int, int], str] | None:
    if family is not None and family.key == "sdxl":
        return (1024, 1024), "the SDXL default"
    return None


def model_defaults(path: str | Path) -> ModelDefaults:
    """Native resolution and learning rate of the base model at `path` (file or diffusers folder)."""
    from dataclasses import replace

    path = Path(path)
    defaults = _model_defaults(path)
    family = detect_base_family(path)
    if family is not None and defaults.source.startswith("the SD1.x default") and _family_resolution(family):
        size, source = _family_resolution(family)
        defaults = replace(defaults, resolution=size, source=source)
    return replace(defaults, family=family)


def _model_defaults(path: Path) -> ModelDefaults:
    if path.is_dir():  # diffusers folder: the component configs
        try:
            unet = json.loads((path / "unet" / "config.json").read_text(encoding="utf-8"))
            vae = json.loads((path / "vae" / "config.json").read_text(encoding="utf-8"))
            native = _native_of_arch(unet, vae)
        except (OSError, ValueError):
            native = None
        if native:
            return ModelDefaults(native, SD1_LEARNING_RATE, "the diffusers unet/vae config")
        return ModelDefaults(SD1_RESOLUTION, SD1_LEARNING_RATE, "the SD1.x default")
    meta = header_metadata(path) if path.is_file() else {}
    lr = _learning_rate(meta)
    lr_kw = {"learning_rate": lr or SD1_LEARNING_RATE}
    if lr:
        lr_kw["learning_rate_source"] = f"{LEARNING_RATE_KEY} in its metadata"
    native = _parse_resolution(meta.get(RESOLUTION_KEY, ""))
    if native:
        return ModelDefaults(native, source=f"{RESOLUTION_KEY} in its metadata", **lr_kw)
    try:
        arch = json.loads(meta[ARCH_KEY])
        native = _native_of_arch(arch["unet"], arch["vae"])
    except (KeyError, TypeError, ValueError):
        native = None
    if native:
        return ModelDefaults(native, source=f"its {ARCH_KEY} metadata", **lr_kw)
    return ModelDefaults(SD1_RESOLUTION, source="the SD1.x default: its metadata names none", **lr_kw)


def resolution_warning(size: tuple[int, int], defaults: ModelDefaults) -> str | None:
    """A warning when a side is under half or over twice the model's native side, else None."""
    (w, h), (nw, nh) = size, defaults.resolution
    if all(native / FAR <= side <= native * FAR for side, native in ((w, nw), (h, nh))):
        return None
    return (
        f"{w}x{h} is far from the base model's native {defaults.size_text} ({defaults.source}): "
        f"it learns and draws poorly there (tiled or blurred pictures); use {defaults.size_text} "
        "or something near it"
    )


def apply_model_defaults(cfg, given: set[str] | None = None) -> ModelDefaults | None:
    """Fill `resolution` and `learning_rate` that were not given from the base model, saying so, and
    warn when the resolution is far from the model's native one. None when there is no model file."""
    from ..config import resolution_of
    from ..errors import ConfigError

    given = cfg.given if given is None else given
    model = cfg.model.pretrained_model_name_or_path
    if not model or not Path(model).exists():
        return None  # a missing model is reported, with its fix, when training starts
    d = model_defaults(model)
    if "resolution" not in given:
        cfg.dataset.resolution = f"{d.resolution[0]},{d.resolution[1]}"
        log.info("resolution not given: %s, the base model's (%s)", cfg.dataset.resolution, d.source)
    if "learning_rate" not in given:
        cfg.training.learning_rate = d.learning_rate
        log.info(
            "learning_rate not given: %g, for this base model (%s)", d.learning_rate, d.learning_rate_source
        )
    try:
        warning = resolution_warning(resolution_of(cfg.dataset.resolution), d)
    except ConfigError:  # a malformed resolution is reported by validate(), with its fix
        warning = None
    if warning:
        log.warning("resolution %s", warning)
    _apply_family_defaults(cfg, given, d.family)
    return d


def _apply_family_defaults(cfg, given: set[str], family) -> None:
    """SDXL's larger buckets, and v-prediction / zero terminal SNR from the checkpoint's marker keys."""
    if family is None:
        return
    if family.key == "sdxl" and "max_bucket_reso" not in given and cfg.dataset.max_bucket_reso < 2048:
        cfg.dataset.max_bucket_reso = 2048
        log.info("max_bucket_reso not given: 2048 for an SDXL base (kohya's default 1024 caps SDXL buckets)")
    for option, marked, marker in (
        ("v_parameterization", family.v_pred, "v_pred"),
        ("zero_terminal_snr", family.zero_terminal_snr, "ztsnr"),
    ):
        if marked and option not in given:
            setattr(cfg.model, option, True)
            log.info("%s not given: on, because the base model carries the '%s' marker key", option, marker)
