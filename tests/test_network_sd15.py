"""kohya's module names, counts and shapes on the real SD1.5 architecture, built on the meta device."""

import json
from importlib import resources

import pytest
import torch

from lorakit.network.lora import LoRANetwork


def sd15_models():
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    cfg_dir = resources.files("lorakit.models") / "configs" / "sd15"
    unet_cfg = json.loads((cfg_dir / "unet.json").read_text())
    te_cfg = json.loads((cfg_dir / "text_encoder.json").read_text())
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(unet_cfg)
        te = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in te_cfg.items() if not k.startswith("_")}))
    return unet, te


@pytest.fixture(scope="module")
def sd15_state_dict():
    unet, te = sd15_models()
    net = LoRANetwork(unet, te, dim=8, alpha=4)
    return net, net.kohya_state_dict()


# (name, down shape, up shape) with rank r = 8, from kohya's reference table
KOHYA_EXAMPLES = [
    ("lora_te_text_model_encoder_layers_0_self_attn_q_proj", [8, 768], [768, 8]),
    ("lora_te_text_model_encoder_layers_11_mlp_fc1", [8, 768], [3072, 8]),
    ("lora_te_text_model_encoder_layers_11_mlp_fc2", [8, 3072], [768, 8]),
    ("lora_unet_down_blocks_0_attentions_0_proj_in", [8, 320, 1, 1], [320, 8, 1, 1]),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q", [8, 320], [320, 8]),
    ("lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k", [8, 768], [320, 8]),
    ("lora_unet_down_blocks_1_attentions_1_transformer_blocks_0_ff_net_0_proj", [8, 640], [5120, 8]),
    ("lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_out_0", [8, 1280], [1280, 8]),
    ("lora_unet_up_blocks_3_attentions_2_transformer_blocks_0_ff_net_2", [8, 1280], [320, 8]),
    ("lora_unet_up_blocks_1_attentions_2_proj_out", [8, 1280, 1, 1], [1280, 8, 1, 1]),
]


def test_module_counts_match_kohya(sd15_state_dict):
    net, sd = sd15_state_dict
    assert net.counts == (72, 192)
    assert len(sd) == 3 * 264 == 792


@pytest.mark.parametrize("name,down,up", KOHYA_EXAMPLES)
def test_kohya_key_names_and_shapes(sd15_state_dict, name, down, up):
    _, sd = sd15_state_dict
    assert list(sd[f"{name}.lora_down.weight"].shape) == down
    assert list(sd[f"{name}.lora_up.weight"].shape) == up
    assert sd[f"{name}.alpha"].dim() == 0 and float(sd[f"{name}.alpha"]) == 4.0


# kohya's six Linear layers in every CLIP encoder layer, as its files name them
KOHYA_TE_CHILDREN = ["self_attn_q_proj", "self_attn_k_proj", "self_attn_v_proj", "self_attn_out_proj", "mlp_fc1", "mlp_fc2"]  # fmt: skip


def test_text_encoder_names_are_kohya_fixed_list(sd15_state_dict):
    _, sd = sd15_state_dict
    te_names = {k.split(".")[0] for k in sd if k.startswith("lora_te_")}
    expected = {f"lora_te_text_model_encoder_layers_{i}_{c}" for i in range(12) for c in KOHYA_TE_CHILDREN}
    assert te_names == expected
    assert "lora_te_text_model_encoder_layers_11_self_attn_out_proj" in te_names


def test_every_unet_module_is_inside_a_transformer_block(sd15_state_dict):
    _, sd = sd15_state_dict
    unet_names = {k.split(".")[0] for k in sd if k.startswith("lora_unet_")}
    assert all("_attentions_" in n for n in unet_names)
    for forbidden in ("conv_in", "conv_out", "time_embedding", "resnets", "norm"):
        assert not any(forbidden in n for n in unet_names), forbidden


def test_locon_adds_resnet_and_sampler_convs():
    unet, te = sd15_models()
    net = LoRANetwork(unet, te, dim=8, alpha=4, conv_dim=4, train_text_encoder=False)
    sd = net.kohya_state_dict()
    name = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert list(sd[f"{name}.lora_down.weight"].shape) == [4, 320, 3, 3]
    assert list(sd[f"{name}.lora_up.weight"].shape) == [320, 4, 1, 1]
    assert float(sd[f"{name}.alpha"]) == 1.0  # kohya's conv_alpha default
    # 1x1 shortcut and time projection use network_dim/alpha
    assert list(sd["lora_unet_down_blocks_1_resnets_0_conv_shortcut.lora_down.weight"].shape) == [
        8,
        320,
        1,
        1,
    ]
    assert float(sd["lora_unet_down_blocks_1_resnets_0_time_emb_proj.alpha"]) == 4.0
    assert "lora_unet_down_blocks_0_downsamplers_0_conv.lora_down.weight" in sd
    assert not any(k.startswith("lora_te_") for k in sd)
    assert net.counts[1] > 192
