"""An SDXL LoRA written by lorakit loads in diffusers' SDXL pipeline with every key used, and diffusers'
fused weights, A1111's way of applying it (written out here as the reference, from
shared/reference/sdxl.md section 6) and lorakit's own merge all give the same weights. A LoRA for
the other family is refused whole, and `inspect` names the family, prediction and consumers."""

from __future__ import annotations

import logging
import re

import pytest
import torch

from lorakit.errors import ModelError
from lorakit.models.families import sgm_layout
from lorakit.models.loader import load_base_model
from lorakit.network.file import read_lora_file, save_lora_file
from lorakit.network.inspect import format_table, inspect_lora
from lorakit.network.merge import LoraMerger

TE_MULT, UNET_MULT = 0.7, 1.3  # different, so a module merged with the wrong multiplier shows


@pytest.fixture(scope="module")
def sdxl_ckpt(tmp_path_factory):
    from lorakit.models.families.sdxl import save_sgm_checkpoint
    from lorakit.models.tiny import build_sdxl_models, tiny_sdxl_arch

    arch = tiny_sdxl_arch()
    path = tmp_path_factory.mktemp("sdxl") / "tiny-sdxl.safetensors"
    return save_sgm_checkpoint(path, *build_sdxl_models(arch, seed=0), arch=arch)


def _train(ckpt, root, **overrides):
    from lorakit.config import TrainConfig
    from lorakit.testing import make_dataset
    from lorakit.train.trainer import train

    train_dir, _ = make_dataset(root / "data", n_train=2, n_reg=0, repeats=1)
    flat = {
        "pretrained_model_name_or_path": str(ckpt),
        "train_data_dir": str(train_dir),
        "resolution": "64",
        "output_dir": str(root / "out"),
        "output_name": "xl",
        "network_dim": 4,
        "network_alpha": 2,
        "learning_rate": 2e-2,  # large, so two steps move every trained lora_up visibly
        "max_train_steps": 2,
        "save_precision": "float",
        "seed": 3,
    }
    flat.update(overrides)
    return train(TrainConfig.from_dict(flat, source="test"))


@pytest.fixture(scope="module")
def sdxl_lora(sdxl_ckpt, tmp_path_factory):
    """A lorakit-trained SDXL LoCon: UNet (3x3 convs too), TE1 and TE2 modules."""
    return _train(sdxl_ckpt, tmp_path_factory.mktemp("xl_lora"), conv_dim=2, conv_alpha=1)


def _modules(tensors) -> set[str]:
    return {k.split(".")[0] for k in tensors}


def _snapshot(base) -> list[dict[str, torch.Tensor]]:
    return [{k: v.clone() for k, v in m.state_dict().items()} for m in (base.unet, *base.text_encoders)]


def _assert_unchanged(base, snapshot) -> None:
    for model, before in zip((base.unet, *base.text_encoders), snapshot):
        for k, v in model.state_dict().items():
            assert torch.equal(v, before[k]), k


# --------------------------------------------------------------------------- a. diffusers


def test_diffusers_sdxl_loads_every_key_and_fuses_to_lorakits_merge(sdxl_ckpt, sdxl_lora, caplog, capfd):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from peft.tuners.lora import LoraLayer

    tensors, _ = read_lora_file(sdxl_lora)
    modules = _modules(tensors)
    parts = {re.match(r"lora_(unet|te1|te2)_", m)[1] for m in modules}
    assert parts == {"unet", "te1", "te2"} and any(m.endswith("_in_layers_2") for m in modules)  # LoCon
    assert all(not m.startswith("lora_unet_down_blocks") for m in modules)  # kohya's SGM names

    b = load_base_model(sdxl_ckpt)
    pipe = StableDiffusionXLPipeline(
        vae=b.vae,
        text_encoder=b.text_encoders[0],
        text_encoder_2=b.text_encoders[1],
        tokenizer=b.tokenizers[0],
        tokenizer_2=b.tokenizers[1],
        unet=b.unet,
        scheduler=EulerDiscreteScheduler(),
    )
    capfd.readouterr()
    with caplog.at_level(logging.WARNING):
        pipe.load_lora_weights(str(sdxl_lora), adapter_name="xl")
    said = [r.getMessage() for r in caplog.records] + capfd.readouterr().err.splitlines()
    # a text-encoder LoRA key peft cannot place shows as UNEXPECTED in transformers' load report; a
    # UNet one diffusers drops without a word (tried: a bogus input_blocks_7 module), hence the counts
    unused = [s for s in said if re.search(r"unexpected|not loaded|not .*renamed", s, re.I)]
    assert not unused, unused
    loaded = {
        name: sum(isinstance(m, LoraLayer) for m in model.modules())
        for name, model in (("unet", pipe.unet), ("te1", pipe.text_encoder), ("te2", pipe.text_encoder_2))
    }
    in_file = {p: sum(m.startswith(f"lora_{p}_") for m in modules) for p in loaded}
    assert loaded == in_file  # every module of the file became a LoRA layer where it belongs
    pipe.fuse_lora(lora_scale=1.0)
    pipe.unload_lora_weights()

    ours = load_base_model(sdxl_ckpt)
    LoraMerger.for_base(ours).apply([("xl", tensors, 1.0, 1.0)])
    plain = load_base_model(sdxl_ckpt)
    fused = (pipe.unet, pipe.text_encoder, pipe.text_encoder_2)
    for name, d, o, p in zip(
        ("unet", "te1", "te2"), fused, (ours.unet, *ours.text_encoders), (plain.unet, *plain.text_encoders)
    ):
        d_sd, o_sd, p_sd = d.state_dict(), o.state_dict(), p.state_dict()
        assert d_sd.keys() == o_sd.keys(), name
        changed = [k for k in o_sd if not torch.equal(o_sd[k], p_sd[k])]
        assert changed, f"the LoRA changed nothing in {name}"
        for k in o_sd:
            torch.testing.assert_close(d_sd[k], o_sd[k], rtol=1e-5, atol=1e-6, msg=f"{name} {k}")


# --------------------------------------------------------------------------- b. A1111


def _a1111_layer_names(sgm_sd) -> dict[str, str]:
    """A1111's network-layer name of each module in the live SGM model -> its weight key: the UNet
    under `diffusion_model_<path>`, conditioner embedder i under `<i>_<path inside .wrapped>`."""
    out = {}
    for key in sgm_sd:
        if key.startswith("model.diffusion_model.") and key.endswith(".weight"):
            out[key[len("model.") : -len(".weight")].replace(".", "_")] = key
        elif key.startswith("conditioner.embedders.") and key.endswith((".weight", ".in_proj_weight")):
            path = key[len("conditioner.embedders.") :].rsplit(".", 1)[0]
            out[path.replace(".", "_")] = key
    return out


def _a1111_name(lora_name: str) -> str:
    """A1111's (networks.py) name for a kohya SDXL module."""
    if m := re.fullmatch(r"lora_te2_text_model_encoder_layers_(\d+)_(.+)", lora_name):
        layer, rest = m[1], m[2]
        rest = (
            rest.replace("mlp_fc1", "mlp_c_fc").replace("mlp_fc2", "mlp_c_proj").replace("self_attn", "attn")
        )
        return f"1_model_transformer_resblocks_{layer}_{rest}"
    if lora_name.startswith("lora_te1_text_model"):
        return lora_name.replace("lora_te1_text_model", "0_transformer_text_model")
    return lora_name.replace("lora_unet", "diffusion_model")  # kohya's SDXL names are already SGM's


def a1111_apply(sgm_sd, tensors, te_mult, unet_mult) -> tuple[dict[str, torch.Tensor], int]:
    """A1111's SDXL LoRA patching on an SGM state dict; returns (patched copy, modules placed)."""
    out = {k: v.clone() for k, v in sgm_sd.items()}
    layers = _a1111_layer_names(sgm_sd)
    placed = 0
    for name in sorted(_modules(tensors)):
        down, up = tensors[f"{name}.lora_down.weight"].float(), tensors[f"{name}.lora_up.weight"].float()
        alpha = tensors.get(f"{name}.alpha")
        scale = (float(alpha) if alpha is not None else down.shape[0]) / down.shape[0]
        ours = _a1111_name(name)
        # A1111 counts a module as text encoder when 'transformer' is in the first 20 chars of its name
        mult = te_mult if "transformer" in ours[:20] else unet_mult
        delta = (up.flatten(1) @ down.flatten(1)) * scale * mult
        if ours in layers:
            key = layers[ours]
            out[key] += delta.reshape(out[key].shape)
        else:  # q/k/v of bigG: no such module; A1111 vstacks them into the MultiheadAttention's in_proj
            m = re.fullmatch(r"(.*)_([qkv])_proj", ours)
            assert m and m[1] in layers, f"A1111 finds no module for {name}"
            key = layers[m[1]]
            width = out[key].shape[1]
            row = "qkv".index(m[2]) * width
            out[key][row : row + width] += delta
        placed += 1
    return out, placed


def _sgm(base) -> dict[str, torch.Tensor]:
    sds = [m.state_dict() for m in (base.unet, base.vae, *base.text_encoders)]
    return sgm_layout.to_sgm_state_dict(*sds)


def test_a1111_mapping_gives_the_same_merged_weights(sdxl_ckpt, sdxl_lora):
    tensors, _ = read_lora_file(sdxl_lora)
    plain = _sgm(load_base_model(sdxl_ckpt))
    expected, placed = a1111_apply(plain, tensors, TE_MULT, UNET_MULT)
    assert placed == len(_modules(tensors))

    merged = load_base_model(sdxl_ckpt)
    LoraMerger.for_base(merged).apply([("xl", tensors, TE_MULT, UNET_MULT)])
    got = _sgm(merged)
    assert got.keys() == expected.keys()
    changed = {k for k in got if not torch.equal(got[k], plain[k])}
    assert any(".resblocks." in k and "in_proj_weight" in k for k in changed)  # bigG q/k/v
    assert any(k.startswith("conditioner.embedders.0.") for k in changed)
    assert any(k.startswith("model.diffusion_model.") for k in changed)
    for k in got:
        torch.testing.assert_close(got[k], expected[k], rtol=1e-5, atol=1e-6, msg=k)


def test_te_multiplier_reaches_both_sdxl_text_encoders(sdxl_ckpt, sdxl_lora):
    tensors, _ = read_lora_file(sdxl_lora)
    plain = load_base_model(sdxl_ckpt)
    unet_only = load_base_model(sdxl_ckpt)
    LoraMerger.for_base(unet_only).apply([("xl", tensors, 0.0, 1.0)])
    for p0, p in zip(plain.text_encoders, unet_only.text_encoders):
        assert all(torch.equal(a, b) for a, b in zip(p0.parameters(), p.parameters()))
    assert any(not torch.equal(a, b) for a, b in zip(plain.unet.parameters(), unet_only.unet.parameters()))


def test_diffusers_style_sdxl_names_resolve_to_the_sgm_modules(sdxl_ckpt, sdxl_lora):
    """Files named by diffusers' UNet paths (`lora_unet_down_blocks_...`) merge as kohya's SGM names do."""
    from lorakit.network.targets import sdxl_diffusers_aliases

    tensors, _ = read_lora_file(sdxl_lora)
    base = load_base_model(sdxl_ckpt)
    to_diffusers = {sgm: d for d, sgm in sdxl_diffusers_aliases(base.unet).items()}
    renamed = {}
    for key, t in tensors.items():
        name, rest = key.split(".", 1)
        renamed[f"{to_diffusers.get(name, name)}.{rest}"] = t
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0_") for k in renamed)
    a, b = load_base_model(sdxl_ckpt), load_base_model(sdxl_ckpt)
    LoraMerger.for_base(a).apply([("sgm", tensors, 1.0, 1.0)])
    LoraMerger.for_base(b).apply([("diffusers", renamed, 1.0, 1.0)])
    for (k, x), y in zip(a.unet.state_dict().items(), b.unet.state_dict().values()):
        assert torch.equal(x, y), k


# --------------------------------------------------------------------------- c. refusals


def _sd1_lora(tiny_base) -> dict[str, torch.Tensor]:
    """A kohya SD1 LoRA (UNet + lora_te_) with non-zero lora_up, for the tiny SD1 base."""
    from lorakit.network.lora import LoRANetwork

    base = load_base_model(tiny_base)
    net = LoRANetwork(base.unet, base.text_encoder, dim=4, alpha=2)
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.1)
    return net.kohya_state_dict()


def test_sd1_lora_on_sdxl_base_is_refused_before_any_weight_changes(sdxl_ckpt, tiny_base):
    tensors = _sd1_lora(tiny_base)
    base = load_base_model(sdxl_ckpt)
    before = _snapshot(base)
    merger = LoraMerger.for_base(base)
    with pytest.raises(ModelError, match=r"do not exist in this base model.*SDXL base"):
        merger.apply([("sd1", tensors, 1.0, 1.0)])
    _assert_unchanged(base, before)
    assert not merger.backup and not merger.applied


def test_sdxl_lora_on_sd1_base_is_refused_before_any_weight_changes(sdxl_lora, tiny_base):
    tensors, _ = read_lora_file(sdxl_lora)
    base = load_base_model(tiny_base)
    before = _snapshot(base)
    for merger in (LoraMerger.for_base(base), LoraMerger(base.unet, base.text_encoder)):
        with pytest.raises(ModelError, match=r"do not exist in this base model.*SD1\.x base"):
            merger.apply([("xl", tensors, 1.0, 1.0)])
        _assert_unchanged(base, before)


def test_a_refused_lora_in_a_set_leaves_the_others_unapplied(sdxl_ckpt, sdxl_lora, tiny_base):
    """All or nothing across files: a good SDXL LoRA is not merged when an SD1 one comes with it."""
    good, _ = read_lora_file(sdxl_lora)
    base = load_base_model(sdxl_ckpt)
    before = _snapshot(base)
    with pytest.raises(ModelError):
        LoraMerger.for_base(base).apply([("xl", good, 1.0, 1.0), ("sd1", _sd1_lora(tiny_base), 1.0, 1.0)])
    _assert_unchanged(base, before)


# --------------------------------------------------------------------------- d. inspect

CONSUMERS = ["A1111", "Forge", "ComfyUI", "kohya sd-scripts", "diffusers"]


def test_inspect_names_sdxl_and_its_consumers(sdxl_lora):
    info = inspect_lora(sdxl_lora)
    assert info["architecture"] == "SDXL" and info["family"] == "SDXL"
    assert info["prediction"] == "epsilon" and info["zero_terminal_snr"] is False
    assert info["loads_in"] == CONSUMERS
    table = format_table(info)
    assert (
        re.search(r"family\s+SDXL", table) and "A1111, Forge, ComfyUI, kohya sd-scripts, diffusers" in table
    )


def test_inspect_says_v_prediction(sdxl_ckpt, tmp_path):
    path = _train(
        sdxl_ckpt,
        tmp_path,
        v_parameterization=True,
        zero_terminal_snr=True,
        network_train_unet_only=True,
        max_train_steps=1,
    )
    tensors, meta = read_lora_file(path)
    assert meta["modelspec.prediction_type"] == "v" and meta["ss_base_model_version"] == "sdxl_base_v1-0"
    info = inspect_lora(path)
    assert info["family"] == "SDXL" and info["prediction"] == "v-prediction" and info["zero_terminal_snr"]
    assert "v-prediction, zero terminal SNR" in format_table(info)
    # SD1/SD2 files mark v-prediction in ss_base_model_version instead
    sd1_v = save_lora_file(
        tmp_path / "sd1v.safetensors", tensors, {"ss_base_model_version": "sd_v1_v"}, "float"
    )
    assert inspect_lora(sd1_v)["prediction"] == "v-prediction"


def test_inspect_sd1_lora_and_narrowed_consumers(tiny_base, tmp_path):
    tensors = _sd1_lora(tiny_base)
    sd1 = save_lora_file(tmp_path / "sd1.safetensors", tensors, {"ss_base_model_version": "sd_v1"}, "float")
    info = inspect_lora(sd1)
    assert (info["family"], info["prediction"], info["loads_in"]) == ("SD1.x", "epsilon", CONSUMERS)
    sd2 = save_lora_file(tmp_path / "sd2.safetensors", tensors, {"ss_v2": "True"}, "float")
    assert inspect_lora(sd2)["family"] == "SD2.x"
    # DoRA (output axis, LyCORIS >= 3.2): no kohya sd-scripts, no A1111 (reads the input axis only)
    name = next(k.split(".")[0] for k in tensors if k.startswith("lora_unet_"))
    out_features = tensors[f"{name}.lora_up.weight"].shape[0]
    dora = {**tensors, f"{name}.dora_scale": torch.ones(out_features, 1)}
    info = inspect_lora(save_lora_file(tmp_path / "dora.safetensors", dora, {}, "float"))
    assert info["loads_in"] == ["Forge", "ComfyUI", "diffusers"] and info["prediction"] is None


def test_sdxl_module_map_names_every_unet_module_and_both_encoders(sdxl_ckpt):
    from lorakit.network.targets import sdxl_te_targets, sdxl_unet_targets

    base = load_base_model(sdxl_ckpt)
    merger = LoraMerger.for_base(base)
    by_module = {id(m): n for n, m in merger.modules.items()}
    unet_layers = [m for m in base.unet.modules() if isinstance(m, torch.nn.Linear | torch.nn.Conv2d)]
    assert all(id(m) in by_module for m in unet_layers)  # conv_in, time_embed, label_emb, out too
    assert {
        "lora_unet_input_blocks_0_0",
        "lora_unet_label_emb_0_0",
        "lora_unet_out_2",
    } <= merger.modules.keys()
    trained = sdxl_unet_targets(base.unet, 4, 4, conv_dim=2) + [
        t for i, te in enumerate(base.text_encoders, 1) for t in sdxl_te_targets(te, i, 4, 4)
    ]
    assert all(merger.modules[t.name] is t.module for t in trained)  # what lorakit trains, it merges
    te_modules = [n for n in merger.modules if n.startswith(("lora_te1_", "lora_te2_"))]
    assert len(te_modules) == 2 * 2 * 6  # two encoders of 2 layers, kohya's 6 modules each
    assert len(merger.modules) == len(unet_layers) + len(te_modules)


def test_lora_lists_know_each_files_family_and_filter_by_the_base(
    sdxl_ckpt, sdxl_lora, trained_lora, tmp_path
):
    """The Generate tab's cards, as A1111's: only LoRAs for the base model's family, unless asked."""
    import shutil

    from lorakit.generate.loras import for_family, list_loras
    from lorakit.gui.generate_tab import family_of_model, lora_cards

    shutil.copy(sdxl_lora, tmp_path / "xl-char.safetensors")
    shutil.copy(trained_lora, tmp_path / "sd1-char.safetensors")
    (tmp_path / "old.pt").write_bytes(b"not a safetensors file")  # family unknown: always listed
    families = {lf.name: lf.family for lf in list_loras(tmp_path)}
    assert families == {"xl-char": "sdxl", "sd1-char": "sd1", "old": None}
    assert family_of_model(str(sdxl_ckpt)) == "sdxl"
    assert [lf.name for lf in for_family(list_loras(tmp_path), "sdxl")] == ["old", "xl-char"]
    assert lora_cards(tmp_path, "sd1")[1] == ["old", "sd1-char"]
    assert lora_cards(tmp_path, None)[1] == ["old", "sd1-char", "xl-char"]
