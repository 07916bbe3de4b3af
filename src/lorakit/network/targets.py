"""Which modules kohya's `networks.lora` adapts, and the names it gives them.

UNet names are the diffusers module path with '.' -> '_' behind `lora_unet_` (kohya's SD1
UNet keeps diffusers' names). Text-encoder names come from a fixed kohya list
(`lora_te_text_model_encoder_layers_N_...`) rather than from the installed transformers'
module paths, which lost `text_model.` in transformers 5.6. Files made by tools that work on the
LDM UNet (A1111-side extractors, old kohya) name the same modules by their LDM path
(`lora_unet_input_blocks_1_1_proj_in`); `ldm_unet_aliases` maps those onto ours.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch.nn as nn

UNET_PREFIX = "lora_unet"
TE_PREFIX = "lora_te"

# Classes whose Linear / Conv2d children kohya targets (by class name, as kohya does).
UNET_ATTENTION_CLASSES = ("Transformer2DModel",)
UNET_CONV_CLASSES = ("ResnetBlock2D", "Downsample2D", "Upsample2D")  # LoCon, with conv_dim
TE_CHILDREN = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.out_proj",
    "mlp.fc1",
    "mlp.fc2",
)


def unet_module_name(path: str) -> str:
    """kohya name of the UNet module at diffusers path `path`."""
    return f"{UNET_PREFIX}_{path.replace('.', '_')}"


def te_module_name(layer: int, child: str, index: int | str = "") -> str:
    """kohya name of `child` (one of TE_CHILDREN) in text-encoder layer `layer`; `index` 1 or 2 for
    SDXL's two encoders (`lora_te1_`, `lora_te2_`), none for SD1's one (`lora_te_`)."""
    return f"{TE_PREFIX}{index}_text_model_encoder_layers_{layer}_{child.replace('.', '_')}"


@dataclass(frozen=True)
class Target:
    name: str  # kohya name, e.g. lora_unet_down_blocks_0_attentions_0_proj_in
    path: str  # module path inside the UNet / text encoder
    module: nn.Module
    rank: int
    alpha: float
    is_te: bool
    part: str = "unet"  # the model it lives in: "unet", "te" (SD1), "te1"/"te2" (SDXL)


def unet_targets(
    unet: nn.Module, dim: int, alpha: float, conv_dim: int | None = None, conv_alpha: float | None = None
) -> list[Target]:
    """kohya's UNet targets: every Linear/Conv2d in the transformer blocks; with conv_dim the
    ResNet and sampler convs too (3x3 ones at conv_dim/conv_alpha, the rest at dim/alpha)."""
    classes = UNET_ATTENTION_CLASSES + (UNET_CONV_CLASSES if conv_dim else ())
    conv_alpha = 1.0 if conv_alpha is None else conv_alpha  # kohya's default, not conv_dim
    found: dict[str, Target] = {}
    for parent_path, parent in unet.named_modules():
        if type(parent).__name__ not in classes:
            continue
        for child_path, child in parent.named_modules():
            if not isinstance(child, nn.Linear | nn.Conv2d) or not child_path:
                continue
            path = f"{parent_path}.{child_path}"
            is_3x3 = isinstance(child, nn.Conv2d) and child.kernel_size != (1, 1)
            if is_3x3 and not conv_dim:
                continue
            rank, a = (conv_dim, conv_alpha) if is_3x3 else (dim, alpha)
            name = unet_module_name(path)
            found.setdefault(name, Target(name, path, child, rank, a, is_te=False))
    return list(found.values())


def te_layers(text_encoder: nn.Module) -> tuple[str, nn.ModuleList]:
    """The encoder layer list and its path, with or without transformers' `text_model` wrapper."""
    inner = getattr(text_encoder, "text_model", text_encoder)
    path = "text_model.encoder.layers" if inner is not text_encoder else "encoder.layers"
    return path, inner.encoder.layers


def te_targets(text_encoder: nn.Module, dim: int, alpha: float) -> list[Target]:
    layers_path, layers = te_layers(text_encoder)
    out = []
    for i, layer in enumerate(layers):
        for child in TE_CHILDREN:
            module = layer.get_submodule(child)
            name = te_module_name(i, child)
            out.append(Target(name, f"{layers_path}.{i}.{child}", module, dim, alpha, is_te=True, part="te"))
    return out


def sd1_targets(
    unet: nn.Module | None,
    text_encoder: nn.Module | None,
    dim: int,
    alpha: float,
    conv_dim: int | None = None,
    conv_alpha: float | None = None,
) -> list[Target]:
    """kohya's SD1.x network: the UNet's targets (when `unet` is given), then the text encoder's."""
    out = unet_targets(unet, dim, alpha, conv_dim, conv_alpha) if unet is not None else []
    return out + (te_targets(text_encoder, dim, alpha) if text_encoder is not None else [])


def kohya_module_map(unet: nn.Module | None, text_encoder: nn.Module | None) -> dict[str, nn.Module]:
    """kohya name -> Linear/Conv2d for every module a LoRA file may adapt: all of the UNet's (LyCORIS
    presets reach conv_in, time_embedding, ...) and the text encoder's TE_CHILDREN."""
    out: dict[str, nn.Module] = {}
    if unet is not None:
        for path, mod in unet.named_modules():
            if isinstance(mod, nn.Linear | nn.Conv2d):
                out[unet_module_name(path)] = mod
    if text_encoder is not None:
        _, layers = te_layers(text_encoder)
        for i, layer in enumerate(layers):
            for child in TE_CHILDREN:
                out[te_module_name(i, child)] = layer.get_submodule(child)
    return out


# LyCORIS `train_norm` adapts these (its NormModule: `w_norm`, `b_norm`); they are not in module_map,
# whose modules have matrix / conv-kernel weights.
NORM_TYPES = (nn.GroupNorm, nn.LayerNorm)


def te_norm_map(text_encoder: nn.Module, index: int | str = "") -> dict[str, nn.Module]:
    """kohya name -> LayerNorm of a text encoder (`lora_te_text_model_encoder_layers_N_layer_norm1`,
    `..._final_layer_norm`), the names A1111 gives them."""
    _, layers = te_layers(text_encoder)
    out = {
        f"{TE_PREFIX}{index}_text_model_encoder_layers_{i}_{child}": getattr(layer, child)
        for i, layer in enumerate(layers)
        for child in ("layer_norm1", "layer_norm2")
        if isinstance(getattr(layer, child, None), NORM_TYPES)
    }
    final = getattr(getattr(text_encoder, "text_model", text_encoder), "final_layer_norm", None)
    if isinstance(final, NORM_TYPES):
        out[f"{TE_PREFIX}{index}_text_model_final_layer_norm"] = final
    return out


def kohya_norm_map(unet: nn.Module | None, text_encoder: nn.Module | None) -> dict[str, nn.Module]:
    """kohya name -> GroupNorm/LayerNorm of the SD1 UNet (diffusers paths, as kohya_module_map) and
    of its text encoder: where LyCORIS norm modules (`w_norm`, `b_norm`) apply."""
    out = {}
    if unet is not None:
        out = {unet_module_name(p): m for p, m in unet.named_modules() if isinstance(m, NORM_TYPES)}
    return out | (te_norm_map(text_encoder) if text_encoder is not None else {})


def ldm_unet_aliases(unet: nn.Module) -> dict[str, str]:
    """LDM-style kohya name (`lora_unet_input_blocks_1_1_proj_in`, `lora_unet_middle_block_0_in_layers_2`)
    -> our diffusers-style name, for every Linear/Conv2d (and norm layer) of the UNet, as A1111 and
    ComfyUI resolve them."""
    from ..models.ldm_layout import unet_module_paths_to_ldm

    paths = [p for p, m in unet.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d, *NORM_TYPES))]
    return {unet_module_name(ldm): unet_module_name(p) for p, ldm in unet_module_paths_to_ldm(paths).items()}


# --------------------------------------------------------------------------- SDXL
# kohya trains SDXL on its own SGM-layout UNet, so its SDXL names are the SGM (LDM) module paths
# (`lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`), not diffusers' as for SD1; the two
# text encoders are `lora_te1_` (CLIP-L) and `lora_te2_` (bigG), both in HF layout.


def sdxl_unet_targets(
    unet: nn.Module, dim: int, alpha: float, conv_dim: int | None = None, conv_alpha: float | None = None
) -> list[Target]:
    """kohya's SDXL UNet targets (722; 788 with conv_dim), named by SGM path; `path` stays the module's
    path in our diffusers UNet. Same selection rules as SD1's unet_targets."""
    targets = unet_targets(unet, dim, alpha, conv_dim, conv_alpha)
    # all modules: the block numbering is read from the resnets' paths, which are not default targets
    sgm = _sgm_unet_paths(unet)
    missing = [t.path for t in targets if t.path not in sgm]
    if missing:
        raise ValueError(f"UNet module {missing[0]!r} has no SGM name")
    return [
        Target(unet_module_name(sgm[t.path]), t.path, t.module, t.rank, t.alpha, is_te=False) for t in targets
    ]


def sdxl_te_module_name(index: int, layer: int, child: str) -> str:
    """kohya name of `child` in layer `layer` of SDXL text encoder `index` (1 = CLIP-L, 2 = bigG)."""
    return te_module_name(layer, child, index)


def sdxl_te_targets(text_encoder: nn.Module, index: int, dim: int, alpha: float) -> list[Target]:
    """kohya's targets in SDXL text encoder `index` (72 for CLIP-L, 192 for bigG)."""
    layers_path, layers = te_layers(text_encoder)
    return [
        Target(
            sdxl_te_module_name(index, i, c),
            f"{layers_path}.{i}.{c}",
            layer.get_submodule(c),
            dim,
            alpha,
            True,
            part=f"te{index}",
        )
        for i, layer in enumerate(layers)
        for c in TE_CHILDREN
    ]


def is_te_module(name: str) -> bool:
    """True for text-encoder module names: SD1's `lora_te_`, SDXL's `lora_te1_` / `lora_te2_`."""
    return re.match(rf"{TE_PREFIX}\d*_", name) is not None


def _sgm_unet_paths(unet: nn.Module, types: tuple = (nn.Linear, nn.Conv2d)) -> dict[str, str]:
    """diffusers module path -> SGM path for every module of `types` of an SDXL UNet that has one."""
    from ..models.ldm_layout import unet_module_paths_to_ldm

    return unet_module_paths_to_ldm([p for p, m in unet.named_modules() if isinstance(m, types)])


def sdxl_module_map(unet: nn.Module | None, text_encoders=()) -> dict[str, nn.Module]:
    """kohya name -> Linear/Conv2d for every module an SDXL LoRA may adapt: each of the UNet's under
    its SGM name (LyCORIS presets reach conv_in, time_embed, label_emb), and TE_CHILDREN of each text
    encoder under `lora_te1_` / `lora_te2_` (None: leave that encoder out)."""
    out: dict[str, nn.Module] = {}
    if unet is not None:
        for path, sgm in _sgm_unet_paths(unet).items():
            out[unet_module_name(sgm)] = unet.get_submodule(path)
    for index, te in enumerate(text_encoders, start=1):
        if te is None:
            continue
        _, layers = te_layers(te)
        for i, layer in enumerate(layers):
            for child in TE_CHILDREN:
                out[sdxl_te_module_name(index, i, child)] = layer.get_submodule(child)
    return out


def sdxl_norm_map(unet: nn.Module | None, text_encoders=()) -> dict[str, nn.Module]:
    """kohya name -> GroupNorm/LayerNorm of an SDXL UNet (SGM names: `lora_unet_input_blocks_1_0_in_layers_0`)
    and of each text encoder (`lora_te1_`/`lora_te2_`): where LyCORIS norm modules apply."""
    out: dict[str, nn.Module] = {}
    if unet is not None:
        for path, sgm in _sgm_unet_paths(unet, NORM_TYPES).items():
            out[unet_module_name(sgm)] = unet.get_submodule(path)
    for index, te in enumerate(text_encoders, start=1):
        if te is not None:
            out |= te_norm_map(te, index)
    return out


def sdxl_diffusers_aliases(unet: nn.Module) -> dict[str, str]:
    """diffusers-path name (`lora_unet_down_blocks_1_attentions_0_proj_in`, as diffusers-side tools
    write SDXL LoRAs) -> kohya's SGM name (`lora_unet_input_blocks_4_1_proj_in`), for every
    Linear/Conv2d and norm layer: what kohya's convert_diffusers_to_sai_if_needed does on loading."""
    paths = _sgm_unet_paths(unet, (nn.Linear, nn.Conv2d, *NORM_TYPES))
    return {unet_module_name(p): unet_module_name(sgm) for p, sgm in paths.items() if p != sgm}
