"""kohya's SDXL LoRA modules on the real SDXL architecture (meta device): names, counts and shapes as
computed from kohya's networks/lora.py rules in sdxl.md section 3."""

from __future__ import annotations

import re
from collections import Counter

import pytest
import torch.nn as nn

from lorakit.models.families.sdxl import build_sdxl_empty
from lorakit.network.targets import sdxl_te_targets, sdxl_unet_targets


@pytest.fixture(scope="module")
def sdxl():
    return build_sdxl_empty()


def _io(module) -> tuple[int, int]:
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    return module.in_channels, module.out_channels


def _block(name: str) -> str:
    return re.match(r"lora_unet_((?:input|output)_blocks_\d+|middle_block)_", name)[1]


def test_unet_default_targets(sdxl):
    unet = sdxl[0]
    targets = sdxl_unet_targets(unet, dim=32, alpha=16)
    names = [t.name for t in targets]
    assert len(targets) == len(set(names)) == 722
    per_block = Counter(_block(n) for n in names)
    assert per_block == {
        **{f"input_blocks_{i}": 22 for i in (4, 5)},
        **{f"input_blocks_{i}": 102 for i in (7, 8)},
        "middle_block": 102,
        **{f"output_blocks_{i}": 102 for i in (0, 1, 2)},
        **{f"output_blocks_{i}": 22 for i in (3, 4, 5)},
    }
    by_name = {t.name: t for t in targets}
    q = by_name["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"]
    assert q.path == "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert unet.get_submodule(q.path) is q.module and _io(q.module) == (640, 640)
    assert _io(by_name["lora_unet_input_blocks_7_1_transformer_blocks_1_attn2_to_k"].module) == (2048, 1280)
    assert _io(by_name["lora_unet_middle_block_1_transformer_blocks_9_ff_net_0_proj"].module) == (1280, 10240)
    assert _io(by_name["lora_unet_output_blocks_0_1_proj_in"].module) == (1280, 1280)
    assert isinstance(by_name["lora_unet_output_blocks_0_1_proj_in"].module, nn.Linear)  # linear proj_in
    assert all((t.rank, t.alpha) == (32, 16) for t in targets)
    # parameters per unit rank (sum of in + out): 2,659,840 -> rank 32 = 85.1 M
    assert sum(sum(_io(t.module)) for t in targets) == 2_659_840
    assert not any(re.search(r"time_embed|label_emb|input_blocks_0_|^lora_unet_out_", n) for n in names)


def test_unet_conv_targets(sdxl):
    targets = sdxl_unet_targets(sdxl[0], dim=32, alpha=16, conv_dim=8, conv_alpha=4)
    assert len(targets) == 788
    extra = {t.name: t for t in targets if "_transformer_blocks_" not in t.name and "_proj_" not in t.name}
    assert len(extra) == 66
    conv3 = [
        n for n, t in extra.items() if isinstance(t.module, nn.Conv2d) and t.module.kernel_size == (3, 3)
    ]
    assert len(conv3) == 38 and all((extra[n].rank, extra[n].alpha) == (8, 4) for n in conv3)
    assert {"lora_unet_input_blocks_3_0_op", "lora_unet_input_blocks_6_0_op"} <= set(conv3)
    assert {"lora_unet_output_blocks_2_2_conv", "lora_unet_output_blocks_5_2_conv"} <= set(conv3)
    assert sum(n.endswith(("_in_layers_2", "_out_layers_3")) for n in conv3) == 34
    rest = [n for n in extra if n not in conv3]
    assert sum(n.endswith("_emb_layers_1") for n in rest) == 17
    assert sum(n.endswith("_skip_connection") for n in rest) == 11
    assert all((extra[n].rank, extra[n].alpha) == (32, 16) for n in rest)
    by_region = Counter(_block(t.name).split("_")[0] for t in targets)
    assert by_region == {"input": 270, "middle": 108, "output": 410}


def test_text_encoder_targets(sdxl):
    _, _, te1, te2 = sdxl
    t1, t2 = sdxl_te_targets(te1, 1, 32, 16), sdxl_te_targets(te2, 2, 32, 16)
    assert (len(t1), len(t2)) == (72, 192)
    assert t1[0].name == "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    by_name = {t.name: t for t in t1 + t2}
    fc1 = by_name["lora_te2_text_model_encoder_layers_31_mlp_fc1"]
    assert _io(fc1.module) == (1280, 5120) and fc1.is_te
    assert te2.get_submodule(fc1.path) is fc1.module
    assert _io(by_name["lora_te1_text_model_encoder_layers_11_mlp_fc2"].module) == (3072, 768)
    assert sum(sum(_io(t.module)) for t in t1) == 165_888
    assert sum(sum(_io(t.module)) for t in t2) == 737_280
    assert not any(n.startswith("lora_te_") for n in by_name)


def test_the_family_seam_builds_kohyas_sdxl_network_on_meta():
    """Through the seam the trainer uses: SDXL family -> targets -> LoRANetwork -> kohya state dict."""
    from types import SimpleNamespace

    from lorakit.models.families.base import family_spec
    from lorakit.network.lora import LoRANetwork

    unet, _vae, te1, te2 = build_sdxl_empty()  # its own copy: the network injects layers into it
    base = SimpleNamespace(unet=unet, text_encoders=(te1, te2))
    family = family_spec("sdxl")
    parts = {"unet", *family.text_encoder_parts}
    targets = family.lora_targets(base, 32, 32.0, None, None, parts)
    net = LoRANetwork.from_targets({"unet": unet, **family.text_encoders(base)}, targets)
    assert net.counts == (72 + 192, 722)
    sd = net.kohya_state_dict()
    assert len(sd) == 3 * (722 + 264)
    assert sd["lora_te2_text_model_encoder_layers_31_self_attn_q_proj.lora_down.weight"].shape == (32, 1280)
    assert sd["lora_te1_text_model_encoder_layers_11_mlp_fc2.lora_up.weight"].shape == (768, 32)
    assert sd["lora_unet_input_blocks_7_1_transformer_blocks_1_attn2_to_k.lora_down.weight"].shape == (
        32,
        2048,
    )
    # parts the run does not train get no modules (text_encoder_lr2 = 0: bigG left out, as kohya's file)
    only_te1 = family.lora_targets(base, 4, 1.0, None, None, {"te1"})
    assert {t.part for t in only_te1} == {"te1"} and len(only_te1) == 72
