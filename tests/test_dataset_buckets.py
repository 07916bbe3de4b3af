"""kohya bucketing: resolutions, assignment, resize-to-cover, centre crop, no_upscale, and pixels."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.dataset.buckets import BucketManager, make_bucket_resolutions
from lorakit.dataset.images import load_image, to_tensor


def test_bucket_resolutions_512_like_kohya():
    resos = make_bucket_resolutions((512, 512), 256, 1024, 64)
    assert resos == sorted(set(resos))
    for r in [
        (512, 512),
        (384, 640),
        (640, 384),
        (256, 1024),
        (1024, 256),
        (448, 576),
        (320, 768),
        (256, 832),
    ]:
        assert r in resos
    assert all(w % 64 == 0 and h % 64 == 0 for w, h in resos)
    assert all(w * h <= 512 * 512 for w, h in resos)
    assert all(256 <= min(w, h) and max(w, h) <= 1024 for w, h in resos)
    assert len(resos) == 17  # kohya's list for 512x512 / 256 / 1024 / 64


def test_wide_image_goes_to_wide_bucket_with_centred_crop():
    bm = BucketManager((512, 512), enable_bucket=True)
    p = bm.select(1000, 500)
    w, h = p.bucket
    assert w > h and (w, h) in bm.predefined
    # nearest aspect to 2.0 among predefined buckets (first on ties, like argmin)
    best = min(bm.predefined, key=lambda r: abs(r[0] / r[1] - 2.0))
    assert p.bucket == best == (704, 320)
    # aspect 2.0 < 2.2: width matches, height covers (rounded half up), crop centred vertically
    assert p.resized == (704, 352)
    assert p.crop_ltrb == (0, 16, 704, 336)
    assert p.ar_error == pytest.approx(704 / 320 - 2.0)


def test_exact_size_image_keeps_its_bucket():
    bm = BucketManager((512, 512), enable_bucket=True)
    p = bm.select(384, 640)
    assert p.bucket == (384, 640) and p.resized == (384, 640) and p.crop_ltrb == (0, 0, 384, 640)


def test_no_bucket_single_resolution_cover_and_crop():
    bm = BucketManager((512, 512), enable_bucket=False)
    p = bm.select(1000, 500)
    assert p.bucket == (512, 512)
    assert p.resized == (1024, 512)
    assert p.crop_ltrb == (256, 0, 768, 512)
    p = bm.select(300, 900)  # upscaled to cover
    assert p.bucket == (512, 512) and p.resized == (512, 1536) and p.crop_ltrb == (0, 512, 512, 1024)


def test_bucket_no_upscale():
    bm = BucketManager((512, 512), enable_bucket=True, no_upscale=True)
    small = bm.select(300, 200)  # no upscale: bucket is the size floored to 64
    assert small.resized == (300, 200) and small.bucket == (256, 192)
    assert small.crop_ltrb == (22, 4, 278, 196)
    big = bm.select(2000, 1000)  # shrunk to about 512² area, aspect kept
    assert big.bucket[0] * big.bucket[1] <= 512 * 512
    assert abs(big.resized[0] / big.resized[1] - 2.0) < 0.02
    assert big.bucket == (big.resized[0] - big.resized[0] % 64, big.resized[1] - big.resized[1] % 64)
    with pytest.raises(Exception, match="too small"):
        bm.select(40, 40)


def test_to_tensor_resizes_crops_flips_and_scales(tmp_path):
    arr = np.zeros((50, 100, 3), np.uint8)
    arr[:, :50] = (255, 0, 0)  # left half red, right half blue
    arr[:, 50:] = (0, 0, 255)
    path = tmp_path / "a.png"
    Image.fromarray(arr).save(path)
    bm = BucketManager((64, 64), enable_bucket=False)
    p = bm.select(100, 50)
    im = load_image(path)
    t = to_tensor(im, p.bucket, p.resized, p.crop_ltrb)
    assert t.shape == (3, 64, 64) and t.dtype == torch.float32
    assert t.min() >= -1 and t.max() <= 1
    assert t[0, 32, 0] == 1.0 and t[2, 32, 0] == -1.0  # left edge red
    assert t[2, 32, 63] == 1.0  # right edge blue
    flipped = to_tensor(im, p.bucket, p.resized, p.crop_ltrb, flip=True)
    assert torch.equal(flipped, torch.flip(t, dims=[2]))


def test_load_image_converts_to_rgb(tmp_path):
    path = tmp_path / "rgba.png"
    Image.new("RGBA", (8, 8), (10, 20, 30, 0)).save(path)
    im = load_image(path)
    assert im.mode == "RGB" and im.getpixel((0, 0)) == (10, 20, 30)
