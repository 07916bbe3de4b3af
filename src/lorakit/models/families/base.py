"""The model-family seam: what the trainer, merger and generator ask of a base model family.

One module per family (sd1.py, sdxl.py) implements `ModelFamily`; `family_spec(key)` finds it. The
training loop only calls these methods, so a new family (FLUX.1) is a new module plus one line in
the family table in `_families`, never a branch in the loop (or in merge / inspect).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from lorakit.models.loader import BaseModel
    from lorakit.network.targets import Target


@dataclass
class Conditioning:
    """What the denoiser is conditioned on besides the noisy latents and the timestep.

    context: [B, T, D] per-token text states (cross-attention); pooled: [B, P] a pooled text vector
    (SDXL's bigG projection; None for SD1). Families add their per-image extras (SDXL's size/crop
    numbers) from the batch in `predict`."""

    context: torch.Tensor
    pooled: torch.Tensor | None = None

    def to(self, device=None, dtype=None) -> Conditioning:
        def move(t):
            return None if t is None else t.to(device=device, dtype=dtype)

        return Conditioning(move(self.context), move(self.pooled))

    def rows(self) -> list[Conditioning]:
        """One Conditioning per batch row (for caching per caption)."""
        n = self.context.shape[0]
        return [
            Conditioning(self.context[i], None if self.pooled is None else self.pooled[i]) for i in range(n)
        ]

    @staticmethod
    def stack(rows: Sequence[Conditioning]) -> Conditioning:
        pooled = None if rows[0].pooled is None else torch.stack([r.pooled for r in rows])
        return Conditioning(torch.stack([r.context for r in rows]), pooled)


class ModelFamily:
    """The interface a family module implements (as a singleton instance)."""

    key: str  # "sd1", "sdxl": Family.key of the detected checkpoint
    name: str  # "SD1.x", "SDXL"
    default_resolution: tuple[int, int]  # (w, h) when the checkpoint names none
    default_max_bucket_reso: int  # kohya's 1024 suits SD1; SDXL users raise it to 2048
    bucket_step: int  # the smallest bucket_reso_steps the UNet's downsampling allows
    text_encoder_parts: tuple[str, ...]  # "te" (SD1) or "te1", "te2" (SDXL): LoRA target parts
    base_model_version: str  # kohya's ss_base_model_version (eps)
    modelspec_architecture: str  # "stable-diffusion-v1", "stable-diffusion-xl-v1-base"
    modelspec_implementation: str
    # UNet module paths LyCORIS's `full` preset adds by name (lycoris/config.py FULL_UNET_NAMES) where
    # kohya's UNet for this family has them; trained at network_dim (Linear) / conv_dim (3x3 conv)
    lycoris_full_unet_paths: tuple[str, ...] = ()

    def load(self, path, dtype: torch.dtype, device, vae_dtype: torch.dtype | None = None) -> BaseModel:
        """The base in `dtype` (its VAE in `vae_dtype`, default `dtype`) on `device`."""
        raise NotImplementedError

    def text_encoders(self, base: BaseModel) -> dict[str, torch.nn.Module]:
        """part -> text encoder, in text_encoder_parts order."""
        return dict(zip(self.text_encoder_parts, base.text_encoders))

    def encode(
        self, base: BaseModel, captions: Sequence[str], clip_skip: int | None, max_token_length: int | None
    ) -> Conditioning:
        raise NotImplementedError

    def tokenize(
        self, base: BaseModel, captions: Sequence[str], max_token_length: int | None
    ) -> tuple[torch.Tensor, ...] | None:
        """`encode` in two halves, for the training step: token ids (CPU, one tensor per text encoder),
        made before the step so that their copy to the GPU does not block; None where the family has
        no such split (the step then calls `encode`)."""
        return None

    def encode_ids(
        self, base: BaseModel, ids: tuple[torch.Tensor, ...], clip_skip: int | None
    ) -> Conditioning:
        """`encode` from `tokenize`'s ids, already on the text encoders' device."""
        raise NotImplementedError

    def encode_prompts(
        self, base: BaseModel, prompt: str, negative: str, clip_skip: int | None
    ) -> tuple[Conditioning, Conditioning]:
        """(cond, uncond) for drawing, as A1111 encodes a prompt and a negative prompt for this family:
        emphasis, BREAK, 75-token chunks (lorakit.generate.prompt); no <lora:> tags left in them."""
        raise NotImplementedError

    def predict(
        self,
        base: BaseModel,
        noisy: torch.Tensor,
        t: torch.Tensor,
        cond: Conditioning,
        size_ids: torch.Tensor,
    ) -> torch.Tensor:
        """The denoiser's output. size_ids [B, 6]: (original h, w, crop top, left, target h, w) per image."""
        raise NotImplementedError

    def lora_targets(
        self,
        base: BaseModel,
        dim: int,
        alpha: float,
        conv_dim: int | None,
        conv_alpha: float | None,
        parts: set[str],
    ) -> list[Target]:
        """kohya's targets in `parts` ("unet" and text_encoder_parts), with kohya's names."""
        raise NotImplementedError

    def version_string(self, v_parameterization: bool) -> str:
        """ss_base_model_version: kohya marks v-pred SD1/SD2 there, SDXL only in modelspec."""
        return self.base_model_version

    # --- applying LoRA files (merge) and telling them apart (inspect) ---------------------
    def module_map(
        self, unet: torch.nn.Module | None, text_encoders: Sequence[torch.nn.Module | None]
    ) -> dict[str, torch.nn.Module]:
        """kohya name -> Linear/Conv2d for every module a LoRA file of this family may adapt (wider
        than lora_targets: LyCORIS presets reach more). A part given as None is left out."""
        raise NotImplementedError

    def norm_module_map(
        self, unet: torch.nn.Module | None, text_encoders: Sequence[torch.nn.Module | None]
    ) -> dict[str, torch.nn.Module]:
        """kohya name -> GroupNorm/LayerNorm, where LyCORIS norm modules (`w_norm`, `b_norm`) apply;
        none by default (a file with norm modules is then refused as naming unknown modules)."""
        return {}

    def name_aliases(self, unet: torch.nn.Module) -> dict[str, str]:
        """Other tools' names for the UNet's modules -> module_map's names (resolved on merging)."""
        return {}

    def claims_lora(self, names: Sequence[str], metadata: dict[str, str]) -> bool:
        """Whether a LoRA file with these module names / metadata was made for this family. Asked in
        `_families()` order, so a family may claim what a more specific one (earlier) did not."""
        raise NotImplementedError


def _families() -> dict[str, ModelFamily]:
    from . import sd1, sdxl

    # the most specific first: SD1 claims any kohya names that SDXL did not
    return {sdxl.SDXL.key: sdxl.SDXL, sd1.SD1.key: sd1.SD1}


def family_spec(key: str) -> ModelFamily:
    """The family module for a detected Family.key ("sd1", "sdxl")."""
    families = _families()
    if key not in families:
        raise KeyError(f"no lorakit model family {key!r}")
    return families[key]


def lora_family(names: Sequence[str], metadata: dict[str, str]) -> ModelFamily | None:
    """The lorakit family a LoRA file (its module names and metadata) was made for; None if none."""
    return next((f for f in _families().values() if f.claims_lora(names, metadata)), None)
