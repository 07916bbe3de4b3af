"""Epochs of batches from a DatasetPlan, built inside buckets like kohya's, but exactly resumable.

kohya reseeds Python's global `random` per epoch and draws augmentations from it in DataLoader
workers, so a resumed run sees different batches. Here the order of an epoch is a pure
function of (seed, epoch) and every random choice in a batch is a function of
(seed, epoch, batch index): batch i is the same whether or not batches 0..i-1 were produced.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import DatasetConfig
from ..errors import DatasetError
from .buckets import BucketManager, Placement
from .cache import CachedLatents, Encode, Progress, cache_latents
from .captions import process_caption
from .folders import DatasetPlan, Sample, scan_dataset
from .images import has_alpha, mask_tensor, to_tensor
from .masks import load_image_and_mask, mask_files


@dataclass
class Batch:
    pixels: torch.Tensor | None  # [B, 3, H, W] in [-1, 1]; None when latents are cached
    latents: torch.Tensor | None  # [B, 4, H/8, W/8] (flipped variant where flipped)
    captions: list[str]  # processed (shuffled) captions
    is_reg: torch.Tensor  # [B] bool
    loss_weights: torch.Tensor  # [B] float: prior_loss_weight for reg, 1.0 otherwise
    paths: list[Path]
    flipped: list[bool]
    bucket: tuple[int, int]  # (w, h)
    index: int  # batch index within the epoch (before the rank split)
    # [B, 6] SDXL's size conditioning, as kohya fills it: original (h, w) = the file's size, crop
    # (top, left) by kohya's rule (mirrored when flipped), target (h, w) = the bucket
    size_ids: torch.Tensor | None = None
    # [B, 1, H/8, W/8] in [0, 1] with alpha_mask or conditioning_data_dir: each image's alpha (or mask
    # image's red channel) resized, cropped and flipped as its pixels were, area-averaged to latent size
    # (ones for an image without one); None otherwise
    masks: torch.Tensor | None = None
    # the captions' token ids (one tensor per text encoder), made before the step so that the step's
    # copy of them to the GPU is a non-blocking one; None: the step encodes `captions` itself
    token_ids: tuple[torch.Tensor, ...] | None = None
    # the captions' cached text-encoder outputs (a models.families.base.Conditioning), set on the
    # device by the trainer before the step; None: the step encodes the captions
    conditioning: object | None = None

    def _tensor_fields(self) -> list[str]:
        return ["pixels", "latents", "is_reg", "loss_weights", "size_ids", "masks"]

    def pin_memory(self) -> Batch:
        """The batch in page-locked memory (torch's DataLoader calls this with pin_memory=True): its copy
        to the GPU can then be non-blocking."""
        moved = {k: _pinned(getattr(self, k)) for k in self._tensor_fields()}
        ids = None if self.token_ids is None else tuple(_pinned(t) for t in self.token_ids)
        return dataclasses.replace(self, **moved, token_ids=ids)

    def to(self, device: torch.device | str) -> Batch:
        """The batch's tensors on `device`, copied without blocking the host (a real overlap when the
        source is pinned; a no-op for tensors already there)."""
        moved = {k: _moved(getattr(self, k), device) for k in self._tensor_fields()}
        ids = None if self.token_ids is None else tuple(_moved(t, device) for t in self.token_ids)
        return dataclasses.replace(self, **moved, token_ids=ids)


def _pinned(t: torch.Tensor | None) -> torch.Tensor | None:
    return t if t is None or t.device.type != "cpu" or t.is_pinned() else t.pin_memory()


def _moved(t: torch.Tensor | None, device) -> torch.Tensor | None:
    return None if t is None else t.to(device, non_blocking=True)


def size_numbers(image_size: tuple[int, int], bucket: tuple[int, int], flipped: bool) -> list[float]:
    """(original h, w, crop top, left, target h, w) for one image (kohya's sdxl size conditioning)."""
    from ..models.families.sdxl_conditioning import crop_top_left

    top, left = crop_top_left(bucket, image_size, flipped)
    return [
        float(image_size[1]),
        float(image_size[0]),
        float(top),
        float(left),
        float(bucket[1]),
        float(bucket[0]),
    ]


BatchKey = tuple[int, int, tuple[int, ...]]  # (epoch, batch index in the epoch, sample ids)


def stable_seed(*parts: int) -> int:
    """A 64-bit seed from integers, the same in every process (unlike hash())."""
    digest = hashlib.sha256(repr(tuple(int(p) for p in parts)).encode()).digest()
    return int.from_bytes(digest[:8], "little")


class DreamBoothDataset:
    def __init__(
        self, plan: DatasetPlan, cfg: DatasetConfig, seed: int, masks: dict[Path, Path] | None = None
    ) -> None:
        """`masks`: {image: mask image} from conditioning_data_dir (dataset.masks.mask_files); an image
        not in it trains whole. None: no mask images (alpha_mask may still give masks)."""
        if not plan.samples:
            raise DatasetError("the dataset has no samples: add images to the train_data_dir folders")
        self.plan = plan
        self.cfg = cfg
        self.seed = int(seed)
        self.mask_files = masks
        self.batch_size = max(1, int(cfg.train_batch_size))
        manager = BucketManager.from_config(cfg)

        # One placement per unique image; repeats share it.
        self.placements: dict[Path, Placement] = {}
        for s in plan.samples:
            if s.image not in self.placements:
                try:
                    self.placements[s.image] = manager.select(*s.size)
                except DatasetError as e:
                    raise DatasetError(f"{s.image}: {e}") from None

        # Buckets sorted by resolution (kohya sorts them); samples kept in plan order inside.
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, s in enumerate(plan.samples):
            by_bucket.setdefault(self.placements[s.image].bucket, []).append(i)
        self.bucket_resos = sorted(by_bucket)
        self.buckets = [by_bucket[r] for r in self.bucket_resos]
        self._latents: dict[Path, CachedLatents] | None = None
        self.validation: DreamBoothDataset | None = None  # set by build_dataset

    # --- sizes ------------------------------------------------------------
    @property
    def num_batches_per_epoch(self) -> int:
        """kohya: batches are made inside a bucket, so Σ ceil(len(bucket) / batch size)."""
        return sum(math.ceil(len(b) / self.batch_size) for b in self.buckets)

    def num_batches_per_rank(self, world_size: int = 1) -> int:
        return self.num_batches_per_epoch // world_size

    def bucket_info(self) -> dict | None:
        """kohya's ss_bucket_info (only with enable_bucket): counts include repeats."""
        if not self.cfg.enable_bucket:
            return None
        errors = [abs(p.ar_error) for p in self.placements.values()]
        return {
            "buckets": {
                i: {"resolution": reso, "count": len(b)}
                for i, (reso, b) in enumerate(zip(self.bucket_resos, self.buckets))
            },
            "mean_img_ar_error": sum(errors) / len(errors),
        }

    def all_captions(self) -> list[str]:
        """Unique raw captions in sample order (for caching text-encoder outputs)."""
        return list(dict.fromkeys(s.caption for s in self.plan.samples))

    def image_captions(self) -> list[tuple[Path, str]]:
        """Unique (image, raw caption) pairs in sample order (for caching text-encoder outputs per image)."""
        return list(dict.fromkeys((s.image, s.caption) for s in self.plan.samples))

    # --- latents ----------------------------------------------------------
    def cache_latents(
        self,
        encode: Encode,
        vae_fingerprint: str,
        to_disk: bool,
        batch_size: int = 1,
        progress: Progress | None = None,
    ) -> None:
        self._latents = cache_latents(
            self.placements.items(),
            encode,
            vae_fingerprint,
            to_disk,
            batch_size=batch_size,
            flip_aug=self.cfg.flip_aug,
            progress=progress,
            alpha_mask=self.cfg.alpha_mask,
            mask_files=self.mask_files,
        )

    def cached_tensors(self) -> list[torch.Tensor]:
        """Every cached latent (and flipped latent, and mask) tensor; none before cache_latents."""
        out = []
        for c in (self._latents or {}).values():
            out += [t for t in (c.latents, c.latents_flipped, c.mask) if t is not None]
        return out

    def move_cached_latents(self, move: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Apply `move` to every cached tensor: onto the GPU (batches are then stacked there, with no
        copy in the step), or into pinned memory (copied to it without blocking)."""
        for c in (self._latents or {}).values():
            c.latents = move(c.latents)
            c.latents_flipped = None if c.latents_flipped is None else move(c.latents_flipped)
            c.mask = None if c.mask is None else move(c.mask)

    @property
    def has_masks(self) -> bool:
        """Whether batches carry loss masks (alpha_mask or conditioning_data_dir)."""
        return self.cfg.alpha_mask or self.mask_files is not None

    # --- epochs -----------------------------------------------------------
    def epoch_order(self, epoch: int) -> list[list[int]]:
        """The epoch's batches as lists of sample indices; a pure function of (seed, epoch)."""
        rng = random.Random(stable_seed(self.seed, epoch))
        batches: list[list[int]] = []
        for bucket in self.buckets:
            items = list(bucket)
            rng.shuffle(items)
            batches += [items[i : i + self.batch_size] for i in range(0, len(items), self.batch_size)]
        rng.shuffle(batches)
        return batches

    def batches(self, epoch: int, rank: int = 0, world_size: int = 1, skip: int = 0) -> Iterator[Batch]:
        """This rank's batches of `epoch`, after skipping its first `skip` (for exact resume).

        Rank r takes batch indices i with i % world_size == r, the epoch truncated to a
        multiple of world_size so all ranks step the same number of times.
        """
        for key in self.batch_keys(epoch, rank, world_size, skip):
            yield self.make_batch(*key)

    def batch_keys(self, epoch: int, rank: int = 0, world_size: int = 1, skip: int = 0) -> list[BatchKey]:
        """(epoch, batch index, sample ids) of this rank's batches, as `batches` makes them: what a
        DataLoader's sampler hands its workers (each key fixes its batch, whichever process makes it)."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in 0..{world_size - 1}")
        order = self.epoch_order(epoch)
        usable = len(order) - len(order) % world_size
        return [(epoch, i, tuple(order[i])) for i in list(range(rank, usable, world_size))[skip:]]

    def fixed_batches(self) -> Iterator[Batch]:
        """Every sample once, buckets in order and samples in plan order: the validation batches, the
        same on every call (build the dataset with shuffle_caption and flip_aug off)."""
        index = 0
        for bucket in self.buckets:
            for i in range(0, len(bucket), self.batch_size):
                yield self.make_batch(0, index, bucket[i : i + self.batch_size])
                index += 1

    def make_batch(self, epoch: int, index: int, sample_ids: Sequence[int]) -> Batch:
        rng = random.Random(stable_seed(self.seed, epoch, index, 1))
        samples: list[Sample] = [self.plan.samples[j] for j in sample_ids]
        flips, captions = [], []
        for s in samples:
            # Draw in a fixed order per sample so the stream does not depend on the options used.
            flip = rng.random() < 0.5
            flips.append(flip and self.cfg.flip_aug)
            captions.append(process_caption(s.caption, self.cfg.shuffle_caption, self.cfg.keep_tokens, rng))
        bucket = self.placements[samples[0].image].bucket
        pixels = latents = masks = None
        with_mask = self.has_masks
        if self._latents is not None:
            latents = torch.stack([self._pick_latents(s.image, f) for s, f in zip(samples, flips)])
            if with_mask:
                masks = torch.stack([self._pick_mask(s.image, f) for s, f in zip(samples, flips)])
        else:
            tensors, mask_list = [], []
            files = self.mask_files or {}
            for s, f in zip(samples, flips):
                p = self.placements[s.image]
                rgb, mask = load_image_and_mask(s.image, self.cfg.alpha_mask, files.get(s.image))
                if with_mask:
                    mask_list.append(mask_tensor(mask, p.bucket, p.resized, p.crop_ltrb, f))
                tensors.append(to_tensor(rgb, p.bucket, p.resized, p.crop_ltrb, f))
            pixels = torch.stack(tensors)
            masks = torch.stack(mask_list) if with_mask else None
        is_reg = torch.tensor([s.is_reg for s in samples], dtype=torch.bool)
        weights = torch.tensor(
            [self.cfg.prior_loss_weight if s.is_reg else 1.0 for s in samples], dtype=torch.float32
        )
        size_ids = torch.tensor([size_numbers(s.size, bucket, f) for s, f in zip(samples, flips)])
        return Batch(
            pixels,
            latents,
            captions,
            is_reg,
            weights,
            [s.image for s in samples],
            flips,
            bucket,
            index,
            size_ids,
            masks,
        )

    def _pick_latents(self, image: Path, flipped: bool) -> torch.Tensor:
        assert self._latents is not None
        cached = self._latents[image]
        if flipped:
            if cached.latents_flipped is None:
                raise RuntimeError("flip_aug is on but the latents were cached without flipped copies")
            return cached.latents_flipped
        return cached.latents

    def _pick_mask(self, image: Path, flipped: bool) -> torch.Tensor:
        assert self._latents is not None
        mask = self._latents[image].mask
        if mask is None:
            raise RuntimeError("masks are on but the latents were cached without masks")
        # the area average over 8x8 blocks commutes with the flip: the flipped mask is the mask flipped
        return torch.flip(mask, dims=[2]) if flipped else mask


def images_without_alpha(plan: DatasetPlan) -> list[Path]:
    """The train/validation images that have no alpha channel (alpha_mask gives them a mask of ones)."""
    images = [s.image for s in plan.samples]
    if plan.validation is not None:
        images += [s.image for s in plan.validation.samples]
    return [p for p in dict.fromkeys(images) if not has_alpha(p)]


def build_dataset(
    cfg: DatasetConfig, seed: int, warn: Callable[[str], None] | None = None
) -> DreamBoothDataset:
    """scan_dataset + DreamBoothDataset from the config, passing each warning to `warn`. With
    validation_split or validation_data_dir the held-out images are `dataset.validation`."""
    plan = scan_dataset(
        cfg.train_data_dir,
        cfg.reg_data_dir,
        cfg.caption_extension,
        cfg.bad_images,
        validation_split=cfg.validation_split,
        validation_seed=seed if cfg.validation_seed is None else cfg.validation_seed,
        validation_data_dir=cfg.validation_data_dir,
    )
    if warn is not None:
        for w in plan.warnings:
            warn(w)
    if cfg.alpha_mask and warn is not None:
        missing = images_without_alpha(plan)
        if missing:
            shown = ", ".join(str(p) for p in missing[:3]) + (" ..." if len(missing) > 3 else "")
            warn(
                f"alpha_mask: {len(missing)} image(s) have no alpha channel and are trained on whole "
                f"(a mask of ones): {shown}"
            )
    masks = None
    if cfg.conditioning_data_dir:  # every train image's mask found and checked before any model loads
        masks = mask_files(plan, cfg.train_data_dir, cfg.conditioning_data_dir)
        if warn is not None and (cfg.reg_data_dir or cfg.validation_data_dir):
            warn(
                "conditioning_data_dir: regularization and validation_data_dir images have no mask "
                "and count whole"
            )
    dataset = DreamBoothDataset(plan, cfg, seed, masks)
    if plan.validation is not None:
        dataset.validation = validation_dataset(plan.validation, cfg, seed, masks)
    return dataset


def validation_dataset(
    plan: DatasetPlan, cfg: DatasetConfig, seed: int, masks: dict[Path, Path] | None = None
) -> DreamBoothDataset:
    """The validation images in the train buckets and captions, with no random caption shuffle or flip."""
    return DreamBoothDataset(
        plan, dataclasses.replace(cfg, shuffle_caption=False, flip_aug=False), seed, masks
    )


# --- a DataLoader over the batches ----------------------------------------------------------


def data_loader_workers(requested: int, cpu_count: int | None = None) -> int:
    """kohya's rule: max_data_loader_n_workers capped to the CPU count (0: the training process)."""
    import os

    return max(0, min(int(requested), cpu_count if cpu_count is not None else (os.cpu_count() or 1)))


class BatchMaker(torch.utils.data.Dataset):
    """A map-style dataset whose items are whole batches, keyed by `BatchKey`. Picklable (the
    dataset's plan, config and placements; never cached latents): Windows' spawned workers get a copy."""

    def __init__(self, dataset: DreamBoothDataset) -> None:
        if dataset._latents is not None:
            raise ValueError("cached latents are read in the training process, not by DataLoader workers")
        self.dataset = dataset

    def __getitem__(self, key: BatchKey) -> Batch:
        return self.dataset.make_batch(*key)

    def __len__(self) -> int:
        return self.dataset.num_batches_per_epoch


class EpochKeys(torch.utils.data.Sampler):
    """The keys of the epoch under way, set before each pass; iterated in the main process, so a
    persistent worker needs no word of the epoch."""

    def __init__(self) -> None:
        self.keys: list[BatchKey] = []

    def __iter__(self):
        return iter(list(self.keys))

    def __len__(self) -> int:
        return len(self.keys)


class BatchLoader:
    """Batches made by `workers` processes (PIL decoding off the training process), in the order
    `DreamBoothDataset.batches` gives them and with the same contents; pinned for a GPU."""

    def __init__(
        self,
        dataset: DreamBoothDataset,
        workers: int,
        persistent: bool = False,
        pin_memory: bool = False,
        context: str | None = None,
    ) -> None:
        """`context`: the multiprocessing start method (None: the platform's; Windows and macOS spawn)."""
        self.dataset = dataset
        self.keys = EpochKeys()
        self.loader = torch.utils.data.DataLoader(
            BatchMaker(dataset),
            sampler=self.keys,
            batch_size=None,  # items are batches already
            num_workers=workers,
            persistent_workers=persistent and workers > 0,
            pin_memory=pin_memory,
            multiprocessing_context=context if workers > 0 else None,
            # its own generator: a DataLoader otherwise draws its workers' base seed from the global
            # one, which would shift the LoRA's dropout draws against a run without workers
            generator=torch.Generator().manual_seed(dataset.seed),
        )

    def batches(self, epoch: int, rank: int = 0, world_size: int = 1, skip: int = 0) -> Iterator[Batch]:
        self.keys.keys = self.dataset.batch_keys(epoch, rank, world_size, skip)
        yield from self.loader
