"""masked_loss with mask images in conditioning_data_dir (kohya's rule: the image's stem, the red
channel, grey = partial weight): found per train image in the mirrored folder, resized/cropped/flipped
with the image, cached with the latents under a key over the mask file, and clear errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lorakit.config import DatasetConfig, TrainConfig
from lorakit.dataset.images import mask_to_latent_size
from lorakit.dataset.loader import build_dataset
from lorakit.errors import ConfigError, DatasetError

FOLDER = "2_usu bear"


def noise_image(size: tuple[int, int], seed: int) -> np.ndarray:
    w, h = size
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def masked_dataset(root: Path, sizes, mask_of=None, flat: bool = False, ext: str = ".png"):
    """train/2_usu bear/img_i.png (noise) and masks/[2_usu bear/]img_i<ext>; by default the mask is
    the image's red channel (an RGB file with other G/B, so only R may be read)."""
    train, masks = root / "train" / FOLDER, root / "masks" if flat else root / "masks" / FOLDER
    train.mkdir(parents=True)
    masks.mkdir(parents=True, exist_ok=True)
    for i, size in enumerate(sizes):
        rgb = noise_image(size, i)
        Image.fromarray(rgb).save(train / f"img_{i}.png")
        (train / f"img_{i}.caption").write_text("usu bear")
        mask = mask_of(rgb) if mask_of else np.dstack([rgb[:, :, 0], 255 - rgb[:, :, 0], rgb[:, :, 2]])
        Image.fromarray(mask).save(masks / f"img_{i}{ext}")
    return root / "train", root / "masks"


def cfg_of(train: Path, masks: Path, **kw) -> DatasetConfig:
    base = dict(
        train_data_dir=str(train),
        conditioning_data_dir=str(masks),
        resolution="64",
        enable_bucket=True,
        min_bucket_reso=32,
        max_bucket_reso=128,
        bucket_reso_steps=32,
        flip_aug=True,
        train_batch_size=1,
    )
    return DatasetConfig(**{**base, **kw})


def fake_encode(pixels: torch.Tensor) -> torch.Tensor:
    pooled = torch.nn.functional.avg_pool2d(pixels, 8)
    return torch.cat([pooled, pooled[:, :1]], dim=1)


def test_the_mask_files_red_channel_follows_resize_crop_and_flip(tmp_path):
    train, masks = masked_dataset(tmp_path, [(100, 52), (45, 90), (70, 70)])
    ds = build_dataset(cfg_of(train, masks), seed=3)
    flips, cropped = set(), 0
    for epoch in range(4):
        for batch in ds.batches(epoch):
            w, h = batch.bucket
            assert batch.masks is not None and batch.masks.shape == (1, 1, h // 8, w // 8)
            red = (batch.pixels[:, :1] + 1) / 2  # the mask is the red channel: it must match it
            torch.testing.assert_close(
                batch.masks, mask_to_latent_size(red, (h // 8, w // 8)), atol=2e-3, rtol=0
            )
            flips.add(batch.flipped[0])
            p = ds.placements[batch.paths[0]]
            cropped += p.crop_ltrb != (0, 0, *p.resized)
    assert flips == {True, False} and cropped > 0 and batch.masks.std() > 0.01


def test_a_mask_at_another_scale_and_a_flat_folder_and_jpg(tmp_path):
    def left_black(rgb):
        h, w = rgb.shape[:2]
        m = np.full((h // 2, w // 2, 3), 255, np.uint8)  # half the image's size, same aspect ratio
        m[:, : w // 4] = 0
        return m

    train, masks = masked_dataset(tmp_path, [(64, 64)], mask_of=left_black, flat=True, ext=".jpg")
    ds = build_dataset(cfg_of(train, masks, enable_bucket=False, flip_aug=False), seed=0)
    m = next(ds.batches(0)).masks[0, 0]
    assert m[:, :3].max() < 0.05 and m[:, 5:].min() > 0.95  # left black, right white, at latent size


def test_cached_masks_equal_uncached_and_a_changed_mask_file_recomputes_the_cache(tmp_path):
    train, masks = masked_dataset(tmp_path, [(100, 52), (45, 90)])
    cfg = cfg_of(train, masks)
    plain = build_dataset(cfg, seed=5)
    cached = build_dataset(cfg, seed=5)
    cached.cache_latents(fake_encode, "vae", to_disk=True)
    calls = []
    from_disk = build_dataset(cfg, seed=5)
    from_disk.cache_latents(lambda p: calls.append(1) or fake_encode(p), "vae", to_disk=True)
    assert calls == []
    for epoch in range(3):
        for a, b, c in zip(plain.batches(epoch), cached.batches(epoch), from_disk.batches(epoch)):
            assert b.pixels is None
            torch.testing.assert_close(b.masks, a.masks)
            torch.testing.assert_close(c.masks, a.masks)
    # a new mask file (same image): the cache key changes, the mask is recomputed from the new file
    for f in (masks / FOLDER).iterdir():
        Image.new("RGB", Image.open(f).size, (0, 255, 255)).save(f)  # red 0: ignore everything
    again = build_dataset(cfg, seed=5)
    again.cache_latents(lambda p: calls.append(1) or fake_encode(p), "vae", to_disk=True)
    assert calls
    assert all(b.masks.max() == 0 for b in again.batches(0))


def test_a_missing_mask_names_the_image(tmp_path):
    train, masks = masked_dataset(tmp_path, [(64, 64), (64, 64)])
    (masks / FOLDER / "img_1.png").unlink()
    with pytest.raises(DatasetError, match=r"no mask image for 1 image\(s\): .*img_1\.png") as e:
        build_dataset(cfg_of(train, masks), seed=0)
    assert "img_0" not in str(e.value)
    with pytest.raises(DatasetError, match="is not a folder"):
        build_dataset(cfg_of(train, tmp_path / "nowhere"), seed=0)


def test_a_mask_with_another_aspect_ratio_names_the_image(tmp_path):
    train, masks = masked_dataset(tmp_path, [(64, 64), (96, 64)])
    Image.new("RGB", (64, 64), "white").save(masks / FOLDER / "img_1.png")  # square, image is 3:2
    with pytest.raises(DatasetError, match=r"aspect ratio.*img_1\.png is 96x64, its mask .* is 64x64"):
        build_dataset(cfg_of(train, masks), seed=0)


def test_reg_images_train_whole_with_a_warning(tmp_path):
    from lorakit.testing import make_dataset

    train, masks = masked_dataset(tmp_path, [(64, 64)] * 2, mask_of=lambda rgb: np.zeros_like(rgb))
    _, reg = make_dataset(tmp_path / "other", n_train=1, n_reg=2, repeats=1)
    warnings: list[str] = []
    cfg = cfg_of(train, masks, reg_data_dir=str(reg), enable_bucket=False, flip_aug=False)
    ds = build_dataset(cfg, seed=0, warn=warnings.append)
    assert any("regularization" in w and "no mask" in w for w in warnings)
    seen = {}
    for batch in ds.batches(0):
        seen[bool(batch.is_reg[0])] = float(batch.masks.mean())
    assert seen == {True: 1.0, False: 0.0}


def test_the_config_wants_one_mask_source_and_masked_loss(tmp_path):
    base = {"pretrained_model_name_or_path": "m.safetensors", "train_data_dir": "t"}
    TrainConfig.from_dict({**base, "masked_loss": True, "conditioning_data_dir": "m"}).validate()
    with pytest.raises(ConfigError, match="two mask sources"):
        TrainConfig.from_dict(
            {**base, "masked_loss": True, "conditioning_data_dir": "m", "alpha_mask": True}
        ).validate()
    with pytest.raises(ConfigError, match="set masked_loss = true"):
        TrainConfig.from_dict({**base, "conditioning_data_dir": "m"}).validate()
    with pytest.raises(ConfigError, match="conditioning_data_dir"):
        TrainConfig.from_dict({**base, "masked_loss": True}).validate()


def test_the_trainer_weighs_the_loss_by_the_mask_files(train_config, tmp_path):
    from lorakit.train.trainer import build_trainer

    def left_black(rgb):
        m = np.full_like(rgb, 255)
        m[:, : rgb.shape[1] // 2] = 0
        return m

    train, masks = masked_dataset(tmp_path / "m", [(64, 64)] * 2, mask_of=left_black)
    common = dict(train_data_dir=str(train), cache_latents=True, cache_latents_to_disk=True)
    trainer = build_trainer(train_config(masked_loss=True, conditioning_data_dir=str(masks), **common))
    batch = next(trainer.dataset.batches(0))
    assert batch.masks[..., :4].max() == 0 and batch.masks[..., 4:].min() == 1
    with torch.no_grad():  # the same step: the same noise, so only the mask differs
        masked = trainer.loss_of(batch, 0)
        whole = trainer.loss_of(dataclasses.replace(batch, masks=torch.ones_like(batch.masks)), 0)
        none = trainer.loss_of(dataclasses.replace(batch, masks=torch.zeros_like(batch.masks)), 0)
    assert torch.isfinite(masked) and not torch.isclose(masked, whole) and none.item() == 0.0
    assert trainer.run().exists()
