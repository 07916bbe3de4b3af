"""Family detection from a checkpoint's keys (sdxl.md section 5), and the loader's refusal naming it."""

from __future__ import annotations

import json

import pytest
import safetensors
import torch
from safetensors.torch import save_file

from lorakit.errors import ModelError
from lorakit.models.families import detect
from lorakit.models.families.detect import detect_diffusers_family, detect_family, detect_file_family
from lorakit.models.loader import load_base_model

_REAL_SAFE_OPEN = safetensors.safe_open
U = "model.diffusion_model."
UNET_IN = U + "input_blocks.0.0.weight"
SD1 = {
    UNET_IN: [4, 4, 1, 1],
    U + "output_blocks.11.0.skip_connection.weight": [4, 4, 1, 1],
    "cond_stage_model.transformer.text_model.embeddings.position_embedding.weight": [4, 4],
    "first_stage_model.decoder.conv_in.weight": [4, 4, 1, 1],
}
SD2 = {
    UNET_IN: [4, 4, 1, 1],
    U + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight": [4, 1024],
    "cond_stage_model.model.token_embedding.weight": [4, 4],
}
SDXL = {
    UNET_IN: [4, 4, 1, 1],
    "conditioner.embedders.0.transformer.text_model.embeddings.position_embedding.weight": [4, 4],
    "conditioner.embedders.1.model.transformer.resblocks.9.mlp.c_proj.bias": [4],
    "conditioner.embedders.1.model.text_projection": [4, 4],
}
REFINER = {
    UNET_IN: [4, 4, 1, 1],
    "conditioner.embedders.0.model.transformer.resblocks.9.mlp.c_proj.bias": [4],
    "conditioner.embedders.0.model.text_projection": [4, 4],
}
SD3 = {"joint_blocks.0.context_block.adaLN_modulation.1.bias": [9216]}
FLUX = {"double_blocks.0.img_attn.norm.key_norm.scale": [4], "img_in.weight": [4, 64]}
GUIDANCE = {"guidance_in.in_layer.bias": [4]}


def _prefixed(keys: dict) -> dict:
    return {U + k: v for k, v in keys.items()}


# (id, keys -> shapes, family key, what the label/refusal must say)
CASES = [
    ("sd1", SD1, "sd1", "SD1.x"),
    ("sd1_inpaint", {**SD1, UNET_IN: [4, 9, 1, 1]}, "sd1", "SD1.x inpainting"),
    ("sd2", SD2, "sd2", "SD2.x: not supported yet"),
    ("sd2_inpaint", {**SD2, UNET_IN: [4, 9, 1, 1]}, "sd2", "SD2.x inpainting: not supported yet"),
    ("sdxl", SDXL, "sdxl", "this SDXL base checkpoint has no 'first_stage_model.*' weights"),
    (
        "sdxl_vpred",
        {**SDXL, "v_pred": [0], "ztsnr": [0]},
        "sdxl",
        "this SDXL base (v-prediction, zero terminal SNR) checkpoint has no 'first_stage_model.*' weights",
    ),
    (
        "sdxl_edm_vpred",
        {**SDXL, "edm_vpred.sigma_max": [], "edm_vpred.sigma_min": []},
        "sdxl",
        "SDXL base (EDM v-prediction)",
    ),
    ("sdxl_inpaint", {**SDXL, UNET_IN: [4, 9, 1, 1]}, "sdxl", "SDXL base inpainting: not supported yet"),
    ("sdxl_refiner", REFINER, "sdxl_refiner", "SDXL refiner: not supported yet"),
    (
        "playground",
        {**SDXL, "edm_mean": [1, 4, 1, 1], "edm_std": [1, 4, 1, 1]},
        "playground_v2_5",
        "Playground v2.5",
    ),
    ("pix2pix", {**SD1, UNET_IN: [4, 8, 1, 1]}, "instruct_pix2pix", "InstructPix2Pix: not supported yet"),
    ("sd3", {**SD3, "pos_embed": [1, 36864, 1]}, "sd3", "SD3 medium: not supported yet"),
    ("sd35_medium", _prefixed({**SD3, "pos_embed": [1, 147456, 1]}), "sd35_medium", "SD3.5 medium"),
    (
        "sd35_large",
        _prefixed({"joint_blocks.37.x_block.mlp.fc1.weight": [4, 4]}),
        "sd35_large",
        "SD3.5 large",
    ),
    ("flux_dev", {**FLUX, **GUIDANCE}, "flux1_dev", "FLUX.1 dev: not supported yet"),
    ("flux_dev_comfy", _prefixed({**FLUX, **GUIDANCE}), "flux1_dev", "FLUX.1 dev: not supported yet"),
    ("flux_schnell", FLUX, "flux1_schnell", "FLUX.1 schnell: not supported yet"),
    ("flux_fill", {**FLUX, **GUIDANCE, "img_in.weight": [4, 384]}, "flux1_fill", "FLUX.1 Fill"),
    ("flux_depth", {**FLUX, **GUIDANCE, "img_in.weight": [4, 128]}, "flux1_control", "FLUX.1 Depth/Canny"),
    ("chroma", {**FLUX, "distilled_guidance_layer.in_proj.bias": [4]}, "chroma", "Chroma: not supported yet"),
    ("flux2", {"single_stream_modulation.lin.weight": [4, 4], **FLUX}, "flux2", "FLUX.2: not supported yet"),
    ("lumina2", {"cap_embedder.0.weight": [4]}, "lumina2", "Lumina 2: not supported yet"),
    (
        "z_image",
        _prefixed({"layers.0.adaLN_modulation.0.weight": [4, 4], "cap_embedder.0.weight": [4]}),
        "z_image",
        "Z-Image: not supported yet",
    ),
    ("qwen_image", {"txt_in.text_norm.weight": [4]}, "qwen_image", "Qwen-Image: not supported yet"),
    ("hidream", {"double_stream_blocks.0.block.adaLN_modulation.1.bias": [4]}, "hidream", "HiDream"),
    ("wan", _prefixed({"head.modulation": [1, 2, 4]}), "wan", "Wan: not supported yet"),
]


class _HeaderOnly:
    """safe_open without get_tensor: reading a tensor fails the test."""

    def __init__(self, *args, **kwargs):
        self._file = _REAL_SAFE_OPEN(*args, **kwargs)

    def __enter__(self):
        self._open = self._file.__enter__()
        return self

    def __exit__(self, *exc):
        return self._file.__exit__(*exc)

    def keys(self):
        return self._open.keys()

    def get_slice(self, key):
        return self._open.get_slice(key)

    def metadata(self):
        return self._open.metadata()


def _write(path, shapes: dict):
    save_file({k: torch.zeros(v, dtype=torch.int8) for k, v in shapes.items()}, str(path))
    return path


@pytest.mark.parametrize(("name", "shapes", "family", "said"), CASES, ids=[c[0] for c in CASES])
def test_family_from_safetensors_header(tmp_path, monkeypatch, name, shapes, family, said):
    path = _write(tmp_path / f"{name}.safetensors", shapes)
    monkeypatch.setattr(safetensors, "safe_open", _HeaderOnly)  # detection must not read a tensor
    found = detect_file_family(path)
    assert found.key == family
    assert found.label in said
    assert detect_family(shapes, shapes) == found  # same answer from an in-memory state dict
    if family == "sd1" and not found.inpainting:
        return  # loads (these fake keys then fail the completeness check, which names no family)
    monkeypatch.setattr(
        "lorakit.models.loader.read_state_dict", lambda p: pytest.fail("weights read to refuse a file")
    )
    with pytest.raises(ModelError) as e:
        load_base_model(path)
    assert said in str(e.value) and f"{name}.safetensors" in str(e.value)


def test_markers_and_labels():
    plain = detect_family(SDXL)
    assert (plain.v_pred, plain.zero_terminal_snr, plain.label) == (False, False, "SDXL base")
    vpred = detect_family({**SDXL, "v_pred": [0]})
    assert (vpred.v_pred, vpred.zero_terminal_snr) == (True, False)
    assert vpred.label == "SDXL base (v-prediction)"
    # the markers mean nothing outside SDXL (only ComfyUI's SDXL reads them)
    assert detect_family({**SD1, "v_pred": [0]}).v_pred is False
    # SD2 by the 1024-wide cross-attention alone (a file whose TE was stripped)
    assert detect_family(SD2, SD2).key == "sd2"
    assert detect_family([U + "input_blocks.2.1.transformer_blocks.0.attn2.to_k.weight"], SD2).key == "sd2"
    # without shapes, inpainting cannot be seen: an SD1 file then reads as plain SD1
    assert detect_family({**SD1, UNET_IN: [4, 9, 1, 1]}).inpainting is False
    assert detect_family(["down_blocks.0.attentions.0.proj_in.weight"]) == detect.UNKNOWN
    assert detect_family(["lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"]).key == "unknown"


def test_family_from_ckpt(tmp_path):
    path = tmp_path / "xl.ckpt"
    shapes = {**SDXL, UNET_IN: [4, 9, 1, 1], "v_pred": [0]}
    torch.save({"state_dict": {k: torch.zeros(v) for k, v in shapes.items()}}, path)
    found = detect_file_family(path)
    assert (found.key, found.inpainting, found.v_pred) == ("sdxl", True, True)
    with pytest.raises(
        ModelError, match=r"xl\.ckpt: SDXL base inpainting \(v-prediction\): not supported yet"
    ):
        load_base_model(path)


@pytest.mark.parametrize(
    ("index", "unet", "family", "said"),
    [
        (
            {
                "_class_name": "StableDiffusionXLPipeline",
                "text_encoder": ["t", "C"],
                "text_encoder_2": ["t", "C"],
            },
            {},
            "sdxl",
            "SDXL diffusers folder has no vae/config.json",
        ),
        (
            {
                "_class_name": "StableDiffusionXLImg2ImgPipeline",
                "text_encoder": [None, None],
                "text_encoder_2": [],
            },
            {},
            "sdxl_refiner",
            "SDXL refiner: not supported yet",
        ),
        (
            {"_class_name": "FluxPipeline", "text_encoder_2": ["t", "T5"]},
            None,
            "flux1",
            "FLUX.1: not supported yet",
        ),
        (
            {"_class_name": "StableDiffusion3Pipeline", "text_encoder_3": []},
            None,
            "sd3",
            "SD3: not supported yet",
        ),
        ({"_class_name": "StableDiffusionPipeline"}, {"cross_attention_dim": 1024}, "sd2", "SD2.x"),
        ({"_class_name": "StableDiffusionPipeline"}, {"in_channels": 9}, "sd1", "SD1.x inpainting"),
    ],
)
def test_family_of_diffusers_folder(tmp_path, index, unet, family, said):
    found = detect_diffusers_family(index, unet)
    assert found.key == family
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    if unet is not None:
        (tmp_path / "unet").mkdir()
        (tmp_path / "unet" / "config.json").write_text(json.dumps(unet))
    with pytest.raises(ModelError, match=said):
        load_base_model(tmp_path)
    assert (
        detect_diffusers_family({"_class_name": "StableDiffusionPipeline"}, {"cross_attention_dim": 768}).key
        == "sd1"
    )
