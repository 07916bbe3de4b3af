"""kohya's `ss_*` training metadata and the `modelspec.*` keys of a LoRA, as strings (like kohya's).

It lives in train/ because it is built from the training config; network/ only writes the file."""

from __future__ import annotations

import datetime
import json
import time
import uuid
from pathlib import Path
from typing import Any

from .. import __version__
from ..config import TrainConfig, resolution_of
from ..hashing import cached_file_sha256, legacy_hash

# What kohya keeps with --no_metadata (SS_METADATA_MINIMUM_KEYS).
MINIMUM_KEYS = (
    "ss_v2",
    "ss_base_model_version",
    "ss_network_module",
    "ss_network_dim",
    "ss_network_alpha",
    "ss_network_args",
)


def file_hashes(path: str | Path) -> tuple[str, str]:
    """(old A1111 hash, full-file sha256) of the base model, as kohya stores them."""
    path = Path(path)
    if not path.is_file():
        return "IsADirectory", ""  # what kohya writes for diffusers folders
    return legacy_hash(path), cached_file_sha256(path)


def _s(v: Any) -> str:
    if isinstance(v, dict | list):
        return json.dumps(v)
    return str(v)


def training_metadata(
    cfg: TrainConfig,
    *,
    session_id: str,
    started_at: float,
    num_train_images: int,
    num_reg_images: int,
    num_batches_per_epoch: int,
    num_epochs: int,
    max_train_steps: int,
    dataset_dirs: dict,
    reg_dataset_dirs: dict,
    tag_frequency: dict,
    bucket_info: dict | None,
    optimizer_repr: str,
    model_hashes: tuple[str, str],
    world_size: int = 1,
    family=None,
    vae_hashes: tuple[str, str] | None = None,
    num_validation_images: int = 0,
    validation_seed: int | None = None,
) -> dict[str, str]:
    """Everything that stays the same through a run; `finish_metadata` adds step/epoch on each save.
    `family`: the base's family module (lorakit.models.families; default SD1.x)."""
    from ..models.families.base import family_spec

    family = family or family_spec("sd1")
    m, d, n, t, o = cfg.model, cfg.dataset, cfg.network, cfg.training, cfg.output
    network_args = lycoris_network_args(n) if n.network_module == "lycoris.kohya" else {}
    if n.network_module == "networks.lora" and n.conv_dim:
        network_args = {
            "conv_dim": str(n.conv_dim),
            "conv_alpha": str(1.0 if n.conv_alpha is None else n.conv_alpha),
        }
    base_model = Path(m.pretrained_model_name_or_path)
    w, h = resolution_of(d.resolution)
    meta: dict[str, Any] = {
        "ss_session_id": session_id,
        "ss_training_started_at": started_at,
        "ss_output_name": o.output_name,
        "ss_learning_rate": t.learning_rate,
        "ss_text_encoder_lr": (
            [t.text_encoder_lr, t.text_encoder_lr2] if t.text_encoder_lr2 is not None else t.text_encoder_lr
        ),
        "ss_unet_lr": t.unet_lr,
        "ss_num_train_images": num_train_images,
        "ss_num_validation_images": num_validation_images,
        "ss_num_reg_images": num_reg_images,
        "ss_validation_seed": validation_seed,
        "ss_validation_split": d.validation_split,
        "ss_max_validation_steps": t.max_validation_steps,
        "ss_validate_every_n_steps": t.validate_every_n_steps,
        "ss_validate_every_n_epochs": t.validate_every_n_epochs,
        "ss_num_batches_per_epoch": num_batches_per_epoch,
        "ss_num_epochs": num_epochs,
        "ss_gradient_checkpointing": t.gradient_checkpointing,
        "ss_gradient_accumulation_steps": t.gradient_accumulation_steps,
        "ss_max_train_steps": max_train_steps,
        "ss_lr_warmup_steps": t.lr_warmup_steps,
        "ss_lr_scheduler": t.lr_scheduler,
        "ss_network_module": n.network_module,
        "ss_network_dim": n.network_dim,
        "ss_network_alpha": n.network_alpha,
        "ss_network_dropout": None,
        "ss_mixed_precision": t.mixed_precision,
        "ss_full_fp16": False,
        "ss_v2": False,
        "ss_base_model_version": family.version_string(m.v_parameterization),
        "ss_clip_skip": m.clip_skip,
        "ss_max_token_length": m.max_token_length,
        "ss_cache_latents": d.cache_latents,
        "ss_seed": t.seed,
        "ss_lowram": False,
        "ss_noise_offset": t.noise_offset,
        "ss_zero_terminal_snr": m.zero_terminal_snr,
        "ss_min_snr_gamma": t.min_snr_gamma,
        "ss_masked_loss": t.masked_loss,
        "ss_training_comment": o.training_comment,
        "ss_sd_scripts_commit_hash": f"lorakit-{__version__}",
        "ss_optimizer": optimizer_repr,
        "ss_max_grad_norm": t.max_grad_norm,
        "ss_prior_loss_weight": d.prior_loss_weight,
        "ss_batch_size_per_device": d.train_batch_size,
        "ss_total_batch_size": d.train_batch_size * world_size * t.gradient_accumulation_steps,
        "ss_resolution": f"({w}, {h})",
        "ss_color_aug": False,
        "ss_flip_aug": d.flip_aug,
        "ss_random_crop": False,
        "ss_shuffle_caption": d.shuffle_caption,
        "ss_keep_tokens": d.keep_tokens,
        "ss_enable_bucket": d.enable_bucket,
        "ss_bucket_no_upscale": d.bucket_no_upscale,
        "ss_min_bucket_reso": d.min_bucket_reso,
        "ss_max_bucket_reso": d.max_bucket_reso,
        "ss_dataset_dirs": dataset_dirs,
        "ss_reg_dataset_dirs": reg_dataset_dirs,
        "ss_tag_frequency": tag_frequency,
        "ss_sd_model_name": base_model.name,
        "ss_sd_model_hash": model_hashes[0],
        "ss_new_sd_model_hash": model_hashes[1],
    }
    if m.vae:  # kohya: a VAE given apart is named and hashed like the base model
        meta["ss_vae_name"] = Path(m.vae).name
        if vae_hashes is not None:
            meta["ss_vae_hash"], meta["ss_new_vae_hash"] = vae_hashes
    if bucket_info is not None:
        meta["ss_bucket_info"] = bucket_info
    if network_args:
        meta["ss_network_args"] = network_args
    meta = {k: _s(v) for k, v in meta.items()}
    meta.update(modelspec(cfg, started_at, family))
    if o.no_metadata:
        meta = {k: v for k, v in meta.items() if k in MINIMUM_KEYS or k.startswith("modelspec.")}
    return meta


def lycoris_network_args(n) -> dict[str, str]:
    """ss_network_args of a lycoris.kohya run as kohya writes them (the --network_args strings), with the
    values this run used: {"algo": "lokr", "factor": "-1", "conv_dim": "8", "conv_alpha": "4", ...}."""

    def text(value) -> str:
        return f"{value:g}" if isinstance(value, float) else str(value)

    args = {"algo": n.algo, "preset": n.lycoris_preset}
    if n.lycoris_preset == "full":  # LyCORIS: conv_dim/conv_alpha default to network_dim/network_alpha
        args["conv_dim"] = text(n.conv_dim or n.network_dim)
        args["conv_alpha"] = text(n.conv_alpha or n.network_alpha)
    if n.algo == "lokr":
        args["factor"] = text(n.factor)
        args["decompose_both"] = text(n.decompose_both)
    if n.use_tucker:
        args["use_tucker"] = "True"
    if n.dora_wd:
        args["dora_wd"] = "True"
        args["wd_on_output"] = text(n.wd_on_output)
    for name in ("rank_dropout", "module_dropout"):
        if getattr(n, name):
            args[name] = text(getattr(n, name))
    return args


def kohya_epoch(epochs_done: int, batch_in_epoch: int) -> int:
    """kohya's ss_epoch: the 1-based epoch a save falls in; a save at an epoch's end counts that epoch,
    a save mid-epoch (a run stopped by max_train_steps) the epoch it is in, never 0."""
    return epochs_done + (1 if batch_in_epoch else 0)


def finish_metadata(base: dict[str, str], *, steps: int, epoch: int, no_metadata: bool) -> dict[str, str]:
    """The per-save keys: steps done, kohya's epoch number (`kohya_epoch`), time of the save."""
    if no_metadata:
        return dict(base)
    return {
        **base,
        "ss_steps": str(steps),
        "ss_epoch": str(epoch),
        "ss_training_finished_at": str(time.time()),
    }


def modelspec(cfg: TrainConfig, started_at: float, family=None) -> dict[str, str]:
    """SAI model spec 1.0.1 keys, as kohya's sai_model_spec.build_metadata writes them for a LoRA
    (SD1: implementation diffusers; SDXL: Stability AI's generative-models)."""
    from ..models.families.base import family_spec

    family = family or family_spec("sd1")
    w, h = resolution_of(cfg.dataset.resolution)
    date = datetime.datetime.fromtimestamp(int(started_at)).isoformat()  # kohya drops the microseconds
    clip_skip = cfg.model.clip_skip
    spec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": f"{family.modelspec_architecture}/lora",
        "modelspec.implementation": family.modelspec_implementation,
        "modelspec.title": cfg.output.output_name,
        "modelspec.resolution": f"{w}x{h}",
        "modelspec.date": date,
        "modelspec.prediction_type": "v" if cfg.model.v_parameterization else "epsilon",
        "modelspec.implementation_version": f"lorakit/{__version__}",
    }
    if clip_skip is not None:
        spec["modelspec.encoder_layer"] = str(clip_skip)
    return spec


def new_session_id() -> str:
    return str(uuid.uuid4().int & ((1 << 31) - 1))  # kohya: random.randint(0, 2**32)
