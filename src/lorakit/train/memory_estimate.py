"""An estimate of a LoRA run's peak GPU memory from its settings, before anything is loaded.

Pure arithmetic (no torch): parameter counts of the real SD1.5 / SDXL architectures (counted on the
meta device from lorakit's configs) give the weights in the chosen precision and the LoRA's
parameters, gradients and optimizer states; an activation term per image, scaled by its pixels,
is fitted to peaks measured on an H200 (torch.cuda.max_memory_allocated, benchmarks/sdxl_memory.py,
docs/benchmarks.md), all rank 32, bf16, cache_latents:

    SDXL 1024², U-Net + both TEs, AdamW, no checkpointing           16.66 GiB  (device 17.70 used)
    SDXL 1024², checkpointing + cached TE outputs + U-Net only + AdamW8bit   6.27 train / 6.90 setup
                                                                             (device 7.54 used)
    ... the same at batch 4                                          8.45 GiB  (device 10.52 used)
    SD1.5 512², U-Net only, AdamW, batch 1                           3.54 GiB
    SD1.5 512², U-Net + TE, AdamW, batch 1                           3.65 GiB
    SD1.5 512², U-Net only, AdamW, batch 4                           7.36 GiB

Not measured, so rougher: SD1 with gradient checkpointing (SDXL's checkpointed/plain activation ratio
is used), fp32 (mixed_precision = "no": weights and activations twice as large), without
cache_latents (the VAE's weights, and its encoder's activations when they exceed the U-Net's),
optimizers other than AdamW/AdamW8bit (bytes of state per parameter: Adafactor without a first
moment ~0.5, Lion 4, Prodigy 16), conv_dim (its LoRA parameters only, not the convs' activations),
vae_batch_size > 1 (the VAE encoder's activations times the batch). The VAE's weights count in
float32 where the trainer keeps it there (fp16 precision with the base's own VAE, no_half_vae).
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 2**30

# Parameter counts (lorakit.models.loader.sd15_arch / models.families.sdxl.sdxl_arch on the meta device)
ARCH = {
    "sd1": {
        "unet": 859_520_964,
        "text_encoders": 123_060_480,
        "vae": 83_653_863,
        # LoRA parameters per unit of rank: Σ(in + out) over kohya's targets (network.targets)
        "lora_unet_per_rank": 423_936,
        "lora_te_per_rank": 165_888,
        # what conv_dim adds (ResNet/sampler convs; counted with conv_dim = network_dim)
        "lora_conv_per_rank": 626_880,
    },
    "sdxl": {
        "unet": 2_567_463_684,
        "text_encoders": 123_060_480 + 694_659_840,
        "vae": 83_653_863,
        "lora_unet_per_rank": 2_659_840,
        "lora_te_per_rank": 165_888 + 737_280,
        "lora_conv_per_rank": 414_400,
    },
}

# Activations of one image at the family's reference size, in GiB (bf16/fp16), fitted to the
# measurements above: the U-Net's forward + backward without / with gradient checkpointing, a
# batch-independent part (cuBLAS workspace, the loss, temporaries), a trained text encoder's share,
# and the VAE encoder's peak per image (latent caching encodes vae_batch_size images at a time).
ACTIVATIONS = {
    "sd1": {"reference_pixels": 512 * 512, "plain": 1.273, "checkpointed": 0.107, "fixed": 0.235},
    "sdxl": {"reference_pixels": 1024 * 1024, "plain": 8.66, "checkpointed": 0.727, "fixed": 0.0},
}
TE_ACTIVATIONS_GIB = 0.03  # per trained text encoder and image (77 tokens: small)
VAE_ENCODE_GIB_PER_MEGAPIXEL = 0.42  # the SDXL setup peak: 6.90 GiB = all weights + this at 1024²

# Bytes per LoRA parameter: fp32 weight + fp32 gradient + optimizer state
OPTIMIZER_STATE_BYTES = {
    "adamw": 8,
    "adamw8bit": 2,
    "pagedadamw8bit": 2,
    "adafactor": 0.5,
    "lion": 4,
    "lion8bit": 1,
    "prodigy": 16,
    "sgdnesterov": 4,
}
DEFAULT_STATE_BYTES = 8

# The device's used memory (nvidia-smi) over the allocator's peak: the CUDA context and the caching
# allocator's reserve (measured: 17.70 / 16.66, 7.54 / 6.90, 10.52 / 8.45 GiB)
CONTEXT_GIB = 0.5
RESERVE_FACTOR = 1.1


@dataclass(frozen=True)
class MemoryEstimate:
    weights_gib: float  # base weights on the GPU while training
    lora_gib: float  # LoRA parameters + gradients + optimizer states
    activations_gib: float  # the batch's activations (and the fixed per-step part)
    setup_gib: float  # model load + latent/text-encoder caching, before the first step
    train_gib: float  # peak while training (weights + LoRA + activations)
    lora_params: int

    @property
    def peak_gib(self) -> float:
        """Peak allocated by torch over the whole run."""
        return max(self.setup_gib, self.train_gib)

    @property
    def device_gib(self) -> float:
        """What the device shows as used at the peak (nvidia-smi): the peak with the allocator's
        reserve and the CUDA context. Compare this one with a card's size."""
        return self.peak_gib * RESERVE_FACTOR + CONTEXT_GIB


def estimate_memory(
    family: str,
    width: int,
    height: int,
    batch_size: int = 1,
    rank: int = 32,
    train_unet: bool = True,
    train_text_encoder: bool = False,
    gradient_checkpointing: bool = False,
    cache_text_encoder_outputs: bool = False,
    cache_latents: bool = True,
    optimizer: str = "AdamW",
    mixed_precision: str = "bf16",
    conv_dim: int | None = None,
    vae_batch_size: int = 1,
    vae_fp32: bool | None = None,
) -> MemoryEstimate:
    """Peak GPU memory of a LoRA run with these settings, in GiB (see the module's docstring).
    `vae_fp32`: whether the VAE runs in float32; None: the trainer's rule for the base's own VAE
    (float32 under fp16, where SD's VAE overflows)."""
    if family not in ARCH:
        raise ValueError(f"no memory model for family {family!r}: use one of {', '.join(ARCH)}")
    arch, act = ARCH[family], ACTIVATIONS[family]
    half = mixed_precision in ("fp16", "bf16")
    weight_bytes = 2 if half else 4
    if vae_fp32 is None:
        vae_fp32 = mixed_precision == "fp16"
    vae_bytes = 4 if vae_fp32 or not half else 2
    act_scale = 1.0 if half else 2.0

    # frozen text encoders stay on the GPU unless their outputs are cached; a trained one always does
    te_on_gpu = train_text_encoder or not cache_text_encoder_outputs
    weights = arch["unet"] + (arch["text_encoders"] if te_on_gpu else 0)
    weights_gib = (weights * weight_bytes + (0 if cache_latents else arch["vae"] * vae_bytes)) / GIB

    lora_params = 0
    if train_unet:
        lora_params += arch["lora_unet_per_rank"] * rank
        if conv_dim:
            lora_params += arch["lora_conv_per_rank"] * conv_dim
    if train_text_encoder:
        lora_params += arch["lora_te_per_rank"] * rank
    state = OPTIMIZER_STATE_BYTES.get(optimizer.lower(), DEFAULT_STATE_BYTES)
    lora_gib = lora_params * (8 + state) / GIB

    pixels = width * height
    per_image = act["checkpointed" if gradient_checkpointing else "plain"] * pixels / act["reference_pixels"]
    if train_text_encoder:
        per_image += TE_ACTIVATIONS_GIB * (2 if family == "sdxl" else 1)
    vae_encode = VAE_ENCODE_GIB_PER_MEGAPIXEL * pixels / 2**20
    unet_step = per_image * batch_size + act["fixed"]
    if not cache_latents:  # the VAE encodes the batch each step, before the U-Net's forward
        unet_step = max(unet_step, vae_encode * batch_size)
    activations_gib = unet_step * act_scale

    # setup: the models arrive on the GPU together, then latents are encoded vae_batch_size at a time
    all_weights = ((arch["unet"] + arch["text_encoders"]) * weight_bytes + arch["vae"] * vae_bytes) / GIB
    setup_gib = all_weights + (vae_encode * act_scale * vae_batch_size if cache_latents else 0.0)
    return MemoryEstimate(
        weights_gib=weights_gib,
        lora_gib=lora_gib,
        activations_gib=activations_gib,
        setup_gib=setup_gib,
        train_gib=weights_gib + lora_gib + activations_gib,
        lora_params=lora_params,
    )


def estimate_for_config(cfg, family: str) -> MemoryEstimate:
    """estimate_memory for a TrainConfig (validated: the caches and parts it trains are settled)."""
    from ..config import resolution_of

    width, height = resolution_of(cfg.dataset.resolution)
    return estimate_memory(
        family,
        width,
        height,
        batch_size=cfg.dataset.train_batch_size,
        rank=cfg.network.network_dim,
        train_unet=cfg.trains_unet,
        train_text_encoder=cfg.trains_text_encoder,
        gradient_checkpointing=cfg.training.gradient_checkpointing,
        cache_text_encoder_outputs=cfg.dataset.cache_text_encoder_outputs
        or cfg.dataset.cache_text_encoder_outputs_to_disk,
        cache_latents=cfg.dataset.cache_latents or cfg.dataset.cache_latents_to_disk,
        optimizer=cfg.training.optimizer_type,
        mixed_precision=cfg.training.mixed_precision,
        conv_dim=cfg.network.conv_dim,
        vae_batch_size=cfg.dataset.vae_batch_size,
        vae_fp32=cfg.model.no_half_vae or (cfg.training.mixed_precision == "fp16" and not cfg.model.vae),
    )


def describe(est: MemoryEstimate, card_gib: float | None = None) -> str:
    """One line: 'about N GB of GPU memory (estimate; ...)' and a warning when it exceeds the card."""
    text = (
        f"about {est.device_gib:.1f} GB of GPU memory ({est.peak_gib:.1f} GB allocated at the peak: "
        f"weights {est.weights_gib:.1f}, LoRA + optimizer {est.lora_gib:.2f}, activations "
        f"{est.activations_gib:.1f}); an estimate fitted to runs measured on an H200"
    )
    if card_gib and est.device_gib > card_gib:
        text += (
            f". More than the {card_gib:g} GB card: turn on gradient_checkpointing, "
            "cache_text_encoder_outputs (with network_train_unet_only), AdamW8bit, or lower the batch size"
        )
    return text


FULL_SIZE_BYTES = 1_000_000_000  # smaller bases (the demo, test models) are far from the fitted models


def preflight_line(cfg, family_key: str | None, model_path, gpu_gib: float | None) -> tuple[str, bool] | None:
    """(the log line, whether it is a warning) for `lorakit train`, or None when there is nothing
    to estimate: a family other than SD1.x/SDXL, or a base far smaller than the full-size ones."""
    from pathlib import Path

    family = {"sd1": "sd1", "sd2": "sd1", "sdxl": "sdxl"}.get(family_key or "")
    path = Path(model_path)
    if family is None or (path.is_file() and path.stat().st_size < FULL_SIZE_BYTES):
        return None
    est = estimate_for_config(cfg, family)
    line = "GPU memory estimate: " + describe(est, gpu_gib)
    if cfg.training.cuda_graph:  # not fitted: each recorded shape's activations stay reserved
        line += (
            f"; with cuda_graph, each recorded batch shape also keeps about {est.activations_gib:.1f} GB "
            "of activations reserved (not measured yet)"
        )
    return (line + (f" (this GPU has {gpu_gib:.0f} GB)" if gpu_gib else "")), bool(
        gpu_gib and est.device_gib > gpu_gib
    )
