"""LyCORIS files (LoHa, LoKr, (IA)³, full, norm, DoRA on each) read and merged as LyCORIS builds them.

The reference is the `lycoris-lora` package itself: each module class is built on a small Linear
and a 3x3 Conv2d, given random factors, and its own state_dict is the file; its own rebuild of ΔW
(the one its forward adds) is what lorakit's must equal. Then whole files go through LoraMerger on
the tiny SD1 model: exactly the named weights (and biases) move, by ΔW, and restore() is bit-exact.
"""

import math
import re

import lycoris.modules as lycoris_modules  # the reference: lycoris-lora (the `test` extra)
import pytest
import torch
import torch.nn as nn
from lycoris.functional import factorization
from lycoris.functional import loha as loha_fn
from lycoris.functional import lokr as lokr_fn

from lorakit.errors import ModelError
from lorakit.network.delta import bias_update, check_fits, lora_delta, lora_modules, module_update


def layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(96, 64)
    return nn.Conv2d(32, 48, 3, padding=1)


def randomise(module: nn.Module, seed: int) -> None:
    """LyCORIS starts one factor at zero (ΔW = 0); random factors make the comparison mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.startswith("org_module"):
                continue
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
            if name == "dora_scale":
                p.abs_().add_(0.5)


def file_tensors(module: nn.Module, name: str = "m") -> dict[str, torch.Tensor]:
    """What lycoris.kohya saves for this module: its state_dict under the module's name."""
    return {f"{name}.{k}": v.detach().clone() for k, v in module.state_dict().items()}


def ours(tensors: dict[str, torch.Tensor], weight: torch.Tensor):
    m = lora_modules(tensors, "'test.safetensors'")["m"]
    check_fits(m, weight.shape, "'test.safetensors'")
    return m


def close(a: torch.Tensor, b: torch.Tensor) -> None:
    torch.testing.assert_close(a.float(), b.float(), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- ΔW per type


@pytest.mark.parametrize(
    "kind,tucker,rank,alpha",
    [("linear", False, 4, 1.0), ("conv", False, 3, 1.5), ("conv", True, 3, 6.0)],
)
def test_locon_delta_is_lycoris(kind, tucker, rank, alpha):
    org = layer(kind)
    mod = lycoris_modules.LoConModule("m", org, 1.0, rank, alpha, use_tucker=tucker)
    randomise(mod, 1)
    tensors = file_tensors(mod)
    assert ("m.lora_mid.weight" in tensors) == tucker
    m = ours(tensors, org.weight)
    assert (m.kind, m.rank, m.scale) == ("lora", rank, alpha / rank)
    close(lora_delta(m, org.weight.shape), mod.get_diff_weight(1.0)[0])


@pytest.mark.parametrize(
    "kind,tucker,rank,alpha",
    [("linear", False, 4, 2.0), ("conv", False, 3, 1.0), ("conv", True, 3, 4.0)],
)
def test_loha_delta_is_lycoris(kind, tucker, rank, alpha):
    org = layer(kind)
    mod = lycoris_modules.LohaModule("m", org, 1.0, rank, alpha, use_tucker=tucker)
    randomise(mod, 2)
    tensors = file_tensors(mod)
    assert ("m.hada_t1" in tensors) == tucker and "m.hada_w2_b" in tensors
    m = ours(tensors, org.weight)
    assert (m.kind, m.rank, m.scale) == ("loha", rank, alpha / rank)
    # LohaModule.get_weight is the ΔW its forward adds (alpha/rank once, as A1111 and ComfyUI scale)
    expected = mod.get_weight(org.weight.shape)
    close(lora_delta(m, org.weight.shape), expected)
    t = {k.split(".", 1)[1]: v for k, v in tensors.items()}
    functional = loha_fn.diff_weight(
        t["hada_w1_b"], t["hada_w1_a"], t["hada_w2_b"], t["hada_w2_a"], t.get("hada_t1"), t.get("hada_t2"),
        gamma=alpha / rank,
    )  # fmt: skip
    close(lora_delta(m, org.weight.shape), functional.reshape(org.weight.shape))


LOKR_CASES = {
    # name: (layer, module kwargs, params the file must have, scale)
    "w1 full, w2 low rank": ("linear", dict(lora_dim=2, alpha=1.0), {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}, 0.5),
    "both halves low rank": (
        "linear", dict(lora_dim=2, alpha=3.0, decompose_both=True),
        {"lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b"}, 1.5,
    ),
    "both full: scale 1": ("linear", dict(lora_dim=8, alpha=2.0), {"lokr_w1", "lokr_w2"}, 1.0),
    "w1 low rank, w2 full": (
        "wide", dict(lora_dim=6, alpha=3.0, decompose_both=True, unbalanced_factorization=True),
        {"lokr_w1_a", "lokr_w1_b", "lokr_w2"}, 0.5,
    ),
    "conv, w2 flat": ("conv", dict(lora_dim=2, alpha=1.0), {"lokr_w1", "lokr_w2_a", "lokr_w2_b"}, 0.5),
    "conv, Tucker w2": (
        "conv", dict(lora_dim=2, alpha=1.0, use_tucker=True), {"lokr_w1", "lokr_w2_a", "lokr_w2_b", "lokr_t2"}, 0.5,
    ),
    "conv, both full": ("conv", dict(lora_dim=8, alpha=4.0, factor=8), {"lokr_w1", "lokr_w2"}, 1.0),
}  # fmt: skip


@pytest.mark.parametrize("case", LOKR_CASES)
def test_lokr_delta_is_lycoris(case):
    kind, kwargs, params, scale = LOKR_CASES[case]
    org = nn.Linear(96, 128) if kind == "wide" else layer(kind)
    mod = lycoris_modules.LokrModule("m", org, 1.0, **kwargs)
    randomise(mod, 3)
    tensors = file_tensors(mod)
    assert {k.split(".", 1)[1] for k in tensors} - {"alpha"} == params
    m = ours(tensors, org.weight)
    assert m.kind == "lokr" and m.scale == pytest.approx(scale)
    close(lora_delta(m, org.weight.shape), mod.get_weight(org.weight.shape))


def test_lokr_factor_shapes_follow_lycoris_factorization():
    """The reference's SD shapes: a rank-8 LoKr on a 320x320 Linear is w1 (16, 16) and w2 (20, 8)·(8, 20)."""
    assert factorization(320, -1) == (16, 20) and factorization(1280, 8) == (8, 160)
    mod = lycoris_modules.LokrModule("m", nn.Linear(320, 320), 1.0, 8, 4.0)
    tensors = file_tensors(mod)
    assert [tuple(tensors[f"m.{p}"].shape) for p in ("lokr_w1", "lokr_w2_a", "lokr_w2_b")] == [
        (16, 16), (20, 8), (8, 20),
    ]  # fmt: skip
    assert lora_modules(tensors, "t")["m"].scale == 0.5
    weights = [tensors.get(f"m.lokr_{p}") for p in ("w1", "w1_a", "w1_b", "w2", "w2_a", "w2_b", "t2")]
    close(
        lora_delta(lora_modules(tensors, "t")["m"], torch.Size((320, 320))),
        lokr_fn.diff_weight(*weights, gamma=4.0),
    )


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("on_input", [False, True])
def test_ia3_delta_is_lycoris(kind, on_input):
    org = layer(kind)
    mod = lycoris_modules.IA3Module("m", org, 1.0, train_on_input=on_input)
    randomise(mod, 4)
    tensors = file_tensors(mod)
    assert set(tensors) == {"m.weight", "m.on_input"}
    m = ours(tensors, org.weight)
    assert (m.kind, m.rank) == ("ia3", None)
    base = org.weight.detach()
    close(lora_delta(m, base.shape, base), mod.get_merged_weight(1.0)[0] - base)
    close(base + module_update(m, base, 0.6), mod.get_merged_weight(0.6)[0])
    with pytest.raises(ModelError, match=r"\(IA\)³.*base weight"):
        lora_delta(m, base.shape)


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_full_diff_and_bias_are_lycoris(kind):
    org = layer(kind)
    g = torch.Generator().manual_seed(5)
    diff, diff_b = torch.randn(org.weight.shape, generator=g), torch.randn(org.bias.shape, generator=g)
    with torch.no_grad():  # (LyCORIS loads its modules so)
        mod = lycoris_modules.FullModule.make_module_from_state_dict("m", org, diff, diff_b)
    weight, bias = mod.get_merged_weight(0.7)
    m = ours({"m.diff": diff, "m.diff_b": diff_b}, org.weight)
    assert m.kind == "full"
    close(org.weight + module_update(m, org.weight.detach(), 0.7), weight)
    close(org.bias + bias_update(m, 0.7), bias)


@pytest.mark.parametrize("norm", [nn.LayerNorm(32), nn.GroupNorm(8, 32)], ids=["LayerNorm", "GroupNorm"])
def test_norm_weight_and_bias_are_lycoris(norm):
    g = torch.Generator().manual_seed(6)
    w_norm, b_norm = torch.randn(32, generator=g), torch.randn(32, generator=g)
    with torch.no_grad():
        mod = lycoris_modules.NormModule.make_module_from_state_dict("m", norm, w_norm, b_norm)
    weight, bias = mod.get_merged_weight(0.5)
    m = ours({"m.w_norm": w_norm, "m.b_norm": b_norm}, norm.weight)
    assert m.kind == "norm"
    close(norm.weight + module_update(m, norm.weight.detach(), 0.5), weight)
    close(norm.bias + bias_update(m, 0.5), bias)


@pytest.mark.parametrize("algo", ["LoConModule", "LohaModule", "LokrModule"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("wd_on_out", [True, False])
def test_dora_on_each_type_is_lycoris(algo, kind, wd_on_out):
    org = layer(kind)
    # alpha = rank: LohaModule/LokrModule.get_merged_weight apply alpha/rank twice (get_diff_weight
    # over get_weight, lycoris-lora 4.1.3), which only scale 1 leaves out of the comparison
    mod = getattr(lycoris_modules, algo)("m", org, 1.0, 2, 2.0, weight_decompose=True, wd_on_out=wd_on_out)
    randomise(mod, 7)
    tensors = file_tensors(mod)
    assert tensors["m.dora_scale"].shape[0] == (org.weight.shape[0] if wd_on_out else 1)
    m = ours(tensors, org.weight)
    assert m.dora_on_output(org.weight.shape) == wd_on_out
    base = org.weight.detach()
    close(base + module_update(m, base, 1.0), mod.get_merged_weight(1.0, shape=base.shape)[0])


# --------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "params,named",
    [
        ({"a1.weight": (96, 2), "a2.weight": (2, 96), "b1.weight": (64, 2), "b2.weight": (2, 96)}, "GLoRA"),
        ({"oft_blocks": (4, 16, 16), "alpha": ()}, "OFT"),
        ({"lora_down.weight": (2, 96), "lora_up.weight": (64, 2), "hada_w1_a": (64, 2)}, "not exactly the params of one type"),
        ({"hada_w1_a": (64, 2), "hada_w1_b": (2, 96), "alpha": ()}, "looks most like LoHa"),
        ({"lokr_w1": (8, 8), "lokr_w1_a": (8, 2), "lokr_w2": (8, 12)}, "looks most like LoKr"),
        ({"hada_w1_a": (64, 2), "hada_w1_b": (2, 96), "hada_w2_a": (64, 2), "hada_w2_b": (2, 96), "scale": ()}, "LoHa"),
    ],
)  # fmt: skip
def test_unknown_key_sets_are_refused_naming_module_and_keys(params, named):
    tensors = {f"lora_unet_x.{p}": torch.zeros(s) for p, s in params.items()}
    with pytest.raises(ModelError, match=rf"module lora_unet_x has .*{named}") as e:
        lora_modules(tensors, "'f.safetensors'")
    assert all(p in str(e.value) for p in params)


@pytest.mark.parametrize(
    "tensors,named",
    [
        ({"hada_w1_a": (64, 2), "hada_w1_b": (2, 96), "hada_w2_a": (64, 2), "hada_w2_b": (2, 96)}, "LoHa"),
        ({"hada_w1_a": (48, 2), "hada_w1_b": (2, 32), "hada_w2_a": (48, 3), "hada_w2_b": (3, 32)}, "LoHa"),
        ({"lokr_w1": (6, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (2, 8)}, "LoKr"),  # a Linear's LoKr
        ({"lokr_w1": (6, 4), "lokr_w2_a": (8, 2), "lokr_w2_b": (3, 72)}, "do not multiply"),
        ({"diff": (48, 32, 1, 1)}, "full"),
        ({"diff": (48, 32, 3, 3), "diff_b": (32,)}, "diff_b"),
        ({"w_norm": (48,)}, "norm"),
        ({"weight": (32,), "on_input": ()}, r"\(IA\)³ weight \(32,\)"),
    ],
)
def test_types_are_checked_against_the_weight_shape(tensors, named):
    m = lora_modules({f"lora_unet_x.{p}": torch.zeros(s) for p, s in tensors.items()}, "t")["lora_unet_x"]
    with pytest.raises(
        ModelError, match=rf"lora_unet_x does not fit .*\(48, 32, 3, 3\): .*{named}.*another base"
    ):
        check_fits(m, torch.Size((48, 32, 3, 3)), "'f.safetensors'")


# --------------------------------------------------------------------------- files on the tiny SD1 model

Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # Linear 32 -> 32, no bias
CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # Conv2d 32 -> 32, 3x3
FF = "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2"  # Linear 256 -> 64
TE_Q = "lora_te_text_model_encoder_layers_1_self_attn_q_proj"  # Linear 32 -> 32
GN = "lora_unet_down_blocks_0_resnets_0_norm1"  # GroupNorm(32)
TE_LN = "lora_te_text_model_encoder_layers_0_layer_norm1"  # LayerNorm(32)


@pytest.fixture(scope="module")
def tiny():
    from lorakit.models.tiny import build_models, tiny_arch

    unet, _vae, te = build_models(tiny_arch(), seed=0)
    return unet, te


def state(unet, te) -> dict[str, torch.Tensor]:
    return {
        **{f"unet.{k}": v.clone() for k, v in unet.state_dict().items()},
        **{f"te.{k}": v.clone() for k, v in te.state_dict().items()},
    }


def lycoris_file(tiny) -> tuple[dict[str, torch.Tensor], dict[str, tuple[nn.Module, nn.Module]]]:
    """A file of LoHa (Q), LoKr (CONV, Tucker), full with bias (FF), (IA)³ (TE_Q) and norm (GN, TE_LN)
    modules, each saved by its LyCORIS class; name -> (LyCORIS module, the layer it is made for)."""
    from lorakit.network.targets import kohya_module_map, kohya_norm_map

    unet, te = tiny
    layers = kohya_module_map(unet, te) | kohya_norm_map(unet, te)
    ly = lycoris_modules
    made = {
        Q: ly.LohaModule(Q, layers[Q], 1.0, 3, 1.5),
        CONV: ly.LokrModule(CONV, layers[CONV], 1.0, 2, 1.0, use_tucker=True),
        TE_Q: ly.IA3Module(TE_Q, layers[TE_Q], 1.0),
    }
    for i, mod in enumerate(made.values()):
        randomise(mod, 10 + i)
    tensors = {k: v for name, mod in made.items() for k, v in file_tensors(mod, name).items()}
    g = torch.Generator().manual_seed(20)
    for name in (FF, GN, TE_LN):
        w, b = layers[name].weight, layers[name].bias
        cls = ly.FullModule if name == FF else ly.NormModule
        params = ("diff", "diff_b") if name == FF else ("w_norm", "b_norm")
        dw, db = torch.randn(w.shape, generator=g) * 0.1, torch.randn(b.shape, generator=g) * 0.1
        tensors |= {f"{name}.{params[0]}": dw, f"{name}.{params[1]}": db}
        with torch.no_grad():
            made[name] = cls.make_module_from_state_dict(name, layers[name], dw, db)
    return tensors, {name: (mod, layers[name]) for name, mod in made.items()}


def test_lycoris_file_merges_exactly_the_named_weights_and_restores_bit_exact(tiny, tmp_path):
    from safetensors.torch import save_file

    from lorakit.network.file import read_lora_file
    from lorakit.network.merge import LoraMerger

    unet, te = tiny
    tensors, made = lycoris_file(tiny)
    save_file(tensors, str(tmp_path / "ly.safetensors"))
    read, _ = read_lora_file(tmp_path / "ly.safetensors")  # accepted: no lora_down anywhere
    before = state(unet, te)
    mult = 0.8
    # what LyCORIS merges at this multiplier, from the layers as they are now (its modules read them):
    # LoHa/LoKr W + m·ΔW with ΔW from get_weight (alpha/rank once, what their forward adds)
    expected = {}
    for name, (mod, lay) in made.items():
        if isinstance(mod, (lycoris_modules.LohaModule, lycoris_modules.LokrModule)):
            expected[name] = (lay.weight + mod.get_weight(lay.weight.shape) * mult, None)
        else:
            expected[name] = mod.get_merged_weight(mult)
    merger = LoraMerger(unet, te)
    merger.apply([("ly", read, mult, mult)])
    after = state(unet, te)
    moved = sorted(k for k in after if not torch.equal(after[k], before[k]))
    paths = {n: p for n, p in _paths(unet, te).items() if n in made}
    with_bias = (FF, GN, TE_LN)
    assert moved == sorted([f"{paths[n]}.weight" for n in made] + [f"{paths[n]}.bias" for n in with_bias])
    for name, (weight, bias) in expected.items():
        close(after[f"{paths[name]}.weight"], weight.detach())
        if name in with_bias:
            close(after[f"{paths[name]}.bias"], bias.detach())
    merger.restore()
    restored = state(unet, te)
    assert all(torch.equal(restored[k], before[k]) for k in before)


def _paths(unet, te) -> dict[str, str]:
    """kohya name -> 'unet.<path>' / 'te.<path>' (state-dict prefixes as `state` writes them)."""
    out = {}
    for prefix, model in (("unet", unet), ("te", te)):
        for path, _ in model.named_modules():
            if prefix == "unet":
                out[f"lora_unet_{path.replace('.', '_')}"] = f"unet.{path}"
            else:
                tail = re.sub(r"^(text_model\.)?", "", path).replace(".", "_")
                out[f"lora_te_text_model_{tail}"] = f"te.{path}"
    return out


def test_unknown_module_type_in_a_file_is_refused_before_any_change(tiny):
    from lorakit.network.merge import LoraMerger

    unet, te = tiny
    tensors, _ = lycoris_file(tiny)
    bad = tensors | {f"{FF}.a1.weight": torch.zeros(32, 2)}  # a GLoRA tensor among full's
    before = state(unet, te)
    with pytest.raises(ModelError, match=rf"module {FF} has a1\.weight, diff, diff_b: .*GLoRA"):
        LoraMerger(unet, te).apply([("ly", bad, 1.0, 1.0)])
    after = state(unet, te)
    assert all(torch.equal(after[k], before[k]) for k in before)


def test_bias_delta_on_a_layer_without_bias_is_refused(tiny):
    from lorakit.network.merge import LoraMerger

    unet, te = tiny
    tensors = {f"{Q}.diff": torch.zeros(32, 32), f"{Q}.diff_b": torch.zeros(32)}
    with pytest.raises(ModelError, match=rf"{Q} changes a bias.*has none"):
        LoraMerger(unet, te).apply([("f", tensors, 1.0, 1.0)])


def test_norm_modules_are_found_under_ldm_names_too(tiny):
    from lorakit.network.merge import LoraMerger

    unet, te = tiny
    ldm = "lora_unet_input_blocks_1_0_in_layers_0"  # = GN, the first ResNet's first GroupNorm
    merger = LoraMerger(unet, te)
    assert merger.aliases[ldm] == GN and isinstance(merger.norms[GN], nn.GroupNorm)
    assert isinstance(merger.norms[TE_LN], nn.LayerNorm) and GN not in merger.modules
    assert isinstance(merger.norms["lora_te_text_model_final_layer_norm"], nn.LayerNorm)
    before = merger.norms[GN].weight.detach().clone()
    merger.apply([("f", {f"{ldm}.w_norm": torch.ones(32)}, 1.0, 0.5)])
    torch.testing.assert_close(merger.norms[GN].weight, before + 0.5)
    merger.restore()
    assert torch.equal(merger.norms[GN].weight, before)


def test_sdxl_norm_layers_have_sgm_names():
    from lorakit.models.tiny import build_sdxl_models, tiny_sdxl_arch
    from lorakit.network.targets import sdxl_norm_map

    unet, _vae, te1, te2 = build_sdxl_models(tiny_sdxl_arch(), seed=0)
    norms = sdxl_norm_map(unet, (te1, te2))
    assert norms["lora_unet_input_blocks_1_0_in_layers_0"] is unet.down_blocks[0].resnets[0].norm1
    assert norms["lora_unet_out_0"] is unet.conv_norm_out
    assert (
        "lora_te2_text_model_final_layer_norm" in norms
        and "lora_te1_text_model_encoder_layers_0_layer_norm1" in norms
    )


def test_inspect_reports_types_ranks_dora_axis_and_narrows_consumers(tiny, tmp_path):
    from safetensors.torch import save_file

    from lorakit.network.inspect import format_table, inspect_lora

    tensors, _ = lycoris_file(tiny)
    save_file(tensors, str(tmp_path / "ly.safetensors"))
    info = inspect_lora(tmp_path / "ly.safetensors")
    assert info["modules"]["algorithms"] == {"loha": 1, "lokr": 1, "ia3": 1, "full": 1, "norm": 2}
    assert info["modules"]["tucker"] == 1 and info["modules"]["text_encoder"] == 2
    assert {(d["algo"], d["dim"], d["alpha"]) for d in info["dim_alpha"]} == {
        ("loha", 3, 1.5),
        ("lokr", 2, 1.0),
    }
    assert info["per_module"][TE_Q] == {"algo": "ia3", "dim": None, "alpha": None}
    assert info["loads_in"] == ["A1111", "Forge"]  # (IA)³: no ComfyUI; LyCORIS types: no diffusers/kohya
    table = format_table(info)
    assert "LoHa 1, LoKr 1, (IA)³ 1, full (diff) 1, norm 2" in table and "3 / 1.5  (LoHa, 1 modules" in table
    # the types without a rank are counted too
    assert "(IA)³, 1 modules, scale 1" in table and "norm, 2 modules, scale 1" in table

    # LoHa with output-axis DoRA only: ComfyUI and Forge; A1111 reads the input axis only
    loha = {k: v for k, v in tensors.items() if k.startswith(Q)}
    loha[f"{Q}.dora_scale"] = torch.ones(32, 1)
    save_file(loha, str(tmp_path / "dora.safetensors"))
    info = inspect_lora(tmp_path / "dora.safetensors")
    assert info["modules"]["dora_axis"] == ["output"] and info["loads_in"] == ["Forge", "ComfyUI"]
    assert "DoRA (dora_scale, output axis)" in format_table(info)
    assert math.isclose(info["dim_alpha"][0]["alpha"] / info["dim_alpha"][0]["dim"], 0.5)
