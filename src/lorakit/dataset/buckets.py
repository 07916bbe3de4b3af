"""kohya's aspect-ratio bucketing (`model_util.make_bucket_resolutions`, `train_util.BucketManager`).

Each image gets a bucket (the training size), a resized size that covers the bucket, and the
centre crop that cuts the resized image down to the bucket.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..config import DatasetConfig, resolution_of
from ..errors import DatasetError


@dataclass(frozen=True)
class Placement:
    bucket: tuple[int, int]  # (w, h) the image is trained at
    resized: tuple[int, int]  # (w, h) it is resized to before cropping
    crop_ltrb: tuple[int, int, int, int]  # crop box in resized pixels; right-left = bucket w
    ar_error: float  # bucket aspect - image aspect (kohya's mean_img_ar_error uses |.|)


def make_bucket_resolutions(
    max_reso: tuple[int, int], min_size: int = 256, max_size: int = 1024, divisible: int = 64
) -> list[tuple[int, int]]:
    """The predefined buckets: about max_reso's area, sides multiples of `divisible`, sorted."""
    max_width, max_height = max_reso
    max_area = max_width * max_height
    resos = set()
    width = int(math.sqrt(max_area) // divisible) * divisible
    resos.add((width, width))
    width = min_size
    while width <= max_size:
        height = min(max_size, int((max_area // width) // divisible) * divisible)
        if height >= min_size:
            resos.add((width, height))
            resos.add((height, width))
        width += divisible
    return sorted(resos)


def centre_crop(bucket: tuple[int, int], resized: tuple[int, int]) -> tuple[int, int, int, int]:
    """kohya's trim_and_resize_if_required without random_crop: trim // 2 off the left/top."""
    left = (resized[0] - bucket[0]) // 2
    top = (resized[1] - bucket[1]) // 2
    return left, top, left + bucket[0], top + bucket[1]


class BucketManager:
    """Assigns images to buckets the way kohya's BucketManager.select_bucket does."""

    def __init__(
        self,
        resolution: tuple[int, int],
        enable_bucket: bool = False,
        min_size: int = 256,
        max_size: int = 1024,
        steps: int = 64,
        no_upscale: bool = False,
    ) -> None:
        self.resolution = resolution
        self.max_area = resolution[0] * resolution[1]
        self.steps = steps
        # Like kohya: without bucketing there is one bucket, and no_upscale only matters with buckets.
        self.no_upscale = no_upscale and enable_bucket
        if not enable_bucket:
            self.predefined = [resolution]
        elif not self.no_upscale:
            self.predefined = make_bucket_resolutions(resolution, min_size, max_size, steps)
        else:
            self.predefined = []  # min/max ignored: buckets come from the image sizes
        self._predefined_set = set(self.predefined)
        self._aspects = [w / h for w, h in self.predefined]

    @classmethod
    def from_config(cls, cfg: DatasetConfig) -> BucketManager:
        return cls(
            resolution_of(cfg.resolution),
            cfg.enable_bucket,
            cfg.min_bucket_reso,
            cfg.max_bucket_reso,
            cfg.bucket_reso_steps,
            cfg.bucket_no_upscale,
        )

    def round_to_steps(self, x: float) -> int:
        x = int(x + 0.5)
        return x - x % self.steps

    def select(self, width: int, height: int) -> Placement:
        aspect = width / height
        if not self.no_upscale:
            reso = (width, height)
            if reso not in self._predefined_set:
                # First minimum of |aspect error|, like np.abs(...).argmin() over the sorted list.
                errors = [abs(a - aspect) for a in self._aspects]
                reso = self.predefined[errors.index(min(errors))]
            # Scale so the image covers the bucket: match the side that is relatively shorter.
            scale = reso[1] / height if aspect > reso[0] / reso[1] else reso[0] / width
            resized = (int(width * scale + 0.5), int(height * scale + 0.5))
        else:
            if width * height > self.max_area:
                # Shrink to max_area keeping the aspect; pick the rounding that keeps it best.
                rw = math.sqrt(self.max_area * aspect)
                rh = self.max_area / rw
                bw = self.round_to_steps(rw)
                bh_in_w = self.round_to_steps(bw / aspect)
                bh = self.round_to_steps(rh)
                bw_in_h = self.round_to_steps(bh * aspect)
                ar_w = bw / bh_in_w if bh_in_w else math.inf
                ar_h = bw_in_h / bh if bh else math.inf
                if abs(ar_w - aspect) < abs(ar_h - aspect):
                    resized = (bw, int(bw / aspect + 0.5))
                else:
                    resized = (int(bh * aspect + 0.5), bh)
            else:
                resized = (width, height)
            reso = (resized[0] - resized[0] % self.steps, resized[1] - resized[1] % self.steps)
        if min(reso) < self.steps:
            raise DatasetError(
                f"an image of {width}x{height} is too small for a {self.steps}-pixel bucket step; "
                "remove it or turn off bucket_no_upscale"
            )
        return Placement(reso, resized, centre_crop(reso, resized), reso[0] / reso[1] - aspect)
