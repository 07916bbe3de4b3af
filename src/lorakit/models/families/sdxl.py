"""SDXL base models: shipped configs, offline loading (SGM single file, .ckpt, diffusers folder), saving.

Parts: UNet (diffusers UNet2DConditionModel, 2048-wide context, 2816-wide vector), VAE (latent
scale 0.13025), TE1 = CLIP ViT-L/14 (transformers CLIPTextModel), TE2 = OpenCLIP ViT-bigG/14 as
transformers CLIPTextModelWithProjection. Both tokenizers are the shipped CLIP BPE; TE2's pads with
id 0 (`!`), as open_clip and kohya do (sd-scripts library/strategy_sdxl.py).
"""

from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import torch

from lorakit.atomic import atomic_path
from lorakit.errors import ModelError
from lorakit.models.checkpoint import is_safetensors, read_tensors
from lorakit.models.families import sgm_layout
from lorakit.models.families.base import Conditioning, ModelFamily
from lorakit.models.families.detect import (
    Family,
    detect_diffusers_family,
    detect_family,
    read_keys_and_shapes,
    unsupported_message,
)
from lorakit.models.loader import (
    BaseModel,
    file_header,
    fit_state_dict,
    model_kind,
    move_model,
    part_dtypes,
)
from lorakit.models.tokenizer import load_tokenizer

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "sdxl"
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
ARCH_METADATA_KEY = "lorakit.arch"
VAE_SCALE_FACTOR = 0.13025
TE2_PAD_ID = 0
_EXPECTED = "an SDXL checkpoint (.safetensors or .ckpt, SGM layout) or a diffusers folder"


def sdxl_arch() -> dict:
    """The SDXL base 1.0 configs shipped with lorakit (stabilityai/stable-diffusion-xl-base-1.0's)."""
    return {p: json.loads((CONFIG_DIR / f"{p}.json").read_text()) for p in PARTS}


def sdxl_tokenizers():
    """(TE1 tokenizer, TE2 tokenizer): the same CLIP BPE; TE2's pads with id 0 as open_clip does."""
    tok2 = load_tokenizer()
    tok2.pad_token_id = TE2_PAD_ID
    return load_tokenizer(), tok2


def build_sdxl(arch: dict):
    """(unet, vae, text_encoder_1, text_encoder_2) from configs, with the libraries' random init."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel.from_config(arch["unet"])
    vae = AutoencoderKL.from_config(arch["vae"])
    te1 = CLIPTextModel(CLIPTextConfig.from_dict(arch["text_encoder"]))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig.from_dict(arch["text_encoder_2"]))
    return unet, vae, te1, te2


def build_sdxl_empty(arch: dict | None = None):
    """The four parts with parameters on the meta device (no memory, no init): for counts and names."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        return build_sdxl(arch or sdxl_arch())


# --------------------------------------------------------------------------- single file


def _arch_of(path: Path, metadata: dict[str, str]) -> dict:
    if ARCH_METADATA_KEY not in metadata:
        return sdxl_arch()
    try:
        arch = json.loads(metadata[ARCH_METADATA_KEY])
        assert all(isinstance(arch[p], dict) for p in PARTS)
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise ModelError(
            f"{path}: the '{ARCH_METADATA_KEY}' metadata is not valid JSON with {'/'.join(PARTS)} "
            f"configs ({e}). Re-save the file with lorakit."
        ) from e
    return arch


def _assign(path: Path, what: str, model: torch.nn.Module, sd: dict, dtype: torch.dtype) -> None:
    sd = fit_state_dict(model, sd, dtype)
    own = model.state_dict()
    missing = sorted(set(own) - set(sd) - {k for k in own if k.endswith("position_ids")})
    if missing:
        raise ModelError(f"{path}: the {what} weights lack '{missing[0]}' ({len(missing)} missing in all).")
    for key, tensor in sd.items():
        if key in own and tuple(own[key].shape) != tuple(tensor.shape):
            raise ModelError(
                f"{path}: {what} '{key}' has shape {list(tensor.shape)} but the model expects "
                f"{list(own[key].shape)}: the file is not an SDXL base of this architecture."
            )
    unexpected = sorted(set(sd) - set(own))
    if unexpected:
        raise ModelError(f"{path}: unexpected {what} key '{unexpected[0]}' ({len(unexpected)} in all).")
    model.load_state_dict(sd, strict=False, assign=True)


def _check_sgm_keys(path: Path, keys, shapes: dict) -> Family:
    """The family, if the keys are a complete SDXL base's (checked before any weight is read)."""
    family = detect_family(keys, shapes)
    if family.key != "sdxl" or family.inpainting:
        raise ModelError(f"{path}: this is {family.label}, not an SDXL base model. Expected {_EXPECTED}.")
    if family.edm:
        raise ModelError(f"{path}: {unsupported_message(family)}")
    for prefix in sgm_layout.PREFIXES:
        if not any(k.startswith(prefix) for k in keys):
            raise ModelError(
                f"{path}: this {family.label} checkpoint has no '{prefix}*' weights; expected {_EXPECTED}."
            )
    return family


def _load_single_file(path: Path, dtype: torch.dtype, loaded: tuple | None, device, vae_dtype: torch.dtype):
    if loaded is None and is_safetensors(path):  # refuse from the header, before reading gigabytes
        _check_sgm_keys(path, *read_keys_and_shapes(path))
    keys, shapes, metadata = file_header(path, loaded)
    family = _check_sgm_keys(path, keys, {k: v for k, v in shapes.items() if len(v)})
    arch = _arch_of(path, metadata)
    # each tensor in its part's dtype on the device as it is read (no float32 model on the CPU)
    dtype_of = part_dtypes(sgm_layout.PREFIXES, dtype, vae_dtype, sgm_layout.VAE_PREFIX)
    state_dict = read_tensors(path, dtype_of, device, loaded)
    parts = sgm_layout.from_sgm_state_dict(state_dict, arch)
    del state_dict
    models = build_sdxl_empty(arch)
    part_dtype = {"vae": vae_dtype}
    for what, model, sd in zip(PARTS, models, parts):
        _assign(path, what, model, sd, part_dtype.get(what, dtype))
    return (*models, arch, family)


# --------------------------------------------------------------------------- diffusers folder


def scheduler_markers(path: Path, family: Family) -> Family:
    """A diffusers folder marks v-prediction / zero terminal SNR in scheduler/scheduler_config.json."""
    try:
        sched = json.loads((path / "scheduler" / "scheduler_config.json").read_text())
    except (OSError, ValueError):
        return family
    return replace(
        family,
        v_pred=family.v_pred or sched.get("prediction_type") == "v_prediction",
        zero_terminal_snr=family.zero_terminal_snr or bool(sched.get("rescale_betas_zero_snr")),
    )


def _load_diffusers(path: Path, dtype: torch.dtype, loaded, device, vae_dtype: torch.dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    index = json.loads((path / "model_index.json").read_text())
    family = scheduler_markers(path, detect_diffusers_family(index))
    if family.key != "sdxl" or family.inpainting:
        raise ModelError(f"{path}: this is {family.label}, not an SDXL base model. Expected {_EXPECTED}.")
    for part in PARTS:
        if not (path / part / "config.json").is_file():
            raise ModelError(f"{path}: the SDXL diffusers folder has no {part}/config.json.")
    try:
        kw = {"local_files_only": True, "torch_dtype": dtype}
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **{**kw, "torch_dtype": vae_dtype})
        te1 = CLIPTextModel.from_pretrained(path / "text_encoder", **kw)
        te2 = CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2", **kw)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"{path}: could not load the diffusers model: {str(e)[:500]}") from e
    arch = {
        "unet": dict(unet.config),
        "vae": dict(vae.config),
        "text_encoder": json.loads(te1.config.to_json_string(use_diff=False)),
        "text_encoder_2": json.loads(te2.config.to_json_string(use_diff=False)),
    }
    arch = {p: {k: v for k, v in cfg.items() if k != "_name_or_path"} for p, cfg in arch.items()}
    return unet, vae, te1, te2, json.loads(json.dumps(arch, default=str)), family


# --------------------------------------------------------------------------- public


def load_sdxl(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    loaded: tuple | None = None,
    vae_dtype: torch.dtype | None = None,
) -> BaseModel:
    """Load an SDXL base: SGM .safetensors, .ckpt (weights only), or a diffusers folder. Never downloads.
    `loaded`: the (state_dict, metadata) of a single file already read. The parts arrive in `dtype`
    (the VAE in `vae_dtype`, default `dtype`) on `device`, as load_base_model's."""
    path = Path(path).expanduser()
    vae_dtype = vae_dtype or dtype
    kind = model_kind(path, _EXPECTED)
    load = _load_diffusers if kind == "diffusers" else _load_single_file
    *models, arch, family = load(path, dtype, loaded, device, vae_dtype)
    dtypes = (dtype, vae_dtype, dtype, dtype)
    unet, vae, te1, te2 = (move_model(m, device, d).eval() for m, d in zip(models, dtypes))
    return BaseModel(
        unet, vae, (te1, te2), sdxl_tokenizers(), source=path, arch=arch, kind=kind, family=family
    )


def save_sgm_checkpoint(
    path: str | Path,
    unet,
    vae,
    text_encoder_1,
    text_encoder_2,
    arch: dict | None = None,
    markers=(),
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write an SGM-layout .safetensors (loads in A1111/ComfyUI/kohya/diffusers), atomically.
    `arch` is stored as metadata beside `metadata` (e.g. modelspec.resolution, see
    lorakit.models.defaults); `markers` adds ComfyUI's empty marker keys (`v_pred`, `ztsnr`);
    `dtype` casts the floating-point weights (fp16 for shipping)."""
    from safetensors.torch import save_file

    path = Path(path)
    sd = sgm_layout.to_sgm_state_dict(
        unet.state_dict(), vae.state_dict(), text_encoder_1.state_dict(), text_encoder_2.state_dict()
    )
    sd = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in sd.items()
    }
    sd.update({m: torch.tensor([]) for m in markers})
    metadata = {"format": "pt", **(metadata or {})}
    if arch is not None:
        metadata[ARCH_METADATA_KEY] = json.dumps(arch)
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata=metadata)
    return path


# --------------------------------------------------------------------------- the family seam


class SDXLFamily(ModelFamily):
    """SDXL base 1.0 and its fine-tunes (Pony, Illustrious, NoobAI eps/v-pred) as kohya's
    sdxl_train_network.py trains them."""

    key = "sdxl"
    name = "SDXL"
    default_resolution = (1024, 1024)
    default_max_bucket_reso = 2048  # kohya's 1024 would cap SDXL buckets; every SDXL guide raises it
    bucket_step = 32  # two 2x downsamples of 8x latents (kohya's verify_bucket_reso_steps(32))
    text_encoder_parts = ("te1", "te2")
    base_model_version = "sdxl_base_v1-0"  # v-pred shows only in modelspec.prediction_type
    modelspec_architecture = "stable-diffusion-xl-v1-base"
    modelspec_implementation = "https://github.com/Stability-AI/generative-models"
    # LyCORIS's `full` names (conv_in, conv_out, time_embedding.*) match no module of kohya's SGM-layout
    # SDXL UNet (input_blocks.0.0, out.2, time_embed.*), so `full` there is the LoCon targets only
    lycoris_full_unet_paths = ()

    def load(self, path, dtype, device, vae_dtype=None):
        return load_sdxl(path, dtype, device, vae_dtype=vae_dtype)

    def encode(self, base, captions, clip_skip, max_token_length):
        from lorakit.models.families.sdxl_conditioning import encode_sdxl_captions

        context, pooled = encode_sdxl_captions(base, captions, max_token_length, clip_skip)
        return Conditioning(context, pooled)

    def tokenize(self, base, captions, max_token_length):
        from lorakit.models.families.sdxl_conditioning import tokenize_sdxl

        return tokenize_sdxl(base, captions, max_token_length)

    def encode_ids(self, base, ids, clip_skip):
        from lorakit.models.families.sdxl_conditioning import encode_sdxl_ids

        del clip_skip  # as in encode: SDXL always takes the penultimate layers
        return Conditioning(*encode_sdxl_ids(base, *ids))

    def encode_prompts(self, base, prompt, negative, clip_skip):
        from lorakit.generate.sdxl_prompt import encode_sdxl_pair

        del clip_skip  # A1111 keeps SDXL on its penultimate layers (sdxl_clip_l_skip off), as kohya
        return encode_sdxl_pair(base, prompt, negative)

    def predict(self, base, noisy, t, cond, size_ids):
        from lorakit.models.families.sdxl_conditioning import predict_with_vector, sdxl_vector

        y = sdxl_vector(cond.pooled, size_ids.to(noisy.device), base.unet)
        return predict_with_vector(base.unet, noisy, t, cond.context, y.to(noisy.dtype))

    def lora_targets(self, base, dim, alpha, conv_dim, conv_alpha, parts):
        from lorakit.network.targets import sdxl_te_targets, sdxl_unet_targets

        out = []
        if "unet" in parts:
            out += sdxl_unet_targets(base.unet, dim, alpha, conv_dim, conv_alpha)
        for index, te in enumerate(base.text_encoders, start=1):
            if f"te{index}" in parts:
                out += sdxl_te_targets(te, index, dim, alpha)
        return out

    def module_map(self, unet, text_encoders):
        from lorakit.network.targets import sdxl_module_map

        return sdxl_module_map(unet, text_encoders)

    def norm_module_map(self, unet, text_encoders):
        from lorakit.network.targets import sdxl_norm_map

        return sdxl_norm_map(unet, text_encoders)

    def name_aliases(self, unet):
        from lorakit.network.targets import sdxl_diffusers_aliases

        return sdxl_diffusers_aliases(unet)

    def claims_lora(self, names, metadata):
        # two text encoders, a label embedding, transformer depth > 1: no SD1/SD2 LoRA has these
        sdxl_unet = re.compile(r"lora_unet_(label_emb|.*_transformer_blocks_[1-9])")
        return metadata.get("ss_base_model_version", "").startswith("sdxl_") or any(
            n.startswith(("lora_te1_", "lora_te2_")) or sdxl_unet.match(n) for n in names
        )


SDXL = SDXLFamily()
