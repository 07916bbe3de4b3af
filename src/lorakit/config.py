"""The one typed training config that the TOML file, the CLI and the GUI all fill.

Option names and defaults are kohya sd-scripts' (`train_network.py`) so that kohya users
recognise them. A TOML file may put keys at the top level or in any table (kohya's
`--config_file` flattens tables the same way); an unknown key is an error with a
did-you-mean.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomllib

from .errors import ConfigError

MAX_RANK = 1280  # SD1.x's widest LoRA target: a rank above min(in, out) of every layer adds nothing
MAX_SEED = 2**32 - 1  # numpy's seed range, which accelerate's set_seed feeds


def opt(default: Any, help: str, **kw: Any) -> Any:
    """A config field with its one-line help text."""
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help, **kw})
    return field(default=default, metadata={"help": help, **kw})


@dataclass
class ModelConfig:
    pretrained_model_name_or_path: str = opt(
        "", "base model: an SD1.x or SDXL .safetensors/.ckpt file (LDM/SGM layout) or a diffusers folder"
    )
    v_parameterization: bool = opt(
        False, "train with v-prediction (for v-models; default from a checkpoint's v_pred marker key)"
    )
    zero_terminal_snr: bool = opt(
        False,
        "rescale the noise schedule to zero terminal SNR (default from a checkpoint's ztsnr marker key)",
    )
    vae: str | None = opt(
        None,
        "a VAE to use instead of the base model's (e.g. SDXL's fp16-fix VAE): .safetensors or diffusers folder",
    )
    no_half_vae: bool = opt(False, "keep the VAE in float32 under fp16/bf16 mixed precision")
    clip_skip: int | None = opt(None, "use the output of the n-th last text-encoder layer (2 = skip one)")
    max_token_length: int | None = opt(None, "token length of captions: 75 (default), 150 or 225")


@dataclass
class DatasetConfig:
    train_data_dir: str = opt("", "folder whose subfolders are <repeats>_<prompt>, e.g. '20_usu bear'")
    reg_data_dir: str | None = opt(
        None, "regularization folder whose subfolders are <repeats>_<class>, e.g. '1_bear'"
    )
    caption_extension: str = opt(".caption", "extension of caption files beside images (.caption or .txt)")
    resolution: str = opt("512,512", "training resolution 'W,H' or a single number for square")
    enable_bucket: bool = opt(False, "aspect-ratio bucketing")
    min_bucket_reso: int = opt(256, "smallest bucket side")
    max_bucket_reso: int = opt(1024, "largest bucket side")
    bucket_reso_steps: int = opt(64, "bucket side step (a multiple of 64 for SD1, of 32 for SDXL)")
    bucket_no_upscale: bool = opt(False, "never upscale images into a bucket")
    shuffle_caption: bool = opt(False, "shuffle comma-separated caption tags each step")
    keep_tokens: int = opt(0, "keep the first N caption tags in place when shuffling")
    flip_aug: bool = opt(False, "random horizontal flip")
    alpha_mask: bool = opt(
        False,
        "use each PNG's alpha channel as its loss mask (with masked_loss); images without alpha get a "
        "mask of ones",
    )
    conditioning_data_dir: str | None = opt(
        None,
        "folder of loss-mask images for masked_loss, laid out like train_data_dir: "
        "<folder>/<repeats>_<prompt>/<image name>.png (or flat when it has no such subfolder); the red "
        "channel is the weight (white = train, black = ignore, grey = partial)",
    )
    train_batch_size: int = opt(1, "batch size per device")
    prior_loss_weight: float = opt(1.0, "loss weight of regularization images")
    cache_latents: bool = opt(False, "encode every image with the VAE once, before training")
    cache_latents_to_disk: bool = opt(
        False, "cache latents as .npz beside the images (implies cache_latents)"
    )
    vae_batch_size: int = opt(
        1,
        "images the VAE encodes at once when caching latents (same-bucket images only; 4-8 is faster "
        "on a GPU with memory to spare, the latents are the same)",
    )
    cache_text_encoder_outputs: bool = opt(
        False, "encode captions once (only when the text encoder is not trained)"
    )
    cache_text_encoder_outputs_to_disk: bool = opt(
        False,
        "cache text-encoder outputs as .npz beside the images, read by later runs (implies "
        "cache_text_encoder_outputs)",
    )
    validation_split: float = opt(
        0.0,
        "fraction (0 to below 1) of the train images held out for the validation loss, chosen by "
        "validation_seed; regularization images are never held out",
    )
    validation_data_dir: str | None = opt(
        None,
        "a folder of '<repeats>_<prompt>' subfolders whose images measure the validation loss "
        "(instead of validation_split; repeats are ignored)",
    )
    validation_seed: int | None = opt(
        None, "seed of the validation split and of the validation noise (default: the training seed)"
    )
    bad_images: Literal["stop", "skip"] = opt(
        "stop",
        "what to do with unreadable images found before training: stop with a list, or skip with a warning",
    )

    @property
    def te_cache_option(self) -> str:
        """The text-encoder cache option the user set (the disk one implies the other), for messages."""
        if self.cache_text_encoder_outputs_to_disk:
            return "cache_text_encoder_outputs_to_disk"
        return "cache_text_encoder_outputs"


NETWORK_MODULES = ("networks.lora", "lycoris.kohya")
LYCORIS_ALGOS = ("lora", "locon", "loha", "lokr")
LYCORIS_PRESETS = ("full", "attn-mlp")
# network_args key -> typed NetworkConfig field (kohya's and LyCORIS's spellings)
NETWORK_ARGS = {
    "conv_dim": "conv_dim",
    "conv_alpha": "conv_alpha",
    "algo": "algo",
    "preset": "lycoris_preset",
    "factor": "factor",
    "decompose_both": "decompose_both",
    "use_tucker": "use_tucker",
    "use_cp": "use_tucker",  # LyCORIS's old name
    "dora_wd": "dora_wd",
    "wd_on_output": "wd_on_output",
    "rank_dropout": "rank_dropout",
    "module_dropout": "module_dropout",
}
# LyCORIS applies `dropout` only in bypass_mode, which lorakit does not have: accepted only at 0
UNSUPPORTED_NETWORK_ARGS = ("dropout",)


@dataclass
class NetworkConfig:
    network_module: str = opt(
        "networks.lora",
        "network type (kohya module name): networks.lora (LoRA/LoCon) or lycoris.kohya (LyCORIS files: "
        "algo lora/locon, loha, lokr, DoRA with dora_wd)",
    )
    network_dim: int = opt(4, "LoRA rank (dim)")
    network_alpha: float = opt(1.0, "LoRA alpha; scale = alpha / dim")
    conv_dim: int | None = opt(
        None, "rank for ResNet 3x3 convs (LoCon); networks.lora: off when unset; lycoris.kohya: network_dim"
    )
    conv_alpha: float | None = opt(
        None, "alpha for the 3x3 convs (default: 1.0 for networks.lora, network_alpha for lycoris.kohya)"
    )
    network_args: list[str] = opt(
        [],
        "extra network arguments as key=value, as kohya/LyCORIS take them: conv_dim, conv_alpha, and for "
        "lycoris.kohya algo, preset, factor, decompose_both, use_tucker, dora_wd, wd_on_output, rank_dropout, "
        "module_dropout",
    )
    algo: Literal["lora", "locon", "loha", "lokr"] = opt(
        "lora", "lycoris.kohya: lora/locon (same thing), loha or lokr (network_args algo=)"
    )
    lycoris_preset: Literal["full", "attn-mlp"] = opt(
        "full",
        "lycoris.kohya's target preset (network_args preset=): full (LyCORIS's default: attention, ResNet "
        "and sampler convs, conv_in/conv_out, time embedding) or attn-mlp (kohya's LoRA targets)",
    )
    factor: int = opt(-1, "LoKr: the Kronecker factor (-1 = the most balanced split)")
    decompose_both: bool = opt(
        False, "LoKr: also split the small Kronecker factor into two rank-dim matrices"
    )
    use_tucker: bool = opt(
        False, "lycoris.kohya: Tucker-decompose 3x3 convs (lora_mid / hada_t1,t2 / lokr_t2)"
    )
    dora_wd: bool = opt(
        False, "lycoris.kohya: DoRA (weight decomposition; a trainable dora_scale per module)"
    )
    wd_on_output: bool = opt(
        True, "DoRA: norm per output row (LyCORIS >= 3.2's default); false = per input column (older LyCORIS)"
    )
    rank_dropout: float = opt(
        0.0, "lycoris.kohya: while training, drop each output row of a module's ΔW with this probability"
    )
    module_dropout: float = opt(
        0.0, "lycoris.kohya: while training, skip a whole module for a step with this probability"
    )
    network_train_unet_only: bool = opt(False, "train only the U-Net LoRA")
    network_train_text_encoder_only: bool = opt(False, "train only the text-encoder LoRA")
    network_weights: str | None = opt(None, "start from the weights of this LoRA file")


@dataclass
class TrainingConfig:
    learning_rate: float = opt(1e-4, "learning rate")
    unet_lr: float | None = opt(
        None, "U-Net LoRA learning rate (default: learning_rate; 0 = do not train the U-Net LoRA)"
    )
    text_encoder_lr: float | None = opt(
        None,
        "text-encoder LoRA learning rate (default: learning_rate; 0 = do not train the text-encoder LoRA); "
        "SDXL: one value for both encoders, or two ('1e-5 2e-5', as kohya takes them)",
    )
    text_encoder_lr2: float | None = opt(
        None, "SDXL's second text encoder (bigG) learning rate (default: text_encoder_lr; 0 = not trained)"
    )
    optimizer_type: str = opt("AdamW", "AdamW, AdamW8bit, Adafactor, Lion or Prodigy")
    masked_loss: bool = opt(
        False,
        "weigh the loss per pixel by the mask (needs alpha_mask or conditioning_data_dir; grey = partial "
        "weight); unlike kohya, "
        "normalised by the mask's area (sum(mask*err)/sum(mask)), not averaged over all pixels",
    )
    optimizer_args: list[str] = opt([], "optimizer arguments as key=value, e.g. weight_decay=0.1")
    lr_scheduler: str = opt(
        "constant", "constant, linear, cosine, cosine_with_restarts, polynomial or constant_with_warmup"
    )
    lr_warmup_steps: float = opt(0, "warm-up steps (a number < 1 is a fraction of all steps)")
    lr_scheduler_num_cycles: int = opt(1, "restarts of cosine_with_restarts")
    lr_scheduler_power: float = opt(1.0, "power of the polynomial scheduler")
    max_grad_norm: float = opt(1.0, "gradient clipping norm (0 = off)")
    max_train_steps: int = opt(1600, "number of optimizer steps")
    max_train_epochs: int | None = opt(None, "number of epochs (overrides max_train_steps)")
    gradient_accumulation_steps: int = opt(1, "steps to accumulate gradients over")
    gradient_checkpointing: bool = opt(False, "recompute activations to save memory")
    mixed_precision: Literal["no", "fp16", "bf16"] = opt("no", "no, fp16 or bf16")
    seed: int | None = opt(None, "random seed; the same seed gives the same run")
    noise_offset: float | None = opt(None, "noise offset (e.g. 0.1) for darker/brighter images")
    min_snr_gamma: float | None = opt(None, "Min-SNR weighting gamma (5 is a common choice)")
    validate_every_n_steps: int | None = opt(
        None, "compute the validation loss every N steps (with validation_split or validation_data_dir)"
    )
    validate_every_n_epochs: int | None = opt(
        None,
        "compute the validation loss every N epochs (default: every epoch when there is a validation set)",
    )
    max_validation_steps: int | None = opt(
        None, "use at most this many validation batches per validation (default: all)"
    )
    scale_v_pred_loss_like_noise_pred: bool = opt(
        False, "v-prediction: weight the loss by SNR/(SNR+1), as an epsilon-prediction loss would be"
    )
    max_data_loader_n_workers: int = opt(
        8,
        "processes that read and decode images while the GPU trains, capped to the CPU count "
        "(0 = in the training process); used when latents are not cached",
    )
    persistent_data_loader_workers: bool = opt(
        False, "keep the data loader's processes between epochs (faster epoch starts, more memory)"
    )
    torch_compile: bool = opt(
        False,
        "compile the U-Net with its LoRA (torch.compile): faster steps after a first step that compiles "
        "(each bucket shape compiles once)",
    )
    dynamo_backend: str = opt(
        "inductor", "torch.compile backend for torch_compile: inductor (default), aot_eager, cudagraphs, ..."
    )
    torch_compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = opt(
        "default",
        "inductor's mode for torch_compile: the default, the reduce overhead mode (CUDA graphs: less "
        "launch overhead, more memory) or the max autotune mode (longer compile)",
    )
    cuda_graph: bool = opt(
        False,
        "record the step as CUDA graphs and replay them (forward-backward per batch shape; clipping and "
        "AdamW once): two launches per step instead of thousands (CUDA, bf16 or fp32, AdamW)",
    )
    deterministic: bool = opt(
        False,
        "bit-identical runs on CUDA too (deterministic algorithms, a fixed cuBLAS workspace): slower; "
        "CPU runs are always bit-identical",
    )

    # kohya: an unset part lr falls back to learning_rate; a part lr of 0 drops that part (None is not 0)
    @property
    def unet_learning_rate(self) -> float:
        return self.learning_rate if self.unet_lr is None else self.unet_lr

    @property
    def text_encoder_learning_rate(self) -> float:
        return self.learning_rate if self.text_encoder_lr is None else self.text_encoder_lr

    @property
    def text_encoder_2_learning_rate(self) -> float:
        """SDXL's bigG: text_encoder_lr2, else the first text-encoder rate (kohya: one value for both)."""
        return self.text_encoder_learning_rate if self.text_encoder_lr2 is None else self.text_encoder_lr2


@dataclass
class OutputConfig:
    output_dir: str = opt("output", "folder for the LoRA file, states and logs")
    output_name: str = opt("last", "file name of the LoRA, without extension")
    overwrite: bool = opt(
        False, "replace a LoRA that another run saved under this output_name (and delete that run's states)"
    )
    save_model_as: Literal["safetensors"] = opt("safetensors", "file format of the LoRA")
    save_precision: Literal["fp16", "bf16", "float"] = opt("fp16", "precision of the saved LoRA")
    save_every_n_epochs: int | None = opt(None, "also save <name>-<epoch>.safetensors every N epochs")
    save_state: bool = opt(False, "save optimizer/scheduler/RNG state with each save, for --resume")
    resume: str | None = opt(None, "continue from a state folder written by save_state")
    logging_dir: str | None = opt(None, "TensorBoard log folder")
    progress_every_n_steps: int = opt(10, "steps between loss reports (each one waits for the GPU)")
    training_comment: str | None = opt(None, "comment stored in the file's metadata")
    no_metadata: bool = opt(False, "write only the minimum metadata")


@dataclass
class SampleConfig:
    sample_prompts: str | None = opt(
        None, "text file of prompts to draw while training (kohya format: --n --w --h --s --l --d --ss)"
    )
    sample_every_n_steps: int | None = opt(None, "draw the sample prompts every N steps")
    sample_every_n_epochs: int | None = opt(None, "draw the sample prompts every N epochs (overrides steps)")
    sample_at_first: bool = opt(False, "draw the sample prompts before training starts")
    sample_sampler: str = opt("ddim", "sampler for samples: kohya (ddim, euler_a, ...) or A1111 names")


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "dataset": DatasetConfig,
    "network": NetworkConfig,
    "training": TrainingConfig,
    "output": OutputConfig,
    "sample": SampleConfig,
}


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    network: NetworkConfig = field(default_factory=NetworkConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)
    # options set by a file, flag or caller (not left at their default): model-dependent defaults
    # (resolution, learning_rate; lorakit.models.defaults) fill only the others
    given: set[str] = field(default_factory=set, repr=False, compare=False)

    # --- building ---------------------------------------------------------
    @classmethod
    def from_dict(cls, flat: dict[str, Any], source: str = "config") -> TrainConfig:
        cfg = cls()
        cfg.update(flat, source)
        return cfg

    @classmethod
    def from_toml(cls, path: str | Path) -> TrainConfig:
        return cls.from_dict(load_toml_flat(path), source=str(path))

    def update(self, flat: dict[str, Any], source: str = "config") -> None:
        index = field_index()
        for key, value in flat.items():
            if key == "text_encoder_lr" and _two_values(value):  # kohya: one value per SDXL encoder
                first, second = _two_values(value)
                self.update({"text_encoder_lr": first, "text_encoder_lr2": second}, source)
                continue
            if key not in index:
                raise ConfigError(unknown_key_message(key, source))
            section, f = index[key]
            setattr(getattr(self, section), key, coerce(key, f, value, source))
            self.given.add(key)
        self.normalise()

    def normalise(self) -> None:
        """Fold kohya's network_args into typed fields."""
        fields = dict(field_index())
        for item in self.network.network_args:
            if "=" not in item:
                raise ConfigError(f"network_args: {item!r} is not key=value (e.g. conv_dim=4)")
            k, v = (s.strip() for s in item.split("=", 1))
            if k in UNSUPPORTED_NETWORK_ARGS:
                try:
                    off = float(v) == 0
                except ValueError:
                    off = False
                if not off:
                    raise ConfigError(
                        f"network_args: {k}={v}: lorakit does not implement {k} (LyCORIS applies it only in "
                        "bypass_mode); leave it out (or 0), or use rank_dropout / module_dropout"
                    )
                continue
            if k not in NETWORK_ARGS:
                raise ConfigError(
                    f"network_args: unsupported key {k!r}; lorakit knows {', '.join(NETWORK_ARGS)} "
                    f"({', '.join(UNSUPPORTED_NETWORK_ARGS)} only at 0)"
                )
            name = NETWORK_ARGS[k]
            value = v.lower() if name in ("algo", "lycoris_preset") else v
            setattr(self.network, name, coerce(name, fields[name][1], value, f"network_args {k}"))
            self.given.add(name)
        self.network.network_args = []

    # --- reading ----------------------------------------------------------
    def flat(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for section in SECTIONS:
            out.update(dataclasses.asdict(getattr(self, section)))
        return out

    def to_toml(self) -> str:
        """The config as TOML, one table per section, unset (None) options left out."""
        lines = []
        for section in SECTIONS:
            lines.append(f"[{section}]")
            for key, value in dataclasses.asdict(getattr(self, section)).items():
                if value is not None:
                    lines.append(f"{key} = {json.dumps(value)}")
            lines.append("")
        return "\n".join(lines)

    def validate(self) -> None:
        """Checks that need more than one field, run before any long work."""
        if not self.model.pretrained_model_name_or_path:
            raise ConfigError("pretrained_model_name_or_path is not set: give the base model file or folder")
        if not self.dataset.train_data_dir:
            raise ConfigError(
                "train_data_dir is not set: give the folder that holds '<repeats>_<prompt>' folders"
            )
        if self.network.network_train_unet_only and self.network.network_train_text_encoder_only:
            raise ConfigError(
                "network_train_unet_only and network_train_text_encoder_only exclude each other"
            )
        self._validate_network_module()
        at_least_one = {
            "network_dim": self.network.network_dim,
            "train_batch_size": self.dataset.train_batch_size,
            "vae_batch_size": self.dataset.vae_batch_size,
            "gradient_accumulation_steps": self.training.gradient_accumulation_steps,
            "max_train_steps": self.training.max_train_steps,
            "progress_every_n_steps": self.output.progress_every_n_steps,
        }
        if self.training.max_data_loader_n_workers < 0:
            raise ConfigError(
                f"max_data_loader_n_workers must be 0 (read images in the training process) or more "
                f"(got {self.training.max_data_loader_n_workers})"
            )
        for name, value in at_least_one.items():
            if value < 1:
                raise ConfigError(f"{name} must be at least 1 (got {value})")
        for name in ("network_dim", "conv_dim"):
            rank = getattr(self.network, name)
            if rank is not None and not 0 <= rank <= MAX_RANK:
                raise ConfigError(
                    f"{name} = {rank}: use a rank from 1 to {MAX_RANK}, the width of SD1.x's widest layer "
                    "(a higher rank adds nothing); common ranks are 4 to 128"
                )
        seed = self.training.seed
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"seed = {seed}: a seed is a whole number from 0 to {MAX_SEED}")
        if self.dataset.bucket_reso_steps < 32 or self.dataset.bucket_reso_steps % 32:
            raise ConfigError(
                "bucket_reso_steps must be a multiple of 64 (SD1.x) or 32 (SDXL): 64 is the usual choice"
            )
        if self.model.max_token_length not in (None, 75, 150, 225):
            raise ConfigError("max_token_length must be 75, 150 or 225")
        if self.model.clip_skip is not None and self.model.clip_skip < 1:
            raise ConfigError("clip_skip must be 1 or more")
        self._validate_learning_rates()
        self._validate_validation()
        self._validate_masks()
        if self.dataset.cache_text_encoder_outputs_to_disk:  # as kohya: the disk cache implies the cache
            self.dataset.cache_text_encoder_outputs = True
        if self.dataset.cache_text_encoder_outputs and self.trains_text_encoder:
            raise ConfigError(
                f"{self.dataset.te_cache_option} needs a frozen text encoder: add network_train_unet_only "
                "(or set text_encoder_lr = 0)"
            )
        if self.dataset.cache_latents_to_disk:
            self.dataset.cache_latents = True
        resolution_of(self.dataset.resolution)

    def _validate_masks(self) -> None:
        d = self.dataset
        if self.training.masked_loss and not (d.alpha_mask or d.conditioning_data_dir):
            raise ConfigError(
                "masked_loss needs a mask source: set alpha_mask = true to use each image's alpha channel, "
                "or conditioning_data_dir to a folder of mask images"
            )
        if d.alpha_mask and d.conditioning_data_dir:
            raise ConfigError(
                "alpha_mask and conditioning_data_dir are two mask sources: use the images' alpha channel "
                "or the mask images, not both"
            )
        if d.conditioning_data_dir and not self.training.masked_loss:
            raise ConfigError(
                "conditioning_data_dir holds loss masks: set masked_loss = true to use them (or unset it)"
            )

    def _validate_network_module(self) -> None:
        n = self.network
        if n.network_module not in NETWORK_MODULES:
            raise ConfigError(
                f"network_module {n.network_module!r} is not supported; use networks.lora (LoRA/LoCon) or "
                "lycoris.kohya (LyCORIS: algo=locon/loha/lokr, dora_wd)"
            )
        if n.network_module == "networks.lora":
            defaults = NetworkConfig()
            lycoris_only = [
                name
                for name in (
                    "algo",
                    "lycoris_preset",
                    "factor",
                    "decompose_both",
                    "use_tucker",
                    "dora_wd",
                    "rank_dropout",
                    "module_dropout",
                )
                if getattr(n, name) != getattr(defaults, name)
            ]
            if lycoris_only:
                raise ConfigError(
                    f"{', '.join(lycoris_only)} need network_module = lycoris.kohya (kohya's networks.lora has "
                    "no LoHa/LoKr/DoRA, and lorakit's networks.lora no dropouts): e.g. --network_module "
                    "lycoris.kohya --network_args algo=locon dora_wd=True"
                )
            return
        for name in ("rank_dropout", "module_dropout"):
            p = getattr(n, name)
            if not (math.isfinite(p) and 0 <= p < 1):
                raise ConfigError(f"{name} = {p}: a probability from 0 to below 1, e.g. 0.1")
        if n.lycoris_preset == "attn-mlp" and n.conv_dim:
            raise ConfigError(
                "preset=attn-mlp trains no 3x3 convs (LyCORIS ignores conv_dim there): drop conv_dim, or use "
                "preset=full for LoCon-style convs"
            )
        if n.algo == "lokr" and (n.factor == 0 or n.factor < -1):
            raise ConfigError(
                f"factor = {n.factor}: LoKr's factor is -1 (most balanced split) or above 0, e.g. 8"
            )

    def _validate_learning_rates(self) -> None:
        t = self.training
        if not (math.isfinite(t.learning_rate) and t.learning_rate > 0):
            raise ConfigError(f"learning_rate must be a number above 0, e.g. 1e-4 (got {t.learning_rate})")
        for name in ("unet_lr", "text_encoder_lr", "text_encoder_lr2"):
            value = getattr(t, name)
            if value is not None and not (math.isfinite(value) and value >= 0):
                raise ConfigError(
                    f"{name} must be 0 (do not train that part) or a number above 0 (got {value})"
                )
        if not (self.trains_unet or self.trains_text_encoder):
            raise ConfigError(
                "nothing to train: unet_lr, text_encoder_lr and network_train_unet_only / "
                "network_train_text_encoder_only leave neither the U-Net nor the text-encoder LoRA"
            )

    def _validate_validation(self) -> None:
        d, t = self.dataset, self.training
        split = d.validation_split
        if not (math.isfinite(split) and 0 <= split < 1):
            raise ConfigError(
                f"validation_split must be a fraction from 0 to below 1, e.g. 0.1 for a tenth of the train "
                f"images (got {split})"
            )
        if split > 0 and d.validation_data_dir:
            raise ConfigError(
                "validation_split and validation_data_dir exclude each other: hold out part of the train "
                "images, or give a separate validation folder"
            )
        seed = d.validation_seed
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise ConfigError(f"validation_seed = {seed}: a seed is a whole number from 0 to {MAX_SEED}")
        for name in ("validate_every_n_steps", "validate_every_n_epochs", "max_validation_steps"):
            value = getattr(t, name)
            if value is not None and value < 1:
                raise ConfigError(f"{name} must be at least 1, or unset (got {value})")

    @property
    def has_validation(self) -> bool:
        """Whether the run measures a validation loss (a split of the train images or its own folder)."""
        return self.dataset.validation_split > 0 or bool(self.dataset.validation_data_dir)

    @property
    def trains_text_encoder(self) -> bool:
        """Whether the run has a text-encoder LoRA: not with network_train_unet_only or text_encoder_lr = 0."""
        t = self.training
        rates = (t.text_encoder_learning_rate, t.text_encoder_2_learning_rate)
        return not self.network.network_train_unet_only and max(rates) > 0

    @property
    def trains_unet(self) -> bool:
        """Whether the run has a U-Net LoRA: not with network_train_text_encoder_only or unet_lr = 0."""
        return not self.network.network_train_text_encoder_only and self.training.unet_learning_rate > 0


def _two_values(value: Any) -> list | None:
    """[a, b] for kohya's two-value text_encoder_lr (a list, or '1e-5 2e-5' / '1e-5,2e-5'), else None."""
    if isinstance(value, str):
        value = value.replace(",", " ").split()
        if len(value) < 2:
            return None
    if isinstance(value, list | tuple):
        if len(value) == 1:
            return [value[0], None]
        if len(value) != 2:
            raise ConfigError(
                f"text_encoder_lr takes one value, or two for SDXL's two text encoders (got {len(value)})"
            )
        return list(value)
    return None


def resolution_of(text: str | int | tuple[int, int]) -> tuple[int, int]:
    """'512' or '512,768' or (w, h) -> (width, height)."""
    if isinstance(text, tuple):
        return text
    parts = [p.strip() for p in str(text).split(",")]
    try:
        nums = [int(p) for p in parts]
    except ValueError:
        raise ConfigError(f"resolution {text!r} is not 'W,H' or a single number") from None
    if len(nums) == 1:
        nums = nums * 2
    if len(nums) != 2 or min(nums) < 64:
        raise ConfigError(f"resolution {text!r} must be 'W,H' (each 64 or more) or a single number")
    return nums[0], nums[1]


# --- field machinery ---------------------------------------------------------


def field_index() -> dict[str, tuple[str, dataclasses.Field]]:
    """Option name -> (section, field). Names are unique across sections."""
    index = {}
    for section, klass in SECTIONS.items():
        hints = typing.get_type_hints(klass)
        for f in dataclasses.fields(klass):
            f.type = hints[f.name]
            index[f.name] = (section, f)
    return index


def unknown_key_message(key: str, source: str) -> str:
    close = difflib.get_close_matches(key, list(field_index()), n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"{source}: unknown option {key!r}.{hint} `lorakit train --help` lists every option."


def base_type(tp: Any) -> tuple[Any, bool]:
    """(inner type, optional?) for `X | None`."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def coerce(key: str, f: dataclasses.Field, value: Any, source: str) -> Any:
    tp, optional = base_type(f.type)
    where = f"{source}: option {key!r}"
    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "")):
        if optional:
            return None
        raise ConfigError(f"{where} cannot be empty")
    origin = typing.get_origin(tp)
    try:
        if origin is Literal:
            choices = typing.get_args(tp)
            if value not in choices:
                raise ValueError(f"must be one of {', '.join(map(str, choices))}")
            return value
        if origin is list:
            if isinstance(value, str):
                value = value.split()
            return [str(v) for v in value]
        if tp is bool:
            if isinstance(value, str):
                if value.lower() in ("true", "1", "yes"):
                    return True
                if value.lower() in ("false", "0", "no"):
                    return False
                raise ValueError("must be true or false")
            if not isinstance(value, bool):
                raise ValueError("must be true or false")
            return value
        if tp is int:
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("must be a whole number")
            if isinstance(value, bool):
                raise ValueError("must be a number")
            return int(value)
        if tp is float:
            if isinstance(value, bool):
                raise ValueError("must be a number")
            return float(value)
        return str(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{where} = {value!r}: {e}") from None


def load_toml_flat(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    flat: dict[str, Any] = {}

    def walk(d: dict[str, Any]) -> None:
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v)
            else:
                flat[k] = v

    walk(data)
    return flat
