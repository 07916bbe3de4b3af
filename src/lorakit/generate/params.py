"""The typed txt2img request that the CLI, the GUI and sample prompts fill (no torch here)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError

MAX_SIDE = 2048  # A1111's largest size; SD1.x draws poorly far above its 512 training size
MAX_SEED = 2**32 - 1  # A1111's seed range; torch's generators overflow a little above 2**64
# A1111's "Random number generator source" (Settings > Sampler parameters): where a seed's noise is
# drawn. "gpu" (its default) draws on the drawing device, "cpu" on the CPU; kdiffusion.noise_device.
RNG_SOURCES = ("gpu", "cpu")


class ParamError(ConfigError):
    """A field out of range; `field` and `reason` let a caller name its own option for it."""

    def __init__(self, field: str, value: object, reason: str):
        super().__init__(f"{field} {value}: {reason}")
        self.field, self.reason = field, reason


@dataclass
class GenerationParams:
    """One txt2img request, named like A1111's fields."""

    prompt: str = ""
    negative_prompt: str = ""
    steps: int = 20
    cfg_scale: float = 7.0
    width: int = 512
    height: int = 512
    seed: int = -1  # -1: random, printed and stored
    batch_count: int = 1
    batch_size: int = 1
    sampler: str = "DPM++ 2M"
    schedule_type: str | None = None  # "Karras"; or fold it into the name ("DPM++ 2M Karras")
    clip_skip: int = 1
    cfg_rescale: float = 0.0  # reForge/Forge's "Rescale CFG" phi, 0 to 1 (0.7 for v-prediction bases)
    rng: str = "gpu"  # A1111's RNG source: "gpu" (default) or "cpu"; PNG info says "RNG: CPU" for cpu

    def check(self, images: str = "images") -> None:
        """ConfigError (a ParamError naming the field where one field is wrong) for a request that
        cannot be drawn; `images` names them in the size message ("sample images")."""
        if self.width % 8 or self.height % 8 or min(self.width, self.height) < 64:
            raise ConfigError(
                f"size {self.width}x{self.height}: width and height must be multiples of 8, at least 64"
            )
        for field in ("width", "height"):
            if getattr(self, field) > MAX_SIDE:
                raise ParamError(
                    field, getattr(self, field), f"{images} are at most {MAX_SIDE} pixels a side"
                )
        if not (self.seed == -1 or 0 <= self.seed <= MAX_SEED):
            raise ParamError("seed", self.seed, f"a seed is -1 (random) or 0 to {MAX_SEED}")
        if self.steps < 1 or self.batch_count < 1 or self.batch_size < 1:
            raise ConfigError("steps, batch_count and batch_size must be at least 1")
        if self.clip_skip < 1:
            raise ConfigError("clip_skip must be 1 or more")
        if not (math.isfinite(self.cfg_rescale) and 0 <= self.cfg_rescale <= 1):
            raise ParamError(
                "cfg_rescale", self.cfg_rescale, "CFG rescale is 0 (off) to 1; 0.7 is usual for v-prediction"
            )
        if self.rng not in RNG_SOURCES:
            raise ParamError(
                "rng", self.rng, "the RNG source is gpu (A1111's default) or cpu (A1111's 'RNG: CPU' setting)"
            )
        if not math.isfinite(self.cfg_scale) or self.cfg_scale < 0:
            raise ParamError(
                "cfg_scale", self.cfg_scale, "the CFG scale must be a number of 0 or more (7 is usual)"
            )
