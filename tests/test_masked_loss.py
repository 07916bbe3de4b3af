"""masked_loss with alpha_mask: the mask follows the pixels' resize/crop/flip, is cached with the
latents, and weighs the loss (normalised by the mask's area)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.config import DatasetConfig
from lorakit.dataset.images import mask_to_latent_size
from lorakit.dataset.loader import build_dataset
from lorakit.errors import ConfigError
from lorakit.train import noise as N


def write_rgba(path: Path, size: tuple[int, int], seed: int, left_transparent: bool = False) -> None:
    """Noise pixels whose alpha equals the red channel (so the mask can be checked against the pixels);
    with left_transparent the left half is fully transparent instead."""
    rng = np.random.default_rng(seed)
    w, h = size
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    alpha = rgb[:, :, 0].copy()
    if left_transparent:
        alpha[:] = 255
        alpha[:, : w // 2] = 0
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(path)


def rgba_dataset(root: Path, sizes, left_transparent=False) -> Path:
    folder = root / "train" / "2_usu bear"
    for i, size in enumerate(sizes):
        write_rgba(folder / f"img_{i}.png", size, seed=i, left_transparent=left_transparent)
        (folder / f"img_{i}.caption").write_text("usu bear")
    return root / "train"


def bucket_cfg(train_dir: Path, **kw) -> DatasetConfig:
    base = dict(
        train_data_dir=str(train_dir),
        resolution="64",
        enable_bucket=True,
        min_bucket_reso=32,
        max_bucket_reso=128,
        bucket_reso_steps=32,
        flip_aug=True,
        alpha_mask=True,
        train_batch_size=1,
    )
    base.update(kw)
    return DatasetConfig(**base)


def fake_encode(pixels: torch.Tensor) -> torch.Tensor:
    """A deterministic 'VAE': 8x8 average pooling to 4 channels."""
    pooled = torch.nn.functional.avg_pool2d(pixels, 8)
    return torch.cat([pooled, pooled[:, :1]], dim=1)


def test_mask_follows_resize_crop_and_flip_of_the_pixels(tmp_path):
    # sizes that need resizing and cropping into their buckets
    train_dir = rgba_dataset(tmp_path, [(100, 52), (45, 90), (70, 70)])
    ds = build_dataset(bucket_cfg(train_dir), seed=3)
    flips_seen, cropped = set(), 0
    for epoch in range(4):
        for batch in ds.batches(epoch):
            assert batch.masks is not None and batch.pixels is not None
            w, h = batch.bucket
            assert batch.masks.shape == (1, 1, h // 8, w // 8)
            # alpha = red channel, so the mask is the red channel's transform, area-averaged
            red = (batch.pixels[:, :1] + 1) / 2
            expected = mask_to_latent_size(red, (h // 8, w // 8))
            torch.testing.assert_close(batch.masks, expected, atol=2e-3, rtol=0)
            flips_seen.add(batch.flipped[0])
            p = ds.placements[batch.paths[0]]
            cropped += p.crop_ltrb != (0, 0, *p.resized)
    assert flips_seen == {True, False}
    assert cropped > 0
    # and the mask is not trivially uniform
    assert batch.masks.std() > 0.01


def test_cached_masks_equal_uncached_and_survive_the_disk_cache(tmp_path):
    train_dir = rgba_dataset(tmp_path, [(100, 52), (45, 90)])
    cfg = bucket_cfg(train_dir)
    plain = build_dataset(cfg, seed=5)
    cached = build_dataset(cfg, seed=5)
    cached.cache_latents(fake_encode, "vae", to_disk=True)
    from_disk = build_dataset(cfg, seed=5)
    calls = []
    from_disk.cache_latents(lambda p: calls.append(1) or fake_encode(p), "vae", to_disk=True)
    assert calls == []  # read back from the .npz, masks included
    for epoch in range(3):
        for a, b, c in zip(plain.batches(epoch), cached.batches(epoch), from_disk.batches(epoch)):
            assert b.pixels is None and b.masks is not None
            torch.testing.assert_close(b.masks, a.masks)
            torch.testing.assert_close(c.masks, a.masks)

    # turning alpha_mask off or on changes the key: the cache is recomputed, not read without masks
    calls.clear()
    build_dataset(dataclasses.replace(cfg, alpha_mask=False), seed=5).cache_latents(
        lambda p: calls.append(1) or fake_encode(p), "vae", to_disk=True
    )
    assert calls
    calls.clear()
    again = build_dataset(cfg, seed=5)
    again.cache_latents(lambda p: calls.append(1) or fake_encode(p), "vae", to_disk=True)
    assert calls
    assert next(again.batches(0)).masks is not None


def test_images_without_alpha_get_ones_and_one_warning(tiny_data):
    warnings: list[str] = []
    cfg = DatasetConfig(
        train_data_dir=str(tiny_data[0]), resolution="64", alpha_mask=True, train_batch_size=2
    )
    ds = build_dataset(cfg, seed=1, warn=warnings.append)
    mask_warnings = [w for w in warnings if "alpha_mask" in w]
    assert len(mask_warnings) == 1 and "4 image(s)" in mask_warnings[0]
    batch = next(ds.batches(0))
    assert torch.equal(batch.masks, torch.ones(2, 1, 8, 8))


def test_masked_loss_ignores_the_masked_out_area_and_is_normalised():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    mask = torch.zeros(2, 1, 8, 8)
    mask[:, :, :, 4:] = 1.0
    changed = pred.clone()
    changed[:, :, :, :4] += 5.0  # only where the mask is 0
    a, b = N.per_sample_loss(pred, target, mask), N.per_sample_loss(changed, target, mask)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(N.per_sample_loss(pred, target), N.per_sample_loss(changed, target))
    # normalised by area: the mean error over the unmasked half
    right = ((pred - target) ** 2)[:, :, :, 4:].mean(dim=(1, 2, 3))
    torch.testing.assert_close(a, right)
    # grey weighs partially: a uniform grey mask is the plain mean; an empty mask gives 0, not nan
    torch.testing.assert_close(
        N.per_sample_loss(pred, target, torch.full_like(mask, 0.3)), N.per_sample_loss(pred, target)
    )
    assert torch.equal(N.per_sample_loss(pred, target, torch.zeros_like(mask)), torch.zeros(2))
    # a pixel-size mask is area-averaged to the loss's size (kohya's apply_masked_loss)
    big = torch.nn.functional.interpolate(mask, scale_factor=8, mode="nearest")
    torch.testing.assert_close(N.per_sample_loss(pred, target, big), a)


def test_masked_loss_needs_a_mask_source(train_config):
    from lorakit.train.trainer import build_trainer

    with pytest.raises(ConfigError, match="alpha_mask"):
        build_trainer(train_config(masked_loss=True))


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_trainer_weighs_the_loss_by_the_mask(family, train_config, sdxl_config, tmp_path):
    from lorakit.train.trainer import build_trainer

    train_dir = rgba_dataset(tmp_path / "rgba", [(64, 64)] * 2, left_transparent=True)
    make = train_config if family == "sd1" else sdxl_config
    common = dict(train_data_dir=str(train_dir), alpha_mask=True, cache_latents=True)
    masked = build_trainer(make(masked_loss=True, **common))
    plain = build_trainer(make(**common))
    batch = next(masked.dataset.batches(0))
    assert batch.masks is not None and batch.masks[..., :4].max() == 0 and batch.masks[..., 4:].min() == 1
    with torch.no_grad():
        lm = masked.loss_of(batch, 0)
        lp = plain.loss_of(batch, 0)
        # with a mask of ones the masked loss is the plain loss (same step: the same noise)
        lo = masked.loss_of(dataclasses.replace(batch, masks=torch.ones_like(batch.masks)), 0)
        lz = masked.loss_of(dataclasses.replace(batch, masks=torch.zeros_like(batch.masks)), 0)
    assert torch.isfinite(lm) and not torch.isclose(lm, lp)
    torch.testing.assert_close(lo, lp)
    assert lz.item() == 0.0
    path = masked.run()  # trains end to end
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        assert f.metadata()["ss_masked_loss"] == "True"
