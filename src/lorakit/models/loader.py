"""Load an SD1.x base model (single-file LDM checkpoint or diffusers folder) fully offline, and save one."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from lorakit.atomic import atomic_path
from lorakit.errors import ModelError
from lorakit.models import ldm_layout
from lorakit.models.checkpoint import is_safetensors, read_state_dict, read_tensors, safetensors_header
from lorakit.models.families.detect import (
    SHAPE_KEYS,
    UNET_IN,
    Family,
    detect_diffusers_family,
    detect_family,
    read_keys_and_shapes,
    unsupported_message,
)
from lorakit.models.tokenizer import load_tokenizer

CONFIG_DIR = Path(__file__).resolve().parent / "configs"
SD1_FAMILY = Family("sd1", "SD1.x")
ARCH_METADATA_KEY = "lorakit.arch"
_PARTS = ("unet", "vae", "text_encoder")
_EXPECTED = "an SD1.x or SDXL checkpoint (.safetensors or .ckpt) or a diffusers folder with model_index.json"


@dataclass
class BaseModel:
    """A loaded base model of any family; `spec` is its family module (lorakit.models.families)."""

    unet: torch.nn.Module = field(repr=False)  # diffusers UNet2DConditionModel
    vae: torch.nn.Module = field(repr=False)  # diffusers AutoencoderKL
    text_encoders: tuple = field(repr=False)  # transformers CLIP models: (CLIP-L,) SD1; (CLIP-L, bigG) SDXL
    tokenizers: tuple = field(
        repr=False
    )  # one per text encoder (load_tokenizer(); SDXL's second pads with 0)
    source: Path
    arch: dict = field(
        repr=False
    )  # {"unet": ..., "vae": ..., "text_encoder": ...[, "text_encoder_2"]} configs
    kind: str  # "single_file" | "diffusers"
    family: Family = SD1_FAMILY  # what was detected (v-pred / ztsnr markers included)

    @property
    def spec(self):
        """The family module: encode, predict, LoRA targets, metadata (lorakit.models.families.base)."""
        from lorakit.models.families.base import family_spec

        return family_spec(self.family.key)

    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.text_encoders[0]

    @property
    def tokenizer(self):
        return self.tokenizers[0]

    # SDXL's names for its two encoders (kohya's te1 = CLIP-L, te2 = OpenCLIP bigG)
    text_encoder_1 = text_encoder
    tokenizer_1 = tokenizer

    @property
    def text_encoder_2(self) -> torch.nn.Module:
        return self.text_encoders[1]

    @property
    def tokenizer_2(self):
        return self.tokenizers[1]


def sd15_arch() -> dict:
    """The SD1.5 configs shipped with lorakit (used for single files that carry none)."""
    return {p: json.loads((CONFIG_DIR / "sd15" / f"{p}.json").read_text()) for p in _PARTS}


def build_from_arch(arch: dict):
    """Construct (unet, vae, text_encoder) from configs, with the libraries' random init. No download."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel.from_config(arch["unet"])
    vae = AutoencoderKL.from_config(arch["vae"])
    te = CLIPTextModel(CLIPTextConfig.from_dict(arch["text_encoder"]))
    return unet, vae, te


def _build_empty(arch: dict):
    # parameters on the meta device (no init cost for 1B params); buffers stay real
    from accelerate import init_empty_weights

    with init_empty_weights():
        return build_from_arch(arch)


# --------------------------------------------------------------------------- single file


class LoraFileAsBaseModel(ModelError):
    """A LoRA given where the base model belongs; callers say how their command takes a LoRA."""

    def __init__(self, path: Path):
        self.path = path
        super().__init__(
            f"{path}: this is a LoRA file, not a base model: the base model is the full SD1.x "
            "checkpoint a LoRA was trained on."
        )


def _refuse_other_families(path: Path, keys, shapes: dict) -> None:
    """Name the family of a base lorakit cannot train yet (SDXL, SD2, FLUX, inpainting, ...)."""
    family = detect_family(keys, shapes)
    if family.key in ("sd1", "unknown") and not family.inpainting:
        return  # unknown: _check_kind says what is missing
    if family.key == "sd1":  # the shape check would fail too; say why in words
        shape = list(shapes[UNET_IN])
        raise ModelError(
            f"{path}: this is an {family.label} checkpoint: '{UNET_IN}' has shape {shape} (9 input channels: "
            f"latents + mask + masked image) where a text-to-image UNet has {[shape[0], 4, *shape[2:]]}. "
            "lorakit trains text-to-image SD1.x bases for now."
        )
    raise ModelError(f"{path}: {unsupported_message(family)}")


def _check_kind(path: Path, keys: list[str], shapes: dict) -> None:
    """Refuse files that are not SD1.x base models, before building anything."""

    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    if has("lora_unet_") or has("lora_te") or any(".lora_down." in k or ".lora_A." in k for k in keys):
        raise LoraFileAsBaseModel(path)
    _refuse_other_families(path, keys, shapes)
    if not has(ldm_layout.UNET_PREFIX):
        raise ModelError(
            f"{path}: not a Stable Diffusion checkpoint (a LoRA file?): it has no "
            f"'{ldm_layout.UNET_PREFIX}' UNet weights. Expected {_EXPECTED}."
        )
    for prefix, what in ((ldm_layout.VAE_PREFIX, "VAE"), (ldm_layout.TE_PREFIX, "text encoder")):
        if not has(prefix):
            raise ModelError(
                f"{path}: the checkpoint has no {what} weights ('{prefix}*'); lorakit needs "
                "a full SD1.x checkpoint with UNet, VAE and text encoder."
            )


def _arch_from_metadata(path: Path, metadata: dict[str, str]) -> dict:
    if ARCH_METADATA_KEY not in metadata:
        return sd15_arch()
    try:
        arch = json.loads(metadata[ARCH_METADATA_KEY])
        assert all(isinstance(arch[p], dict) for p in _PARTS)
    except (ValueError, KeyError, TypeError, AssertionError) as e:
        raise ModelError(
            f"{path}: the '{ARCH_METADATA_KEY}' metadata is not valid JSON with "
            f"{'/'.join(_PARTS)} configs ({e}). Re-save the file with lorakit."
        ) from e
    return arch


def _squeeze(shape) -> tuple:
    shape = tuple(shape)
    while len(shape) > 2 and shape[-1] == 1:  # LDM 1x1-conv attention == linear
        shape = shape[:-1]
    return shape


def _check_layout(path: Path, shapes: dict, expected: dict, arch_name: str) -> None:
    """Compare the file's LDM keys/shapes with those of the architecture; name the first difference."""
    got = {
        k: v
        for k, v in shapes.items()
        if k.startswith(ldm_layout.PREFIXES) and k not in ldm_layout.IGNORED_LDM_KEYS
    }
    for key, tensor in expected.items():
        if key not in got:
            raise ModelError(
                f"{path}: key '{key}' is missing, so this is not a complete {arch_name} checkpoint."
            )
        if _squeeze(got[key]) != _squeeze(tensor.shape):
            raise ModelError(
                f"{path}: '{key}' has shape {list(got[key])} but {arch_name} expects "
                f"{list(tensor.shape)}: the file is a different architecture (SD2.x, an inpainting model, ...). "
                "lorakit supports SD1.x bases for now."
            )
    extra = sorted(set(got) - set(expected))
    if extra:
        raise ModelError(
            f"{path}: unexpected key '{extra[0]}' ({len(extra)} in all) for {arch_name}; "
            "the file is a different architecture. lorakit supports SD1.x bases for now."
        )


def fit_state_dict(model: torch.nn.Module, sd: dict, dtype: torch.dtype) -> dict:
    """`sd` with floats in `dtype` and text-encoder keys in the installed transformers' layout
    (>= 5.6 has no `text_model.` wrapper; checkpoints and converters always write it)."""
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in sd.items()}
    if not any(k.startswith("text_model.") for k in model.state_dict()):
        sd = {k.removeprefix("text_model."): v for k, v in sd.items()}
    return sd


def _assign(model: torch.nn.Module, sd: dict, dtype: torch.dtype) -> None:
    model.load_state_dict(fit_state_dict(model, sd, dtype), strict=True, assign=True)


def file_header(path: Path, loaded: tuple | None = None) -> tuple[list[str], dict, dict[str, str]]:
    """(keys, shapes of every key, metadata) of a single file without reading its weights: the
    header of a .safetensors, the (mapped) tensors of a .ckpt, or the `loaded` (state_dict, metadata)."""
    if loaded is None and is_safetensors(path):
        header = safetensors_header(path)
        return header.keys, header.shapes, header.metadata
    state_dict, metadata = loaded or read_state_dict(path, mmap=True)
    return list(state_dict), {k: tuple(v.shape) for k, v in state_dict.items()}, metadata


def part_dtypes(prefixes: tuple[str, ...], dtype: torch.dtype, vae_dtype: torch.dtype, vae_prefix: str):
    """`dtype_of` for checkpoint.read_tensors: the VAE's keys in `vae_dtype`, the other parts' in
    `dtype`, keys outside every part (EMA copies, optimizer leftovers) not read at all."""

    def dtype_of(key: str) -> torch.dtype | None:
        if key.startswith(vae_prefix):
            return vae_dtype
        return dtype if key.startswith(prefixes) else None

    return dtype_of


def _load_single_file(
    path: Path, dtype: torch.dtype, loaded: tuple | None = None, device="cpu", vae_dtype=None
):
    vae_dtype = vae_dtype or dtype
    if is_safetensors(path):  # from the header: no need to read 7 GB of weights to refuse a file
        _refuse_other_families(path, *read_keys_and_shapes(path))
    keys, shapes, metadata = file_header(path, loaded)
    _check_kind(path, keys, {k: shapes[k] for k in SHAPE_KEYS if k in shapes})
    arch = _arch_from_metadata(path, metadata)
    arch_name = "this file's own (lorakit.arch) architecture" if ARCH_METADATA_KEY in metadata else "SD1.5"
    unet, vae, te = _build_empty(arch)
    expected = ldm_layout.to_ldm_state_dict(unet.state_dict(), vae.state_dict(), te.state_dict())
    _check_layout(path, ldm_layout.fix_te_keys(shapes), expected, arch_name)
    # every tensor goes to its dtype and device as it is read: no float32 copy of the model on the CPU
    dtype_of = part_dtypes(ldm_layout.PREFIXES, dtype, vae_dtype, ldm_layout.VAE_PREFIX)
    state_dict = ldm_layout.fix_te_keys(read_tensors(path, dtype_of, device, loaded))
    unet_sd, vae_sd, te_sd = ldm_layout.from_ldm_state_dict(state_dict, arch["unet"], arch["vae"])
    del state_dict
    try:
        for model, sd, part_dtype in ((unet, unet_sd, dtype), (vae, vae_sd, vae_dtype), (te, te_sd, dtype)):
            _assign(model, sd, part_dtype)
    except RuntimeError as e:  # a converter/layout disagreement: should not happen after _check_layout
        raise ModelError(f"{path}: the weights do not fit the {arch_name} model: {str(e)[:500]}") from e
    return unet, vae, te, arch


# --------------------------------------------------------------------------- diffusers folder


def _load_diffusers(path: Path, dtype: torch.dtype, vae_dtype: torch.dtype):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    index = json.loads((path / "model_index.json").read_text())
    unet_json = path / "unet" / "config.json"
    unet_cfg = json.loads(unet_json.read_text()) if unet_json.is_file() else {}
    family = detect_diffusers_family(index, unet_cfg)
    if family.key not in ("sd1", "unknown") or family.inpainting:
        raise ModelError(f"{path}: {unsupported_message(family)}")
    for part in _PARTS:
        if not (path / part / "config.json").is_file():
            raise ModelError(
                f"{path}: the diffusers folder has no {part}/config.json; lorakit needs "
                "unet/, vae/ and text_encoder/ subfolders."
            )
    try:
        kw = {"local_files_only": True, "torch_dtype": dtype}
        unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", **kw)
        vae = AutoencoderKL.from_pretrained(path, subfolder="vae", **{**kw, "torch_dtype": vae_dtype})
        te = CLIPTextModel.from_pretrained(path / "text_encoder", **kw)
    except (OSError, ValueError, RuntimeError) as e:
        raise ModelError(f"{path}: could not load the diffusers model: {str(e)[:500]}") from e
    arch = {
        "unet": dict(unet.config),
        "vae": dict(vae.config),
        "text_encoder": json.loads(te.config.to_json_string(use_diff=False)),
    }
    # plain JSON (tuples -> lists), without the local path the libraries record
    arch = {p: {k: v for k, v in cfg.items() if k != "_name_or_path"} for p, cfg in arch.items()}
    return unet, vae, te, json.loads(json.dumps(arch, default=str))


# --------------------------------------------------------------------------- public


def move_model(model: torch.nn.Module, device, dtype: torch.dtype) -> torch.nn.Module:
    # weights already have `dtype`; casting again only for stray buffers (diffusers warns on .to(dtype))
    floats = [t for t in (*model.parameters(), *model.buffers()) if t.is_floating_point()]
    if any(t.dtype != dtype for t in floats):
        model = model.to(dtype=dtype)
    return model.to(device=device)


def model_kind(path: Path, expected: str = _EXPECTED) -> str:
    """ "diffusers" for a folder with model_index.json, "single_file" for a file; else a clear error."""
    if not path.exists():
        raise ModelError(f"{path}: base model not found. Expected {expected}.")
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise ModelError(f"{path}: a folder without model_index.json. Expected {expected}.")
        return "diffusers"
    return "single_file"


def base_family(path: Path, kind: str) -> Family | None:
    """The family of a diffusers folder or .safetensors (header only); None for a .ckpt (read it)."""
    if kind == "diffusers":
        index = json.loads((path / "model_index.json").read_text())
        unet_json = path / "unet" / "config.json"
        family = detect_diffusers_family(
            index, json.loads(unet_json.read_text()) if unet_json.is_file() else {}
        )
        if family.key == "sdxl":
            from lorakit.models.families.sdxl import scheduler_markers

            family = scheduler_markers(path, family)
        return family
    if is_safetensors(path):
        return detect_family(*read_keys_and_shapes(path))
    return None


def load_base_model(
    path: str | Path,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    vae_dtype: torch.dtype | None = None,
) -> BaseModel:
    """Load an SD1.x or SDXL base model: LDM/SGM .safetensors, .ckpt/.pt, or a diffusers folder.
    Other families are refused by name. Never downloads.

    The models arrive in `dtype` (the VAE in `vae_dtype`, default `dtype`) on `device`: a single
    file's tensors are cast and moved one by one as they are read, into models built on the meta
    device, so no float32 copy of the model is ever made on the CPU for an fp16/bf16 run."""
    path = Path(path).expanduser()
    vae_dtype = vae_dtype or dtype
    kind = model_kind(path)
    family = base_family(path, kind)
    loaded = None
    if family is None:  # a pickle checkpoint: map it once (weights only), detect from its keys
        loaded = read_state_dict(path, mmap=True)
        family = detect_family(loaded[0], {k: v.shape for k, v in loaded[0].items() if k in SHAPE_KEYS})
    if family.key == "sdxl" and not family.inpainting:
        from lorakit.models.families.sdxl import load_sdxl

        return load_sdxl(path, dtype, device, loaded=loaded, vae_dtype=vae_dtype)
    if kind == "diffusers":
        unet, vae, te, arch = _load_diffusers(path, dtype, vae_dtype)
    else:
        unet, vae, te, arch = _load_single_file(path, dtype, loaded, device, vae_dtype)
    unet, vae, te = (
        move_model(m, device, d).eval() for m, d in ((unet, dtype), (vae, vae_dtype), (te, dtype))
    )
    return BaseModel(
        unet=unet,
        vae=vae,
        text_encoders=(te,),
        tokenizers=(load_tokenizer(),),
        source=path,
        arch=arch,
        kind=kind,
    )


def save_ldm_checkpoint(
    path: str | Path,
    unet,
    vae,
    text_encoder,
    arch: dict | None = None,
    dtype: torch.dtype | None = None,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write an LDM-layout .safetensors (A1111/kohya-loadable), atomically. `arch` is stored as metadata,
    beside `metadata` (e.g. modelspec.resolution, see lorakit.models.defaults)."""
    from safetensors.torch import save_file

    path = Path(path)
    sd = ldm_layout.to_ldm_state_dict(unet.state_dict(), vae.state_dict(), text_encoder.state_dict())
    sd = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).detach().cpu().contiguous()
        for k, v in sd.items()
    }
    metadata = {"format": "pt", **(metadata or {})}
    if arch is not None:
        metadata[ARCH_METADATA_KEY] = json.dumps(arch)
    with atomic_path(path) as tmp:  # readers never see a half-written file
        save_file(sd, str(tmp), metadata=metadata)
    return path
