"""Latent cache: encode once per image, disk files keyed on image bytes, placement, flip and VAE."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from lorakit.config import DatasetConfig
from lorakit.dataset.buckets import BucketManager
from lorakit.dataset.cache import cache_latents, cache_path
from lorakit.dataset.folders import scan_dataset
from lorakit.dataset.loader import DreamBoothDataset


class FakeVAE:
    """pixels [B,3,H,W] -> [B,4,H/8,W/8]; counts the images it encodes."""

    def __init__(self, offset: float = 0.0):
        self.images = 0
        self.calls = 0
        self.offset = offset

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self.images += x.shape[0]
        self.calls += 1
        pooled = F.avg_pool2d(x, 8)
        return torch.cat([pooled, pooled[:, :1] * 0 + self.offset], dim=1)


def img(path: Path, size=(64, 48), color=(200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[:] = color
    arr[:, : size[0] // 4] = (0, 255, 0)  # asymmetric, so a flip shows
    Image.fromarray(arr).save(path)
    return path


def items(paths, reso=(64, 64)):
    bm = BucketManager(reso)
    return [(p, bm.select(*Image.open(p).size)) for p in paths]


def test_each_unique_image_encoded_once_in_memory(tmp_path):
    paths = [img(tmp_path / f"{i}.png") for i in range(3)]
    vae = FakeVAE()
    out = cache_latents(items(paths * 5), vae, "vae-a", to_disk=False, batch_size=2)
    assert vae.images == 3 and vae.calls == 2
    assert set(out) == set(paths)
    assert out[paths[0]].latents.shape == (4, 8, 8) and out[paths[0]].latents_flipped is None
    assert not list(tmp_path.glob("*.npz"))


def test_disk_cache_written_reused_and_keyed(tmp_path):
    p = img(tmp_path / "a.png")
    its = items([p])
    vae = FakeVAE()
    cache_latents(its, vae, "vae-a", to_disk=True)
    f = cache_path(p, (64, 64))
    assert f.name == "a_0064x0064_lorakit.npz" and f.exists()
    with np.load(f) as z:
        key1 = str(z["key"])
        assert z["latents"].shape == (4, 8, 8)
        assert tuple(z["original_size"]) == (64, 48) and tuple(z["crop_ltrb"]) == its[0][1].crop_ltrb
    assert vae.images == 1

    vae2 = FakeVAE()
    again = cache_latents(its, vae2, "vae-a", to_disk=True)
    assert vae2.images == 0  # hit
    assert again[p].latents.shape == (4, 8, 8)

    # another VAE: recomputed, new key
    vae3 = FakeVAE(offset=1.0)
    out = cache_latents(its, vae3, "vae-b", to_disk=True)
    assert vae3.images == 1 and torch.all(out[p].latents[3] == 1.0)
    with np.load(f) as z:
        key2 = str(z["key"])
        assert np.all(z["latents"][3] == 1.0)
    assert key2 != key1

    # same size, different bytes: recomputed
    img(p, color=(0, 0, 200))
    vae4 = FakeVAE()
    cache_latents(its, vae4, "vae-b", to_disk=True)
    assert vae4.images == 1
    with np.load(f) as z:
        assert str(z["key"]) not in (key1, key2)


def test_crop_and_flip_change_the_key(tmp_path):
    p = img(tmp_path / "a.png", size=(64, 96))
    cache_latents(items([p]), FakeVAE(), "v", to_disk=True)
    vae = FakeVAE()
    out = cache_latents(items([p]), vae, "v", to_disk=True, flip_aug=True)
    assert vae.images == 2  # normal + flipped pass
    assert out[p].latents_flipped is not None
    assert not torch.equal(out[p].latents, out[p].latents_flipped)
    bm = BucketManager((64, 64))
    pl = bm.select(64, 96)
    moved = type(pl)(pl.bucket, pl.resized, (0, 0, 64, 64), pl.ar_error)  # another crop
    vae = FakeVAE()
    cache_latents([(p, moved)], vae, "v", to_disk=True, flip_aug=True)
    assert vae.images == 2


def test_corrupt_cache_file_is_recomputed_atomically(tmp_path):
    p = img(tmp_path / "a.png")
    f = cache_path(p, (64, 64))
    f.write_bytes(b"garbage")
    vae = FakeVAE()
    cache_latents(items([p]), vae, "v", to_disk=True)
    assert vae.images == 1
    with np.load(f) as z:
        assert "key" in z
    assert sorted(x.name for x in tmp_path.iterdir()) == ["a.png", f.name]  # no temp files left


def test_dataset_uses_cached_latents_and_flipped_variant(tmp_path):
    for i in range(2):
        img(tmp_path / "train" / "3_x" / f"{i}.png")
    cfg = DatasetConfig(
        train_data_dir=str(tmp_path / "train"), resolution="64", flip_aug=True, train_batch_size=2
    )
    ds = DreamBoothDataset(scan_dataset(cfg.train_data_dir), cfg, seed=1)
    vae = FakeVAE()
    ds.cache_latents(vae, "v", to_disk=False)
    assert vae.images == 4  # 2 images, each plain + flipped, despite 3 repeats
    seen = set()
    for b in ds.batches(0):
        assert b.pixels is None and b.latents.shape == (len(b.paths), 4, 8, 8)
        for path, flip, lat in zip(b.paths, b.flipped, b.latents):
            want = ds._latents[path].latents_flipped if flip else ds._latents[path].latents
            assert torch.equal(lat, want)
            seen.add(flip)
    assert seen == {True, False}


@pytest.mark.parametrize("to_disk", [False, True])
def test_progress_reports(tmp_path, to_disk):
    paths = [img(tmp_path / f"{i}.png") for i in range(3)]
    calls = []
    cache_latents(items(paths), FakeVAE(), "v", to_disk=to_disk, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(1, 3), (2, 3), (3, 3)]  # one report per VAE batch (batch_size 1)
    calls.clear()
    cache_latents(
        items(paths),
        FakeVAE(),
        "v",
        to_disk=to_disk,
        batch_size=2,
        progress=lambda d, t: calls.append((d, t)),
    )
    # from disk nothing is left to encode; in memory all 3 again, in batches of 2
    assert calls == ([] if to_disk else [(2, 3), (3, 3)])
