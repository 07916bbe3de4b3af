"""SD1.x behind the family seam: one CLIP-L text encoder, `lora_te_` / diffusers-path `lora_unet_` names."""

from __future__ import annotations

from lorakit.models.families.base import Conditioning, ModelFamily


class SD1Family(ModelFamily):
    key = "sd1"
    name = "SD1.x"
    default_resolution = (512, 512)
    default_max_bucket_reso = 1024
    bucket_step = 64  # three 2x downsamples of 8x latents
    text_encoder_parts = ("te",)
    base_model_version = "sd_v1"
    modelspec_architecture = "stable-diffusion-v1"
    modelspec_implementation = "diffusers"
    # kohya's SD1 UNet keeps diffusers' names, so LyCORIS's name list matches there
    lycoris_full_unet_paths = ("conv_in", "conv_out", "time_embedding.linear_1", "time_embedding.linear_2")

    def load(self, path, dtype, device, vae_dtype=None):
        from lorakit.models.loader import load_base_model

        return load_base_model(path, dtype, device, vae_dtype)

    def encode(self, base, captions, clip_skip, max_token_length):
        from lorakit.models.text import encode_tokens, tokenize

        te = base.text_encoder
        ids = tokenize(base.tokenizer, list(captions), max_token_length).to(te.device)
        return Conditioning(encode_tokens(te, ids, clip_skip))

    def tokenize(self, base, captions, max_token_length):
        from lorakit.models.text import tokenize

        return (tokenize(base.tokenizer, list(captions), max_token_length),)

    def encode_ids(self, base, ids, clip_skip):
        from lorakit.models.text import encode_tokens

        return Conditioning(encode_tokens(base.text_encoder, ids[0], clip_skip))

    def encode_prompts(self, base, prompt, negative, clip_skip):
        from lorakit.generate.prompt import encode_pair

        cond, uncond = encode_pair(base.tokenizer, base.text_encoder, prompt, negative, clip_skip)
        return Conditioning(cond), Conditioning(uncond)

    def predict(self, base, noisy, t, cond, size_ids):
        return base.unet(noisy, t, cond.context).sample

    def lora_targets(self, base, dim, alpha, conv_dim, conv_alpha, parts):
        from lorakit.network.targets import sd1_targets

        unet = base.unet if "unet" in parts else None
        return sd1_targets(
            unet, base.text_encoder if "te" in parts else None, dim, alpha, conv_dim, conv_alpha
        )

    def version_string(self, v_parameterization: bool) -> str:
        return "sd_v1_v" if v_parameterization else "sd_v1"

    def module_map(self, unet, text_encoders):
        from lorakit.network.targets import kohya_module_map

        return kohya_module_map(unet, text_encoders[0] if text_encoders else None)

    def norm_module_map(self, unet, text_encoders):
        from lorakit.network.targets import kohya_norm_map

        return kohya_norm_map(unet, text_encoders[0] if text_encoders else None)

    def name_aliases(self, unet):
        from lorakit.network.targets import ldm_unet_aliases

        return ldm_unet_aliases(unet)  # A1111-side tools name SD1 UNet modules by their LDM path

    def claims_lora(self, names, metadata):
        # kohya's SD1 and SD2 names are alike; only the metadata tells SD2 apart
        v2 = metadata.get("ss_v2") == "True" or metadata.get("ss_base_model_version", "").startswith("sd_v2")
        return not v2 and any(n.startswith(("lora_unet_", "lora_te_")) for n in names)


SD1 = SD1Family()
