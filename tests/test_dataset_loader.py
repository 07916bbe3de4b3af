"""Epoch batches: bucketed batching, determinism, exact resume with skip, rank split, captions."""

from __future__ import annotations

import random
from pathlib import Path

import torch
from PIL import Image

from lorakit.config import DatasetConfig
from lorakit.dataset.captions import process_caption
from lorakit.dataset.folders import scan_dataset
from lorakit.dataset.loader import DreamBoothDataset


def img(path: Path, size=(64, 64), color=(128, 64, 32)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im = Image.new("RGB", size, color)
    im.putpixel((0, 0), (255, 255, 255))  # asymmetric, so a flip shows
    im.save(path)
    return path


def make(tmp_path, n=6, repeats=2, reg=0, **cfg_kw) -> DreamBoothDataset:
    train = tmp_path / "train"
    for i in range(n):
        p = img(train / f"{repeats}_usu bear" / f"{i:02d}.png", color=(i * 30, 50, 50))
        p.with_suffix(".caption").write_text(f"usu bear, tag{i}a, tag{i}b, tag{i}c, tag{i}d")
    reg_dir = None
    if reg:
        reg_dir = tmp_path / "reg"
        for i in range(reg):
            img(reg_dir / "1_bear" / f"{i:02d}.png")
    kw = dict(train_data_dir=str(train), reg_data_dir=str(reg_dir) if reg_dir else None, resolution="64")
    kw.update(cfg_kw)
    cfg = DatasetConfig(**kw)
    return DreamBoothDataset(
        scan_dataset(cfg.train_data_dir, cfg.reg_data_dir, cfg.caption_extension), cfg, seed=7
    )


def summary(batches):
    return [(b.index, [p.name for p in b.paths], b.captions, b.flipped) for b in batches]


def test_same_seed_and_epoch_same_batches_other_epoch_differs(tmp_path):
    ds = make(tmp_path, shuffle_caption=True, flip_aug=True, train_batch_size=2)
    a = list(ds.batches(3))
    b = list(ds.batches(3))
    assert summary(a) == summary(b)
    assert all(torch.equal(x.pixels, y.pixels) for x, y in zip(a, b))
    assert summary(list(ds.batches(4))) != summary(a)
    # global random state is neither used nor disturbed
    random.seed(0)
    state = random.getstate()
    list(ds.batches(3))
    assert random.getstate() == state


def test_skip_reproduces_the_tail_exactly(tmp_path):
    ds = make(tmp_path, shuffle_caption=True, keep_tokens=1, flip_aug=True, train_batch_size=2)
    full = list(ds.batches(2))
    assert len(full) == ds.num_batches_per_epoch == 6
    for k in (1, 4):
        tail = list(ds.batches(2, skip=k))
        assert summary(tail) == summary(full[k:])
        assert all(torch.equal(x.pixels, y.pixels) for x, y in zip(tail, full[k:]))


def test_rank_split_disjoint_covering_and_resumable(tmp_path):
    ds = make(tmp_path, n=7, repeats=1)  # 7 batches of 1
    full = list(ds.batches(0))
    ranks = [list(ds.batches(0, rank=r, world_size=3)) for r in range(3)]
    assert [len(r) for r in ranks] == [2, 2, 2] == [ds.num_batches_per_rank(3)] * 3
    idx = sorted(b.index for r in ranks for b in r)
    assert idx == list(range(6))  # truncated to a multiple of world_size, no overlap
    by_index = {b.index: b for b in full}
    for r in ranks:
        for b in r:
            assert summary([b]) == summary([by_index[b.index]])
    assert summary(list(ds.batches(0, rank=1, world_size=3, skip=1))) == summary(ranks[1][1:])


def test_batches_stay_inside_buckets(tmp_path):
    train = tmp_path / "train" / "1_x"
    for i in range(3):
        img(train / f"wide{i}.png", size=(192, 64))
    for i in range(2):
        img(train / f"tall{i}.png", size=(64, 192))
    cfg = DatasetConfig(
        train_data_dir=str(tmp_path / "train"),
        resolution="128",
        enable_bucket=True,
        min_bucket_reso=64,
        max_bucket_reso=256,
        train_batch_size=2,
    )
    ds = DreamBoothDataset(scan_dataset(cfg.train_data_dir), cfg, seed=0)
    assert ds.num_batches_per_epoch == 2 + 1  # ceil(3/2) + ceil(2/2)
    batches = list(ds.batches(0))
    assert len(batches) == 3
    for b in batches:
        kinds = {p.name[:4] for p in b.paths}
        assert len(kinds) == 1
        w, h = b.bucket
        assert b.pixels.shape == (len(b.paths), 3, h, w)
        assert (w, h) == ((192, 64) if kinds == {"wide"} else (64, 192))
    info = ds.bucket_info()
    assert sorted(v["count"] for v in info["buckets"].values()) == [2, 3]


def test_reg_loss_weights_and_captions(tmp_path):
    ds = make(tmp_path, n=2, repeats=2, reg=1, prior_loss_weight=0.5, train_batch_size=4)
    batches = list(ds.batches(0))
    n_reg = sum(int(b.is_reg.sum()) for b in batches)
    assert n_reg == 4  # one reg image balanced to the 4 train samples
    for b in batches:
        assert b.is_reg.dtype == torch.bool
        assert torch.equal(b.loss_weights, torch.where(b.is_reg, 0.5, 1.0))
        for cap, r in zip(b.captions, b.is_reg.tolist()):
            assert (cap == "bear") == r
    assert set(ds.all_captions()) == {
        "usu bear, tag0a, tag0b, tag0c, tag0d",
        "usu bear, tag1a, tag1b, tag1c, tag1d",
        "bear",
    }
    assert len(ds.all_captions()) == 3


def test_flip_in_pixels_matches_mirrored_image(tmp_path):
    ds = make(tmp_path, n=3, repeats=4, flip_aug=True)
    flips = {}
    for b in ds.batches(0):
        flips.setdefault((b.paths[0], b.flipped[0]), b.pixels[0])
    for (path, f), px in flips.items():
        if f and (path, False) in flips:
            assert torch.equal(px, torch.flip(flips[(path, False)], dims=[2]))
            break
    else:
        raise AssertionError("expected both a flipped and an unflipped copy of one image")
    ds_noflip = make(tmp_path / "b", n=3, repeats=4, flip_aug=False)
    assert not any(f for b in ds_noflip.batches(0) for f in b.flipped)


def test_shuffle_caption_keeps_first_tokens(tmp_path):
    rng = random.Random(0)
    cap = "usu bear, red hat, smiling, forest, night, snow"
    outs = {process_caption(cap, True, 2, rng) for _ in range(50)}
    assert len(outs) > 1
    for o in outs:
        tags = o.split(", ")
        assert tags[:2] == ["usu bear", "red hat"]
        assert sorted(tags[2:]) == sorted(["smiling", "forest", "night", "snow"])
    assert process_caption(" a ,b,c ", False, 1, rng) == " a ,b,c "  # unchanged without shuffle
    assert all(process_caption(cap, True, 0, rng).split(", ")[0] for _ in range(3))
    shuffled_first = {process_caption(cap, True, 0, random.Random(i)).split(", ")[0] for i in range(30)}
    assert len(shuffled_first) > 1

    ds = make(tmp_path, shuffle_caption=True, keep_tokens=1)
    caps = [c for b in ds.batches(0) for c in b.captions]
    assert all(c.startswith("usu bear, ") for c in caps)
    assert any(c.split(", ")[1][-1] != "a" for c in caps)  # the rest really shuffled
