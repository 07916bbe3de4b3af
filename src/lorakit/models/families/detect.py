"""Which model family a base checkpoint is, from its key names (and a few shapes), without its weights.

The marker keys are diffusers' (0.42 loaders/single_file_utils.py `CHECKPOINT_KEY_NAMES` and
`infer_diffusers_model_type`) plus ComfyUI's SDXL prediction markers (`v_pred`, `ztsnr`,
`edm_vpred.sigma_max`). The SD1/SD2/SDXL tests use key prefixes rather than diffusers' exact deep keys
(`output_blocks.11`, `resblocks.9`) so that tiny test models of those layouts are recognised too.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

LDM_UNET = "model.diffusion_model."
UNET_IN = LDM_UNET + "input_blocks.0.0.weight"  # in-channels: 4 text-to-image, 9 inpainting, 8 pix2pix
SD2_ATTN2_K = LDM_UNET + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"  # in-dim 1024 on SD2
SD1_TE = "cond_stage_model.transformer."  # CLIP-L, HF layout
SD2_TE = "cond_stage_model.model."  # OpenCLIP-H, OpenCLIP layout
SDXL_TE1 = "conditioner.embedders.0.transformer."  # CLIP-L, HF layout
SDXL_TE2 = "conditioner.embedders.1.model."  # OpenCLIP bigG, OpenCLIP layout
REFINER_TE = "conditioner.embedders.0.model."  # the refiner has only bigG, at index 0

# DiT checkpoints: the key without the optional model.diffusion_model. prefix
SD3_ADALN = "joint_blocks.0.context_block.adaLN_modulation.1.bias"
SD35_LARGE = "joint_blocks.37.x_block.mlp.fc1.weight"
SD3_POS_EMBED = "pos_embed"
FLUX_BLOCK = "double_blocks.0.img_attn.norm.key_norm.scale"
FLUX_GUIDANCE = "guidance_in.in_layer.bias"  # dev (and its Fill/Depth/Canny) has it, schnell not
FLUX_IMG_IN = "img_in.weight"  # in-dim 64 (text-to-image), 384 (Fill), 128 (Depth/Canny)
CHROMA = "distilled_guidance_layer.in_proj.bias"
FLUX2 = "single_stream_modulation.lin.weight"
Z_IMAGE = "layers.0.adaLN_modulation.0.weight"
LUMINA2 = "cap_embedder.0.weight"
QWEN_IMAGE = "txt_in.text_norm.weight"
HIDREAM = "double_stream_blocks.0.block.adaLN_modulation.1.bias"
WAN = "head.modulation"

# The keys whose shape detection reads (everything else is by name only)
SHAPE_KEYS = (UNET_IN, SD2_ATTN2_K) + tuple(
    p + k for p in ("", LDM_UNET) for k in (SD3_ADALN, SD3_POS_EMBED, FLUX_IMG_IN)
)


@dataclass(frozen=True)
class Family:
    key: str  # "sd1", "sd2", "sdxl", "sdxl_refiner", "playground_v2_5", "flux1_dev", ..., "unknown"
    name: str  # what users call it: "SD1.x", "SDXL base", "FLUX.1 dev", ...
    inpainting: bool = False
    v_pred: bool = False  # marked v-prediction (SDXL `v_pred` / `edm_vpred.*` marker keys)
    zero_terminal_snr: bool = False  # SDXL `ztsnr` marker key
    edm: bool = False  # EDM noise schedule (Playground v2.5, `edm_vpred.*`)

    @property
    def label(self) -> str:
        """The name with its variant: 'SDXL base (v-prediction, zero terminal SNR)'."""
        name = f"{self.name} inpainting" if self.inpainting else self.name
        notes = [
            n
            for n, on in (
                ("EDM v-prediction" if self.edm else "v-prediction", self.v_pred),
                ("zero terminal SNR", self.zero_terminal_snr),
                ("EDM", self.edm and not self.v_pred and self.key != "playground_v2_5"),
            )
            if on
        ]
        return f"{name} ({', '.join(notes)})" if notes else name


UNKNOWN = Family("unknown", "unknown")


def _in_channels(shapes: Mapping[str, Sequence[int]]) -> int | None:
    shape = shapes.get(UNET_IN)
    return int(shape[1]) if shape is not None and len(shape) > 1 else None


def _dit_key(keys: set[str], name: str) -> str | None:
    """`name` as the file spells it (bare or behind model.diffusion_model.), or None."""
    return next((k for k in (name, LDM_UNET + name) if k in keys), None)


def _detect_unet_family(keys: set[str], shapes: Mapping[str, Sequence[int]]) -> Family | None:
    def has(prefix):
        return any(k.startswith(prefix) for k in keys)

    in_ch = _in_channels(shapes)
    if in_ch == 8:
        return Family("instruct_pix2pix", "InstructPix2Pix")
    inpainting = in_ch == 9
    if has(SDXL_TE2):
        if "edm_mean" in keys:
            return Family("playground_v2_5", "Playground v2.5", inpainting=inpainting, edm=True)
        edm_v = "edm_vpred.sigma_max" in keys
        return Family(
            "sdxl",
            "SDXL base",
            inpainting=inpainting,
            v_pred="v_pred" in keys or edm_v,
            zero_terminal_snr="ztsnr" in keys,
            edm=edm_v,
        )
    if has(REFINER_TE):
        return Family("sdxl_refiner", "SDXL refiner", inpainting=inpainting)
    attn2_k = shapes.get(SD2_ATTN2_K)
    if has(SD2_TE) or (attn2_k is not None and attn2_k[-1] == 1024):
        return Family("sd2", "SD2.x", inpainting=inpainting)
    if has(LDM_UNET + "input_blocks.") or has(SD1_TE):
        return Family("sd1", "SD1.x", inpainting=inpainting)
    return None


def _detect_dit_family(keys: set[str], shapes: Mapping[str, Sequence[int]]) -> Family | None:
    def key(name):
        return _dit_key(keys, name)

    if (k := key(SD3_ADALN)) and tuple(shapes.get(k, ()))[-1:] == (9216,):
        pos = shapes.get(key(SD3_POS_EMBED) or "", ())
        if len(pos) > 1 and pos[1] == 147456:
            return Family("sd35_medium", "SD3.5 medium")
        return Family("sd3", "SD3 medium")
    if key(SD35_LARGE):
        return Family("sd35_large", "SD3.5 large")
    if key(FLUX2):
        return Family("flux2", "FLUX.2")
    if key(CHROMA):
        return Family("chroma", "Chroma")
    if key(FLUX_BLOCK):
        if not key(FLUX_GUIDANCE):
            return Family("flux1_schnell", "FLUX.1 schnell")
        img_in = shapes.get(key(FLUX_IMG_IN) or "", ())
        in_dim = img_in[1] if len(img_in) > 1 else None
        if in_dim == 384:
            return Family("flux1_fill", "FLUX.1 Fill")
        if in_dim == 128:
            return Family("flux1_control", "FLUX.1 Depth/Canny")
        return Family("flux1_dev", "FLUX.1 dev")
    if key(Z_IMAGE):
        return Family("z_image", "Z-Image")
    if key(LUMINA2):
        return Family("lumina2", "Lumina 2")
    if key(WAN):
        return Family("wan", "Wan")
    if key(QWEN_IMAGE):
        return Family("qwen_image", "Qwen-Image")
    if key(HIDREAM):
        return Family("hidream", "HiDream")
    return None


def detect_family(keys: Iterable[str], shapes: Mapping[str, Sequence[int]] | None = None) -> Family:
    """The family of a base-model state dict from its keys; `shapes` needs only the SHAPE_KEYS present
    (missing shapes make detection fall back to names: an inpainting SD1 then reads as SD1)."""
    keys = set(keys)
    shapes = {k: tuple(v) for k, v in (shapes or {}).items()}
    # DiT families first: some (FLUX in ComfyUI's layout) put their blocks under model.diffusion_model.
    return _detect_dit_family(keys, shapes) or _detect_unet_family(keys, shapes) or UNKNOWN


def read_keys_and_shapes(path: str | Path) -> tuple[list[str], dict[str, tuple[int, ...]]]:
    """Key names and the SHAPE_KEYS' shapes of a checkpoint. A .safetensors file is read from its
    header only (no tensor is loaded); a .ckpt goes through the weights-only reader."""
    from lorakit.models.checkpoint import is_safetensors, read_state_dict, safetensors_header

    path = Path(path)
    if is_safetensors(path):
        header = safetensors_header(path)
        return header.keys, {k: header.shapes[k] for k in SHAPE_KEYS if k in header.shapes}
    state_dict, _ = read_state_dict(path)
    return list(state_dict), {k: tuple(state_dict[k].shape) for k in SHAPE_KEYS if k in state_dict}


def detect_file_family(path: str | Path) -> Family:
    return detect_family(*read_keys_and_shapes(path))


def unsupported_message(family: Family) -> str:
    """Why lorakit refuses a base of this family, naming it."""
    if family.key == "playground_v2_5" or family.edm:
        return (
            f"{family.label}: its EDM noise schedule is not supported yet. lorakit trains SD1.x and SDXL "
            "bases (SDXL 1.0, Pony, Illustrious, NoobAI eps and v-pred)."
        )
    return f"{family.label}: not supported yet. lorakit trains SD1.x and SDXL bases."


# diffusers pipeline class name (model_index.json `_class_name`) prefix -> family
_PIPELINES = (
    ("StableDiffusionXLInpaint", Family("sdxl", "SDXL base", inpainting=True)),
    ("StableDiffusionXL", Family("sdxl", "SDXL base")),
    ("StableDiffusion3", Family("sd3", "SD3")),
    ("StableDiffusionInpaint", Family("sd1", "SD1.x", inpainting=True)),
    ("StableDiffusionInstructPix2Pix", Family("instruct_pix2pix", "InstructPix2Pix")),
    ("Flux2", Family("flux2", "FLUX.2")),
    ("FluxFill", Family("flux1_fill", "FLUX.1 Fill")),
    ("Flux", Family("flux1", "FLUX.1")),
    ("Chroma", Family("chroma", "Chroma")),
    ("Lumina2", Family("lumina2", "Lumina 2")),
    ("ZImage", Family("z_image", "Z-Image")),
    ("QwenImage", Family("qwen_image", "Qwen-Image")),
    ("HiDream", Family("hidream", "HiDream")),
    ("Wan", Family("wan", "Wan")),
)


def detect_diffusers_family(model_index: Mapping, unet_config: Mapping | None = None) -> Family:
    """The family of a diffusers folder from its model_index.json (and unet/config.json for SD2)."""
    family = _diffusers_family(model_index, unet_config or {})
    if (unet_config or {}).get("in_channels") == 9 and not family.inpainting:
        family = replace(family, inpainting=True)
    return family


def _diffusers_family(model_index: Mapping, unet_config: Mapping) -> Family:
    cls = str(model_index.get("_class_name", ""))
    if cls.startswith("StableDiffusionXL") and model_index.get("text_encoder", "") in (None, [None, None]):
        return Family("sdxl_refiner", "SDXL refiner")
    if "text_encoder_2" in model_index and not cls.startswith(("StableDiffusion3", "Flux", "HiDream")):
        return Family("sdxl", "SDXL base")
    for prefix, family in _PIPELINES:
        if cls.startswith(prefix):
            return family
    if unet_config.get("cross_attention_dim") == 1024 or unet_config.get("use_linear_projection"):
        return Family("sd2", "SD2.x")
    return Family("sd1", "SD1.x") if cls.startswith("StableDiffusion") or not cls else UNKNOWN
