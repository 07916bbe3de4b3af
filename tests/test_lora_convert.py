"""LoRA key naming: kohya <-> diffusers/PEFT <-> ComfyUI, bit-exact both ways; a converted PEFT file loads in
diffusers with every key used and does what lorakit's merge of the kohya file does; `lorakit convert`."""

from __future__ import annotations

import json
import logging
import re

import pytest
import torch

from lorakit.errors import ModelError
from lorakit.models.tiny import build_models, build_sdxl_models, tiny_arch, tiny_sdxl_arch
from lorakit.network.convert import convert_file, from_kohya, with_te_out_proj
from lorakit.network.file import addnet_hash, read_lora_file, save_lora_file
from lorakit.network.lora import LoRANetwork
from lorakit.network.naming import to_kohya
from lorakit.network.targets import sdxl_te_targets, sdxl_unet_targets

META = {"ss_network_dim": "4", "ss_base_model_version": "sd_v1", "modelspec.title": "usu"}


def _randomise(net) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net.kohya_state_dict()


def sd1_kohya(unet=None, te=None, **kw) -> dict[str, torch.Tensor]:
    """A kohya SD1 LoCon (UNet attention + convs at two rank/alpha pairs, text encoder) for the tiny model."""
    if unet is None:
        unet, _, te = build_models(tiny_arch(), seed=0)
    return _randomise(LoRANetwork(unet, te, dim=4, alpha=2, conv_dim=2, conv_alpha=1, **kw))


def sdxl_network(unet, te1, te2, dim=4, alpha=2, conv_dim=2):
    targets = sdxl_unet_targets(unet, dim, alpha, conv_dim=conv_dim, conv_alpha=1.5)
    targets += sdxl_te_targets(te1, 1, dim, alpha) + sdxl_te_targets(te2, 2, dim, alpha)
    return LoRANetwork.from_targets({"unet": unet, "te1": te1, "te2": te2}, targets)


@pytest.fixture(scope="module")
def kohya_files():
    """family -> (kohya tensors, UNet config): lorakit's own networks on the tiny SD1 / SDXL models."""
    sdxl_arch = tiny_sdxl_arch()
    unet, _, te1, te2 = build_sdxl_models(sdxl_arch, seed=0)
    return {
        "sd1": (sd1_kohya(), tiny_arch()["unet"]),
        "sdxl": (_randomise(sdxl_network(unet, te1, te2)), sdxl_arch["unet"]),
    }


def _assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys(), sorted(set(a) ^ set(b))[:5]
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape and torch.equal(a[k], b[k]), k


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_kohya_to_peft_and_back_is_bit_exact(kohya_files, family):
    tensors, unet_config = kohya_files[family]
    peft, meta = from_kohya(tensors, {**META}, "peft", family, unet_config)
    assert meta["ss_network_dim"] == "4" and meta["modelspec.title"] == "usu"  # metadata kept
    assert all(re.fullmatch(r"(unet|text_encoder|text_encoder_2)\..+\.lora_[AB]\.weight", k) for k in peft)
    prefixes = {k.split(".")[0] for k in peft}
    assert prefixes == (
        {"unet", "text_encoder", "text_encoder_2"} if family == "sdxl" else {"unet", "text_encoder"}
    )
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["unet.r"] == 4 and config["unet.lora_alpha"] == 2.0
    assert set(config["unet.rank_pattern"].values()) == {2}  # the 3x3 convs: conv_dim 2
    assert set(config["unet.alpha_pattern"].values()) == {1.0 if family == "sd1" else 1.5}
    if family == "sdxl":  # diffusers paths, not kohya's SGM names
        assert "unet.down_blocks.1.attentions.0.transformer_blocks.1.attn2.to_k.lora_A.weight" in peft
        assert any(k.startswith("lora_unet_input_blocks_4_1_transformer_blocks_1") for k in tensors)
    back = to_kohya(peft, meta, unet_config=unet_config)
    _assert_same(back, tensors)
    a = next(k for k in tensors if k.endswith(".lora_down.weight"))
    assert back[a].data_ptr() == tensors[a].data_ptr()  # renamed, not copied


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_comfy_round_trip_and_names(kohya_files, family):
    from lorakit.models.families import sgm_layout

    tensors, unet_config = kohya_files[family]
    comfy, meta = from_kohya(tensors, META, "comfy", family, unet_config)
    unet_keys = [k for k in comfy if k.startswith("diffusion_model.")]
    te_keys = [k for k in comfy if k.startswith("text_encoders.")]
    assert len(unet_keys) + len(te_keys) == len(comfy) == len(tensors)
    assert (
        "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.lora_up.weight"
        in comfy
    )
    if family == "sdxl":
        assert "text_encoders.clip_g.transformer.text_model.encoder.layers.1.mlp.fc2.alpha" in comfy
        # ComfyUI's UNet keys are the SGM checkpoint's: every module names a weight there
        unet, vae, te1, te2 = build_sdxl_models(tiny_sdxl_arch(), seed=0)
        sgm = sgm_layout.to_sgm_state_dict(
            unet.state_dict(), vae.state_dict(), te1.state_dict(), te2.state_dict()
        )
        weights = {k.removeprefix("model.") for k in sgm}
        modules = {k.rsplit(".", 2)[0] if ".lora_" in k else k.rsplit(".", 1)[0] for k in unet_keys}
        assert all(f"{m}.weight" in weights for m in modules)
    else:
        assert "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.lora_down.weight" in comfy
        assert "diffusion_model.input_blocks.1.0.in_layers.2.lora_down.weight" in comfy  # LoCon conv
    _assert_same(to_kohya(comfy, meta, unet_config=unet_config), tensors)


@pytest.fixture(scope="module")
def real_networks():
    """kohya's full target sets (LoCon) on the real SD1.5 and SDXL architectures, on the meta device."""
    from importlib import resources

    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lorakit.models.families.sdxl import build_sdxl_empty
    from lorakit.network.naming import real_unet_config

    cfg = json.loads(
        (resources.files("lorakit.models") / "configs" / "sd15" / "text_encoder.json").read_text()
    )
    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(real_unet_config("sd1"))
        te = CLIPTextModel(CLIPTextConfig(**{k: v for k, v in cfg.items() if not k.startswith("_")}))
    from lorakit.network.targets import sd1_targets

    sd1 = sd1_targets(unet, te, dim=8, alpha=4, conv_dim=4, conv_alpha=1)
    unet, _, te1, te2 = build_sdxl_empty()
    sdxl = sdxl_unet_targets(unet, 8, 4, conv_dim=4, conv_alpha=1)
    sdxl += sdxl_te_targets(te1, 1, 8, 4) + sdxl_te_targets(te2, 2, 8, 4)
    return {"sd1": _meta_kohya(sd1), "sdxl": _meta_kohya(sdxl)}


def _meta_kohya(targets) -> dict[str, torch.Tensor]:
    """kohya's tensors for `targets` with shapes only (meta): LoRANetwork's, without injecting PEFT."""
    out = {}
    for t in targets:
        m = t.module
        conv = isinstance(m, torch.nn.Conv2d)
        fan_in, fan_out = (m.in_channels, m.out_channels) if conv else (m.in_features, m.out_features)
        kernel = tuple(m.kernel_size) if conv else ()
        out[f"{t.name}.lora_down.weight"] = torch.empty(t.rank, fan_in, *kernel, device="meta")
        out[f"{t.name}.lora_up.weight"] = torch.empty(fan_out, t.rank, *(1,) * len(kernel), device="meta")
        out[f"{t.name}.alpha"] = torch.tensor(float(t.alpha))
    return out


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
def test_real_architecture_names_map_both_ways(real_networks, family):
    from lorakit.network.naming import unet_names

    tensors = real_networks[family]
    modules = {k.split(".")[0] for k in tensors}
    assert sum(m.startswith("lora_te") for m in modules) == (72 if family == "sd1" else 72 + 192)
    table = unet_names(family)
    for to in ("peft", "comfy"):
        converted, meta = from_kohya(tensors, {}, to, family)
        assert len(converted) == sum(not k.endswith(".alpha") or to == "comfy" for k in tensors)
        if to == "peft":  # every UNet key names a module of the diffusers UNet
            paths = {k[len("unet.") :].rsplit(".", 2)[0] for k in converted if k.startswith("unet.")}
            assert paths <= set(table.paths.values()) and len(paths) == sum(
                m.startswith("lora_unet_") for m in modules
            )
        back = to_kohya(converted, meta, family=family)
        assert back.keys() == tensors.keys(), (to, sorted(set(back) ^ set(tensors))[:5])
        for k in tensors:
            assert back[k].shape == tensors[k].shape, k
    if family == "sdxl":
        assert "lora_unet_middle_block_1_transformer_blocks_9_ff_net_0_proj.lora_up.weight" in tensors
        assert "lora_te2_text_model_encoder_layers_31_mlp_fc2.alpha" in tensors


# --------------------------------------------------------------------------- diffusers


def _sd1_pipeline(base):
    from diffusers import DDPMScheduler, StableDiffusionPipeline

    return StableDiffusionPipeline(
        vae=base.vae, text_encoder=base.text_encoder, tokenizer=base.tokenizer, unet=base.unet,
        scheduler=DDPMScheduler(), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip


def _outputs(base):
    from lorakit.models.text import encode_prompts

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(1, 4, 8, 8, generator=g)
    with torch.no_grad():
        cond = encode_prompts(base.tokenizer, base.text_encoder, ["usu bear"])
        return cond, base.unet(latents, torch.tensor([500]), cond).sample


def _load_in_diffusers(path, tiny_base, caplog, capfd):
    from peft.tuners.lora import LoraLayer

    from lorakit.models.loader import load_base_model

    base = load_base_model(tiny_base)
    pipe = _sd1_pipeline(base)
    capfd.readouterr()
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(path), adapter_name="usu")
    said = [r.getMessage() for r in caplog.records] + capfd.readouterr().err.splitlines()
    unused = [
        s for s in said if re.search(r"unexpected|missing|not loaded|not .*renamed|No LoRA keys", s, re.I)
    ]
    assert not unused, unused
    layers = sum(isinstance(m, LoraLayer) for mod in (pipe.unet, pipe.text_encoder) for m in mod.modules())
    return base, pipe, layers


def test_peft_file_loads_in_diffusers_like_lorakits_merge(tiny_base, tmp_path, caplog, capfd):
    from peft.utils import get_peft_model_state_dict

    from lorakit.models.loader import load_base_model
    from lorakit.network.merge import merge_lora

    plain = load_base_model(tiny_base)
    kohya = sd1_kohya(plain.unet, plain.text_encoder)
    kohya_path = save_lora_file(tmp_path / "k.safetensors", kohya, META, "float")
    peft_path = convert_file(kohya_path, tmp_path / "p.safetensors", "peft", unet_config=tiny_arch()["unet"])

    via_diffusers, pipe, layers = _load_in_diffusers(peft_path, tiny_base, caplog, capfd)
    assert layers == len({k.split(".")[0] for k in kohya})
    merged = load_base_model(tiny_base)
    merge_lora(merged.unet, merged.text_encoder, read_lora_file(kohya_path)[0])
    cond_m, eps_m = _outputs(merged)
    cond_d, eps_d = _outputs(via_diffusers)
    cond_0, eps_0 = _outputs(load_base_model(tiny_base))
    assert (eps_m - eps_0).abs().max() > 1e-3 and (cond_m - cond_0).abs().max() > 1e-3
    torch.testing.assert_close(cond_d, cond_m, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(eps_d, eps_m, rtol=1e-4, atol=1e-5)

    # what diffusers itself saves (its own key spelling and adapter metadata) reads back as the kohya file
    from diffusers import StableDiffusionPipeline

    StableDiffusionPipeline.save_lora_weights(
        tmp_path / "saved",
        unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name="usu"),
        text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder, adapter_name="usu"),
        unet_lora_adapter_metadata=pipe.unet.peft_config["usu"].to_dict(),
        text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["usu"].to_dict(),
    )
    back, _ = read_lora_file(tmp_path / "saved" / "pytorch_lora_weights.safetensors")
    _assert_same(back, read_lora_file(kohya_path)[0])


def test_kohya_fix_makes_a_qkv_only_text_encoder_load_in_diffusers(tiny_base, tmp_path, caplog, capfd):
    """diffusers 0.42.1 cannot tell a text encoder's kohya keys apart without an out_proj module: it
    raises (q/k/v only) or drops the q/k/v modules (with MLP modules). `--to kohya` adds a zero out_proj."""
    from lorakit.models.loader import load_base_model
    from lorakit.network.merge import merge_lora

    plain = load_base_model(tiny_base)
    full = sd1_kohya(plain.unet, plain.text_encoder)
    qkv = {k: v for k, v in full.items() if not k.startswith("lora_te_") or re.search(r"_[qkv]_proj\.", k)}
    broken = save_lora_file(tmp_path / "qkv.safetensors", qkv, META, "float")
    with pytest.raises(ValueError, match="Could not automatically infer state dict type"):
        _sd1_pipeline(load_base_model(tiny_base)).load_lora_weights(
            str(broken)
        )  # upstream bug; fixed? drop this

    fixed_path = convert_file(broken, tmp_path / "fixed.safetensors", "kohya")
    fixed, meta = read_lora_file(fixed_path)
    added = sorted({k.split(".")[0] for k in fixed} - {k.split(".")[0] for k in qkv})
    assert added == ["lora_te_text_model_encoder_layers_0_self_attn_out_proj"]
    assert not fixed[f"{added[0]}.lora_up.weight"].any() and meta["modelspec.title"] == "usu"
    via_diffusers, _, layers = _load_in_diffusers(fixed_path, tiny_base, caplog, capfd)
    assert layers == len({k.split(".")[0] for k in fixed})
    merged = load_base_model(tiny_base)
    merge_lora(merged.unet, merged.text_encoder, qkv)
    for d, m in zip(_outputs(via_diffusers), _outputs(merged)):
        torch.testing.assert_close(d, m, rtol=1e-4, atol=1e-5)
    assert with_te_out_proj(full) is full  # nothing missing: nothing added


# --------------------------------------------------------------------------- other dialects, refusals


def test_old_diffusers_comfy_and_ai_toolkit_spellings(kohya_files):
    tensors, unet_config = kohya_files["sd1"]
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_out_0"
    te = "lora_te_text_model_encoder_layers_1_self_attn_k_proj"
    down, up = tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"]
    old = {
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": down,
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": up,
        "text_encoder.text_model.encoder.layers.1.self_attn.to_k_lora.down.weight": tensors[
            f"{te}.lora_down.weight"
        ],
        "text_encoder.encoder.layers.1.self_attn.k_proj.lora_linear_layer.up.weight": tensors[
            f"{te}.lora_up.weight"
        ],
    }
    got = to_kohya(old, {}, unet_config=unet_config)
    assert got[f"{name}.lora_down.weight"] is down and float(got[f"{name}.alpha"]) == 4.0  # no alpha: scale 1
    assert got[f"{te}.lora_up.weight"] is tensors[f"{te}.lora_up.weight"]
    # ai-toolkit DoRA: kohya names, `.magnitude` per output row
    magnitude = torch.rand(up.shape[0])
    got = to_kohya({f"{name}.lora_down.weight": down, f"{name}.magnitude": magnitude})
    assert got[f"{name}.dora_scale"].shape == (up.shape[0], 1)
    # a kohya file comes back as it is
    assert to_kohya(tensors, {}) is tensors


def _with_dora(tensors, unet, parts=("lora_unet_",)) -> dict[str, torch.Tensor]:
    """`tensors` with an output-axis dora_scale (LyCORIS >= 3.2) on every module of `parts`: 1.3 x the
    row norms of the base weight, so DoRA visibly changes the result."""
    from lorakit.network.naming import unet_names

    paths = unet_names("sd1", tiny_arch()["unet"]).paths
    out = dict(tensors)
    for name in {k.split(".")[0] for k in tensors if k.startswith(parts)}:
        w = unet.get_submodule(paths[name]).weight.detach().float()
        out[f"{name}.dora_scale"] = (
            torch.linalg.vector_norm(w, dim=list(range(1, w.dim())), keepdim=True) * 1.3
        )
    return out


def test_dora_to_peft_round_trip_and_loads_in_diffusers(tiny_base, tmp_path, caplog, capfd):
    from lorakit.models.loader import load_base_model
    from lorakit.network.merge import merge_lora

    plain = load_base_model(tiny_base)
    unet_config = tiny_arch()["unet"]
    dora = _with_dora(sd1_kohya(plain.unet, plain.text_encoder), plain.unet)
    peft, meta = from_kohya(dora, META, "peft", "sd1", unet_config)
    linear = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"
    assert peft[f"{linear}.lora_magnitude_vector"].shape == (32,)
    assert peft["unet.down_blocks.0.resnets.0.conv1.lora_magnitude_vector"].shape == (
        1,
        32,
        1,
        1,
    )  # PEFT's conv
    config = json.loads(meta["lora_adapter_metadata"])
    assert config["unet.use_dora"] is True and config["text_encoder.use_dora"] is False
    _assert_same(to_kohya(peft, meta, unet_config=unet_config), dora)

    path = save_lora_file(tmp_path / "dora.safetensors", peft, meta, "float")
    via_diffusers, _, _ = _load_in_diffusers(path, tiny_base, caplog, capfd)
    merged = load_base_model(tiny_base)
    merge_lora(merged.unet, merged.text_encoder, dora)
    torch.testing.assert_close(_outputs(via_diffusers)[1], _outputs(merged)[1], rtol=1e-4, atol=1e-5)


def test_what_peft_cannot_hold_is_refused(kohya_files):
    tensors, unet_config = kohya_files["sd1"]
    linear = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_q"
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    out_l = tensors[f"{linear}.lora_up.weight"].shape[0]
    with pytest.raises(ModelError, match="1 of the .* unet modules are DoRA"):  # use_dora: one flag per model
        from_kohya({**tensors, f"{linear}.dora_scale": torch.rand(out_l, 1)}, {}, "peft", "sd1", unet_config)
    in_features = tensors[f"{linear}.lora_down.weight"].shape[1]
    with pytest.raises(ModelError, match="per input column"):
        from_kohya(
            {**tensors, f"{linear}.dora_scale": torch.rand(1, in_features)}, {}, "peft", "sd1", unet_config
        )
    tucker = {**tensors, f"{conv}.lora_mid.weight": torch.zeros(2, 2, 3, 3)}
    with pytest.raises(ModelError, match="lora_mid"):
        from_kohya(tucker, {}, "peft", "sd1", unet_config)
    comfy, _ = from_kohya(tucker, {}, "comfy", "sd1", unet_config)  # ComfyUI reads Tucker: kept
    assert "diffusion_model.input_blocks.1.0.in_layers.2.lora_mid.weight" in comfy


def test_unknown_keys_are_refused_with_examples(kohya_files, tmp_path):
    tensors, _ = kohya_files["sd1"]
    mixed = {"unet.down_blocks.0.attentions.0.proj_in.lora_A.weight": torch.zeros(4, 32)}
    mixed["model.diffusion_model.input_blocks.0.0.weight"] = torch.zeros(1)
    with pytest.raises(
        ModelError, match=r"1 of 2 tensors .*'model\.diffusion_model\.input_blocks\.0\.0\.weight'"
    ):
        to_kohya(mixed, {})
    path = save_lora_file(tmp_path / "mixed.safetensors", mixed, {}, "float")
    with pytest.raises(ModelError, match=r"mixed\.safetensors: 1 of 2 tensors"):
        read_lora_file(path)
    with pytest.raises(ModelError, match="not a module of the SD1.x UNet"):
        from_kohya(
            {
                "lora_unet_nowhere.lora_down.weight": torch.zeros(1, 1),
                "lora_unet_nowhere.lora_up.weight": torch.zeros(1, 1),
            },
            {},
            "peft",
            "sd1",
        )


# --------------------------------------------------------------------------- CLI


def _real_sd1_lora(real_networks, n=12) -> dict[str, torch.Tensor]:
    """A small SD1.5 LoRA (n UNet modules incl. convs, n text-encoder modules, rank 2), random weights."""
    g = torch.Generator().manual_seed(1)
    names = sorted({k.split(".")[0] for k in real_networks["sd1"]})
    unet = [m for m in names if m.startswith("lora_unet_")]
    picked = (
        unet[:n]
        + [m for m in unet if "resnets" in m][:2]
        + [m for m in names if m.startswith("lora_te_")][:n]
    )
    out = {}
    for name in picked:
        down, up = (
            real_networks["sd1"][f"{name}.lora_down.weight"],
            real_networks["sd1"][f"{name}.lora_up.weight"],
        )
        out[f"{name}.lora_down.weight"] = torch.randn(2, *down.shape[1:], generator=g)
        out[f"{name}.lora_up.weight"] = torch.randn(up.shape[0], 2, *up.shape[2:], generator=g)
        out[f"{name}.alpha"] = torch.tensor(1.0)
    return out


def test_cli_convert_writes_atomically_keeps_metadata_and_refuses_to_overwrite(
    real_networks, kohya_files, tmp_path, capsys
):
    from lorakit.cli import main

    tensors = _real_sd1_lora(real_networks)
    src = save_lora_file(tmp_path / "k.safetensors", tensors, META, "fp16")
    out = tmp_path / "c.safetensors"
    assert main(["convert", "--model", str(src), "--save_to", str(out), "--to", "peft"]) == 0
    peft, meta = read_lora_file(out)  # read back as kohya names
    kohya, kmeta = read_lora_file(src)
    _assert_same(peft, kohya)  # fp16 kept (the input's dtype)
    assert (
        meta["ss_network_dim"] == "4" and meta["modelspec.title"] == "usu" and "lora_adapter_metadata" in meta
    )
    assert meta["sshs_model_hash"] == addnet_hash(out) != kmeta["sshs_model_hash"]
    from lorakit.network.inspect import inspect_lora

    assert inspect_lora(out)["modules"] == inspect_lora(src)["modules"]  # inspect reads the PEFT file too
    again = tmp_path / "again.safetensors"
    assert main(["convert", "--model", str(out), "--save_to", str(again), "--to", "kohya"]) == 0
    from safetensors.torch import load_file

    _assert_same(load_file(again), load_file(src))  # PEFT -> kohya: the same names and bits
    again.unlink()
    before = out.read_bytes()
    assert main(["convert", "--model", str(src), "--save_to", str(out), "--to", "comfy"]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == before
    args = ["convert", "--model", str(src), "--save_to", str(out), "--to", "comfy", "--overwrite"]
    assert main([*args, "--save_precision", "float"]) == 0
    raw = load_file(out)
    assert all(
        k.startswith(("diffusion_model.", "text_encoders.")) and v.dtype == torch.float32
        for k, v in raw.items()
    )
    assert "diffusion_model.input_blocks.1.0.in_layers.2.alpha" in raw  # the SD1.5 LDM layout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.safetensors", "k.safetensors"]  # no temp left

    # a LoRA of another UNet layout (the tiny test model) would get wrong LDM numbers: refused
    tiny = save_lora_file(tmp_path / "tiny.safetensors", kohya_files["sd1"][0], META, "float")
    assert (
        main(["convert", "--model", str(tiny), "--save_to", str(tmp_path / "t.safetensors"), "--to", "comfy"])
        == 2
    )
    assert "another UNet layout" in capsys.readouterr().err and not (tmp_path / "t.safetensors").exists()


@pytest.mark.filterwarnings("ignore:The following alpha_pattern keys did not match")  # the bug shown below
def test_kohya_fix_gives_diffusers_one_alpha(tiny_base, tmp_path, caplog, capfd):
    """diffusers misplaces the alpha of an attention module that differs from the file's common alpha;
    `--to kohya` moves alpha/common into lora_up so every module has the common alpha."""
    from lorakit.models.loader import load_base_model
    from lorakit.network.merge import merge_lora

    plain = load_base_model(tiny_base)
    kohya = sd1_kohya(plain.unet, plain.text_encoder)
    odd = "lora_unet_up_blocks_1_attentions_0_transformer_blocks_0_attn2_to_v"
    kohya[f"{odd}.alpha"] = torch.tensor(3.0)
    src = save_lora_file(tmp_path / "odd.safetensors", kohya, META, "float")
    merged = load_base_model(tiny_base)
    merge_lora(merged.unet, merged.text_encoder, kohya)
    expected = _outputs(merged)[1]

    as_is, _, _ = _load_in_diffusers(src, tiny_base, caplog, capfd)
    assert (_outputs(as_is)[1] - expected).abs().max() > 1e-4  # the upstream bug; fixed? drop with_one_alpha

    fixed, _ = read_lora_file(convert_file(src, tmp_path / "fixed.safetensors", "kohya"))
    assert {float(v) for k, v in fixed.items() if k.endswith(".alpha")} == {2.0}
    torch.testing.assert_close(fixed[f"{odd}.lora_up.weight"], kohya[f"{odd}.lora_up.weight"] * 1.5)
    via_diffusers, _, _ = _load_in_diffusers(tmp_path / "fixed.safetensors", tiny_base, caplog, capfd)
    torch.testing.assert_close(_outputs(via_diffusers)[1], expected, rtol=1e-4, atol=1e-5)


def test_sdxl_peft_file_loads_in_diffusers_like_lorakits_merge(tiny_sdxl_base, tmp_path, caplog, capfd):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from peft.tuners.lora import LoraLayer

    from lorakit.models.loader import load_base_model
    from lorakit.network.merge import LoraMerger

    plain = load_base_model(tiny_sdxl_base)
    kohya = _randomise(sdxl_network(plain.unet, *plain.text_encoders))
    src = save_lora_file(
        tmp_path / "xl.safetensors", kohya, {"ss_base_model_version": "sdxl_base_v1-0"}, "float"
    )
    out = convert_file(src, tmp_path / "xl-peft.safetensors", "peft", unet_config=tiny_sdxl_arch()["unet"])

    b = load_base_model(tiny_sdxl_base)
    pipe = StableDiffusionXLPipeline(
        vae=b.vae, text_encoder=b.text_encoders[0], text_encoder_2=b.text_encoders[1], tokenizer=b.tokenizers[0],
        tokenizer_2=b.tokenizers[1], unet=b.unet, scheduler=EulerDiscreteScheduler(),
    )  # fmt: skip
    capfd.readouterr()
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(out), adapter_name="xl")
    said = [r.getMessage() for r in caplog.records] + capfd.readouterr().err.splitlines()
    assert not [s for s in said if re.search(r"unexpected|missing|not loaded|No LoRA keys", s, re.I)], said
    models = {"unet": pipe.unet, "te1": pipe.text_encoder, "te2": pipe.text_encoder_2}
    loaded = {p: sum(isinstance(m, LoraLayer) for m in model.modules()) for p, model in models.items()}
    names = {k.split(".")[0] for k in kohya}
    assert loaded == {p: sum(n.startswith(f"lora_{p}_") for n in names) for p in models}
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()

    ours = load_base_model(tiny_sdxl_base)
    LoraMerger.for_base(ours).apply([("xl", read_lora_file(src)[0], 1.0, 1.0)])
    for d, o in zip(models.values(), (ours.unet, *ours.text_encoders)):
        o_sd = o.state_dict()
        for k, v in d.state_dict().items():
            torch.testing.assert_close(v, o_sd[k], rtol=1e-5, atol=1e-6, msg=k)
