"""What a run will do, said before it starts, in kohya's words (train_network.py's "running training")."""

from __future__ import annotations

import logging
from pathlib import Path

from ..config import TrainConfig, resolution_of


def dataset_lines(cfg: TrainConfig, dataset) -> list[str]:
    """Per folder images x repeats, the reg images, and the size the images are trained at."""
    d, plan = cfg.dataset, dataset.plan
    lines = []
    folders = ((d.train_data_dir, plan.dataset_dirs, ""), (d.reg_data_dir, plan.reg_dataset_dirs, " (reg)"))
    for root, dirs, kind in folders:
        for name, info in dirs.items():
            n, repeats = info["img_count"], info["n_repeats"]
            lines.append(
                f"found directory {Path(root) / name} contains {n} image files{kind}: "
                f"{n} x {repeats} repeats = {n * repeats}"
            )
    lines.append(f"{plan.num_train_images} train images with repeating.")
    if plan.reg_dataset_dirs:
        used = sum(s.is_reg for s in plan.samples)
        lines.append(
            f"{plan.num_reg_images} reg images; {used} reg samples an epoch "
            "(kohya balances them to the train images)."
        )
    if plan.validation is not None:
        n = len(plan.validation.samples)
        source = (
            f"validation_data_dir {d.validation_data_dir}"
            if d.validation_data_dir
            else f"held out of the train images by validation_split = {d.validation_split}, not trained on"
        )
        lines.append(f"{n} validation images ({source}).")
    return lines


def step_lines(cfg: TrainConfig, plan, batches_per_epoch: int) -> list[str]:
    """The step math: samples an epoch -> batches -> optimizer steps -> total, as the run will do it."""
    from .optim import steps_and_epochs

    d, t = cfg.dataset, cfg.training
    per_epoch, total, epochs = steps_and_epochs(t, max(batches_per_epoch, 1))
    reg_used = sum(s.is_reg for s in plan.samples)
    lines = [f"steps: {plan.num_train_images} train samples an epoch (images x repeats)"]
    if reg_used:
        lines.append(
            f"  + {reg_used} reg samples (kohya balances the reg images to the train samples, "
            f"so they double the steps) = {plan.num_train_images + reg_used} samples"
        )
    lines.append(
        f"  / batch size {d.train_batch_size} = {batches_per_epoch} batches per epoch"
        + (" (batches are made inside each bucket)" if d.enable_bucket else "")
    )
    if t.gradient_accumulation_steps > 1:
        lines.append(
            f"  / gradient accumulation {t.gradient_accumulation_steps} = {per_epoch} steps per epoch"
        )
    if t.max_train_epochs:
        lines.append(f"  x {epochs} epochs (max_train_epochs) = {total} total steps")
    else:
        lines.append(
            f"  max_train_steps = {total} total steps, that is {epochs} epoch(s) of {per_epoch} steps"
        )
    return lines


def log_dataset_summary(cfg: TrainConfig, dataset, log: logging.Logger) -> None:
    from ..dataset.sanity import sanity_warnings

    for line in dataset_lines(cfg, dataset):
        log.info("%s", line)
    for line in step_lines(cfg, dataset.plan, dataset.num_batches_per_rank(1)):
        log.info("%s", line)
    for warning in sanity_warnings(dataset.plan, cfg.dataset.resolution, cfg.dataset.enable_bucket):
        log.warning("%s", warning)
    w, h = resolution_of(cfg.dataset.resolution)
    odd = not cfg.dataset.enable_bucket and (w % 64 or h % 64)
    for line in resolution_lines(cfg, dataset):
        (log.warning if odd else log.info)("%s", line)


def resolution_lines(cfg: TrainConfig, dataset) -> list[str]:
    """The sizes images are really trained at: `resolution` itself without buckets, else the buckets."""
    d = cfg.dataset
    w, h = resolution_of(d.resolution)
    if not d.enable_bucket:
        line = f"resolution {d.resolution} -> images are trained at {w}x{h}"
        if w % 64 or h % 64:
            line += " (not a multiple of 64, used as given; SD1.x models are trained at multiples of 64)"
        if w % 8 or h % 8:
            line += f"; the VAE's 8-pixel grid covers only {w - w % 8}x{h - h % 8} of it"
        return [line]
    lines = [
        f"resolution {d.resolution} -> buckets with sides multiple of {d.bucket_reso_steps} and an area "
        f"up to {w}x{h}; number of images (including repeats) per bucket:"
    ]
    for i, (reso, samples) in enumerate(zip(dataset.bucket_resos, dataset.buckets)):
        lines.append(f"  bucket {i}: resolution {reso[0]}x{reso[1]}, count: {len(samples)}")
    return lines


def training_lines(
    cfg: TrainConfig,
    plan,
    batches_per_epoch: int,
    epochs: int,
    total_steps: int,
    processes: int,
    start_step: int,
) -> list[str]:
    """kohya's summary of the run; `batches_per_epoch` is per process, like kohya's len(train_dataloader)."""
    d, t = cfg.dataset, cfg.training
    lines = [
        "running training",
        f"  num train images * repeats: {plan.num_train_images}",
        f"  num reg images: {plan.num_reg_images}",
        f"  num batches per epoch: {batches_per_epoch}",
        f"  num epochs: {epochs}",
        f"  batch size per device: {d.train_batch_size}",
        f"  gradient accumulation steps: {t.gradient_accumulation_steps}",
        f"  total batch size (with {processes} process(es) and accumulation): "
        f"{d.train_batch_size * processes * t.gradient_accumulation_steps}",
        f"  total optimization steps: {total_steps}",
    ]
    if start_step:
        lines.append(f"  resuming at step: {start_step}")
    return lines
