"""SDXL base models: shipped configs, offline loading (SGM single file, .ckpt, diffusers folder), saving.

Parts: UNet (diffusers UNet2DConditionModel, 2048-wide context, 2816-wide vector), VAE (latent
scale 0.13025), TE1 = CLIP ViT-L/14 (transformers CLIPTextModel), TE2 = OpenCLIP ViT-bigG/14 as
transformers CLIPTextModelWithProjection. Both tokenizers are the shipped CLIP BPE; TE2's pads with
id 0 (`!`), as open_clip and kohya do (sd-scripts library/strategy_sdxl.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.atomic import atomic_path
from lorakit.errors import ModelError
from lorakit.models.checkpoint import read_state_dict
from lorakit.models.families import sgm_layout
from lorakit.models.families.detect import Family, detect_diffusers_family, detect_family
from lorakit.models.loader import fit_state_dict, model_kind, move_model
from lorakit.models.tokenizer import load_tokenizer

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs" / "sdxl"
PARTS = ("unet", "vae", "text_encoder", "text_encoder_2")
ARCH_METADATA_KEY = "lorakit.arch"
VAE_SCALE_FACTOR = 0.13025
TE2_PAD_ID = 0
_EXPECTED = "an SDXL checkpoint (.safetensors or .ckpt, SGM layout) or a diffusers folder"


@dataclass
class SdxlModel:
    unet: torch.nn.Module = field(repr=False)  # diffusers UNet2DConditionModel
    vae: torch.nn.Module = field(repr=False)  # diffusers AutoencoderKL
    text_encoder_1: torch.nn.Module = field(repr=False)  # transformers CLIPTextModel (CLIP-L)
    text_encoder_2: torch.nn.Module = field(repr=False)  # transformers CLIPTextModelWithProjection (bigG)
    tokenizer_1: object = field(repr=False)
    tokenizer_2: object = field(repr=False)  # pad id 0
    source: Path
    arch: dict = field(repr=False)  # {"unet", "vae", "text_encoder", "text_encoder_2"} configs
    kind: str  # "single_file" | "diffusers"
    family: Family


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


def _load_single_file(path: Path, dtype: torch.dtype):
    state_dict, metadata = read_state_dict(path)
    family = detect_family(state_dict, {k: v.shape for k, v in state_dict.items() if v.ndim})
    if family.key != "sdxl" or family.inpainting:
        raise ModelError(f"{path}: this is {family.label}, not an SDXL base model. Expected {_EXPECTED}.")
    for prefix in sgm_layout.PREFIXES:
        if not any(k.startswith(prefix) for k in state_dict):
            raise ModelError(f"{path}: the checkpoint has no '{prefix}*' weights; expected {_EXPECTED}.")
    arch = _arch_of(path, metadata)
    parts = sgm_layout.from_sgm_state_dict(state_dict, arch)
    del state_dict
    models = build_sdxl_empty(arch)
    for what, model, sd in zip(PARTS, models, parts):
        _assign(path, what, model, sd, dtype)
    return (*models, arch, family)


# --------------------------------------------------------------------------- diffusers folder


def _load_diffusers(path: Path, dtype: torch.dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    index = json.loads((path / "model_index.json").read_text())
    family = detect_diffusers_family(index)
    if family.key != "sdxl" or family.inpainting:
        raise ModelError(f"{path}: this is {family.label}, not an SDXL base model. Expected {_EXPECTED}.")
    for part in PARTS:
        if not (path / part / "config.json").is_file():
            raise ModelError(f"{path}: the diffusers folder has no {part}/config.json.")
    try:
        kw = {"local_files_only": True, "torch_dtype": dtype}
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **kw)
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
    path: str | Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"
) -> SdxlModel:
    """Load an SDXL base: SGM .safetensors, .ckpt (weights only), or a diffusers folder. Never downloads."""
    path = Path(path).expanduser()
    kind = model_kind(path, _EXPECTED)
    load = _load_diffusers if kind == "diffusers" else _load_single_file
    *models, arch, family = load(path, dtype)
    unet, vae, te1, te2 = (move_model(m, device, dtype).eval() for m in models)
    tok1, tok2 = sdxl_tokenizers()
    return SdxlModel(unet, vae, te1, te2, tok1, tok2, source=path, arch=arch, kind=kind, family=family)


def save_sgm_checkpoint(
    path: str | Path, unet, vae, text_encoder_1, text_encoder_2, arch: dict | None = None, markers=()
) -> Path:
    """Write an SGM-layout .safetensors (loads in A1111/ComfyUI/kohya/diffusers), atomically.
    `arch` is stored as metadata; `markers` adds ComfyUI's empty marker keys (`v_pred`, `ztsnr`)."""
    from safetensors.torch import save_file

    path = Path(path)
    sd = sgm_layout.to_sgm_state_dict(
        unet.state_dict(), vae.state_dict(), text_encoder_1.state_dict(), text_encoder_2.state_dict()
    )
    sd = {k: v.detach().cpu().contiguous() for k, v in sd.items()}
    sd.update({m: torch.tensor([]) for m in markers})
    metadata = {"format": "pt"}
    if arch is not None:
        metadata[ARCH_METADATA_KEY] = json.dumps(arch)
    with atomic_path(path) as tmp:
        save_file(sd, str(tmp), metadata=metadata)
    return path
