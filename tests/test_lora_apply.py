"""Applying LoRA files while drawing: LoCon with lora_mid (Tucker), DoRA, LDM-style SD1 names,
all-or-nothing merging, and the one LoRA reader. Expectations are written out here independently
of lorakit's merge code."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from lorakit.errors import ModelError
from lorakit.generate.pipeline import Generator
from lorakit.network.inspect import architecture, inspect_lora

CONV = "lora_unet_down_blocks_0_resnets_0_conv1"  # Conv2d 32 -> 32, 3x3
WIDE_CONV = "lora_unet_up_blocks_1_resnets_0_conv1"  # Conv2d 96 -> 32, 3x3
Q = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # Linear 32 -> 32
FF = "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2"  # Linear 256 -> 64
TE_Q = "lora_te_text_model_encoder_layers_1_self_attn_q_proj"  # Linear 32 -> 32


@pytest.fixture
def lora_dir(tmp_path):
    d = tmp_path / "Lora"
    d.mkdir()
    return d


@pytest.fixture
def gen(tiny_base, lora_dir):
    return Generator.from_path(tiny_base, lora_dir, device="cpu")


def weight(gen, name):
    return gen_modules(gen)[name].weight.detach().clone()


def gen_modules(gen):
    from lorakit.network.targets import kohya_module_map

    return kohya_module_map(gen.unet, gen.text_encoder)


def snapshot(gen):
    return {k: m.weight.detach().clone() for k, m in gen_modules(gen).items()}


def changed(before, gen):
    return sorted(k for k, m in gen_modules(gen).items() if not torch.equal(before[k], m.weight))


def lora_pair(out, inp, rank, gen_seed, kernel=()):
    g = torch.Generator().manual_seed(gen_seed)
    down = torch.randn(rank, inp, *kernel, generator=g) * 0.3
    up = torch.randn(out, rank, *((1, 1) if kernel else ()), generator=g) * 0.3
    return down, up


def save(lora_dir, name, tensors):
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(lora_dir / f"{name}.safetensors"))


def test_locon_with_lora_mid_merges_up_mid_down_and_unloads(gen, lora_dir):
    r, alpha, mult = 3, 1.5, 0.7
    g = torch.Generator().manual_seed(1)
    tucker = {
        f"{CONV}.lora_down.weight": torch.randn(r, 32, 1, 1, generator=g),
        f"{CONV}.lora_mid.weight": torch.randn(r, r, 3, 3, generator=g),
        f"{CONV}.lora_up.weight": torch.randn(32, r, 1, 1, generator=g),
        f"{CONV}.alpha": torch.tensor(alpha),
    }
    plain_down, plain_up = lora_pair(32, 96, 2, 2, kernel=(3, 3))  # a plain LoCon 3x3 in the same file
    q_down, q_up = lora_pair(32, 32, 4, 3)
    tensors = {
        **tucker,
        f"{WIDE_CONV}.lora_down.weight": plain_down,
        f"{WIDE_CONV}.lora_up.weight": plain_up,
        f"{WIDE_CONV}.alpha": torch.tensor(1.0),
        f"{Q}.lora_down.weight": q_down,
        f"{Q}.lora_up.weight": q_up,
    }  # no alpha for Q: scale 1
    save(lora_dir, "tucker", tensors)
    before = snapshot(gen)
    gen.apply_loras(f"x <lora:tucker:{mult}>")

    down, mid, up = (tucker[f"{CONV}.lora_{p}.weight"] for p in ("down", "mid", "up"))
    expected = before[CONV] + mult * alpha / r * torch.einsum(
        "oa,abhw,bi->oihw", up[:, :, 0, 0], mid, down[:, :, 0, 0]
    )
    torch.testing.assert_close(weight(gen, CONV), expected, rtol=1e-5, atol=1e-6)
    expected = before[WIDE_CONV] + mult * 0.5 * torch.einsum(
        "or,rihw->oihw", plain_up[:, :, 0, 0], plain_down
    )
    torch.testing.assert_close(weight(gen, WIDE_CONV), expected, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight(gen, Q), before[Q] + mult * q_up @ q_down, rtol=1e-5, atol=1e-6)
    assert changed(before, gen) == sorted([CONV, WIDE_CONV, Q])
    gen.apply_loras("x")
    assert changed(before, gen) == []

    modules = inspect_lora(lora_dir / "tucker.safetensors")["modules"]
    assert (modules["unet"], modules["conv3x3_locon"], modules["tucker"], modules["dora"]) == (3, 2, 1, 0)


def test_tucker_delta_acts_like_running_down_mid_up_convs():
    """The merged Tucker update is the LyCORIS forward (1x1 down, kxk mid, 1x1 up) as one conv."""
    from lorakit.network.delta import lora_delta, lora_modules

    g = torch.Generator().manual_seed(4)
    down, mid, up = (
        torch.randn(3, 8, 1, 1, generator=g),
        torch.randn(3, 3, 3, 3, generator=g),
        torch.randn(5, 3, 1, 1, generator=g),
    )
    m = lora_modules({"m.lora_down.weight": down, "m.lora_mid.weight": mid, "m.lora_up.weight": up}, "t")["m"]
    x = torch.randn(2, 8, 6, 6, generator=g)
    chained = F.conv2d(F.conv2d(F.conv2d(x, down), mid, padding=1), up)
    torch.testing.assert_close(
        F.conv2d(x, lora_delta(m, torch.Size((5, 8, 3, 3))), padding=1), chained, rtol=1e-4, atol=1e-4
    )


def _dora_expected(w, delta, scale, on_output, mult):
    merged = w + delta
    if on_output:  # one norm per output row
        norms = torch.stack([merged[o].pow(2).sum().sqrt() for o in range(merged.shape[0])])
        target = merged * (scale.flatten() / norms).view(-1, *[1] * (w.dim() - 1))
    else:  # one norm per input column
        norms = torch.stack([merged[:, i].pow(2).sum().sqrt() for i in range(merged.shape[1])])
        target = merged * (scale.flatten() / norms).view(1, -1, *[1] * (w.dim() - 2))
    return w + mult * (target - w)


@pytest.mark.parametrize("on_output", [True, False])
def test_dora_scale_renormalises_along_its_axis(gen, lora_dir, on_output):
    before = snapshot(gen)
    g = torch.Generator().manual_seed(5)
    tensors, expected = {}, {}
    for i, (name, kernel) in enumerate(((Q, ()), (FF, ()), (CONV, (3, 3)), (TE_Q, ()))):
        w = before[name]
        down, up = lora_pair(w.shape[0], w.shape[1], 2, i, kernel)
        axis_norm = w.flatten(1).norm(dim=1) if on_output else w.transpose(0, 1).flatten(1).norm(dim=1)
        scale = axis_norm * (1 + 0.5 * torch.rand(axis_norm.shape, generator=g))  # a trained magnitude
        shape = (-1, 1, *[1] * len(kernel)) if on_output else (1, -1, *[1] * len(kernel))
        tensors |= {
            f"{name}.lora_down.weight": down,
            f"{name}.lora_up.weight": up,
            f"{name}.alpha": torch.tensor(1.0),
            f"{name}.dora_scale": scale.reshape(shape),
        }
        delta = 0.5 * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
        expected[name] = (w, delta, scale)
    save(lora_dir, "dora", tensors)
    for mult in (1.0, 0.6):
        gen.apply_loras(f"x <lora:dora:{mult}>")
        for name, (w, delta, scale) in expected.items():
            want = _dora_expected(w, delta, scale, on_output, mult)
            torch.testing.assert_close(weight(gen, name), want, rtol=1e-5, atol=1e-6, msg=name)
            plain = w + mult * delta
            assert (weight(gen, name) - plain).abs().max() > 1e-3  # dora_scale is not ignored
            if mult == 1.0:  # at full strength each row (column) has the magnitude the file stores
                merged = weight(gen, name) if on_output else weight(gen, name).transpose(0, 1)
                torch.testing.assert_close(merged.flatten(1).norm(dim=1), scale, rtol=1e-5, atol=1e-5)
    gen.restore_base()
    assert changed(before, gen) == []

    assert inspect_lora(lora_dir / "dora.safetensors")["modules"]["dora"] == 4


def test_sd1_lora_with_ldm_unet_names_applies_like_diffusers_names(gen, lora_dir):
    ldm_to_ours = {
        "lora_unet_input_blocks_0_0": "lora_unet_conv_in",
        "lora_unet_time_embed_0": "lora_unet_time_embedding_linear_1",
        "lora_unet_input_blocks_1_1_proj_in": "lora_unet_down_blocks_0_attentions_0_proj_in",
        "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q": Q,
        "lora_unet_input_blocks_1_0_in_layers_2": CONV,
        "lora_unet_input_blocks_2_0_op": "lora_unet_down_blocks_0_downsamplers_0_conv",
        "lora_unet_input_blocks_3_0_skip_connection": "lora_unet_down_blocks_1_resnets_0_conv_shortcut",
        "lora_unet_middle_block_0_emb_layers_1": "lora_unet_mid_block_resnets_0_time_emb_proj",
        "lora_unet_middle_block_1_transformer_blocks_0_ff_net_2": FF,
        "lora_unet_middle_block_2_out_layers_3": "lora_unet_mid_block_resnets_1_conv2",
        "lora_unet_output_blocks_1_1_conv": "lora_unet_up_blocks_0_upsamplers_0_conv",
        "lora_unet_output_blocks_2_0_in_layers_2": WIDE_CONV,
        "lora_unet_output_blocks_3_1_transformer_blocks_0_attn2_to_k": (
            "lora_unet_up_blocks_1_attentions_1_transformer_blocks_0_attn2_to_k"
        ),
        "lora_unet_out_2": "lora_unet_conv_out",
    }
    base = snapshot(gen)
    ours, ldm = {}, {}
    for i, (ldm_name, name) in enumerate(ldm_to_ours.items()):
        w = base[name]
        down, up = lora_pair(w.shape[0], w.shape[1], 2, i, tuple(w.shape[2:]))
        for target, n in ((ours, name), (ldm, ldm_name)):
            target |= {
                f"{n}.lora_down.weight": down,
                f"{n}.lora_up.weight": up,
                f"{n}.alpha": torch.tensor(1.0),
            }
    save(lora_dir, "diffusers_names", ours)
    save(lora_dir, "ldm_names", ldm)
    gen.apply_loras("<lora:diffusers_names:0.8>")
    by_ours = snapshot(gen)
    gen.apply_loras("<lora:ldm_names:0.8>")
    assert changed(by_ours, gen) == []
    assert changed(base, gen) == sorted(ldm_to_ours.values())

    assert inspect_lora(lora_dir / "ldm_names.safetensors")["architecture"] == "SD1.x/SD2.x"
    sdxl = ["lora_te1_text_model_encoder_layers_0_mlp_fc1.alpha", "lora_unet_input_blocks_4_1_proj_in.alpha"]
    assert (
        architecture(sdxl)
        == architecture(sdxl[1:] + ["lora_unet_input_blocks_7_1_transformer_blocks_9_ff_net_2.alpha"])
        == "SDXL"
    )


def test_a_module_named_twice_is_refused(gen, lora_dir):
    down, up = lora_pair(32, 32, 2, 0)
    names = (Q, "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q")
    save(
        lora_dir, "twice", {f"{n}.lora_{p}.weight": t for n in names for p, t in (("down", down), ("up", up))}
    )
    before = snapshot(gen)
    with pytest.raises(ModelError, match="name the same module"):
        gen.apply_loras("<lora:twice:1>")
    assert changed(before, gen) == []


def _good_file(gen, lora_dir):
    """A LoRA on every UNet Linear (many modules), to apply before a bad one."""
    tensors = {}
    for i, (name, m) in enumerate(sorted(gen_modules(gen).items())):
        if isinstance(m, torch.nn.Linear):
            down, up = lora_pair(*m.weight.shape, 2, i)
            tensors |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
    save(lora_dir, "good", tensors)
    return len(tensors) // 2


def test_wrong_shape_lora_is_refused_before_any_weight_changes(gen, lora_dir):
    n = _good_file(gen, lora_dir)
    assert n > 20
    before = snapshot(gen)
    bad = {}
    for name, m in sorted(gen_modules(gen).items())[:16]:  # 15 modules fit, the last does not
        down, up = lora_pair(*m.weight.shape[:2], 2, 7, tuple(m.weight.shape[2:]))
        bad |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up}
    bad[f"{name}.lora_up.weight"] = torch.zeros(
        m.weight.shape[0] + 8, 2, *bad[f"{name}.lora_up.weight"].shape[2:]
    )
    save(lora_dir, "wrong_shape", bad)
    gen.apply_loras("<lora:good:1>")
    with pytest.raises(ModelError, match=rf"wrong_shape.*{name}.*lora_up .*another base model"):
        gen.apply_loras("<lora:good:1> <lora:wrong_shape:1>")
    assert changed(before, gen) == []  # not even the good LoRA stays half applied
    gen.apply_loras("<lora:good:1>")  # and the generator still works afterwards
    assert len(changed(before, gen)) == n


def test_lycoris_tensor_lorakit_cannot_apply_is_refused_before_any_change(gen, lora_dir):
    down, up = lora_pair(32, 32, 2, 0)
    save(
        lora_dir, "mixed", {f"{Q}.lora_down.weight": down, f"{Q}.lora_up.weight": up, f"{CONV}.hada_w1_a": up}
    )
    before = snapshot(gen)
    with pytest.raises(ModelError, match=r"mixed.*hada_w1_a.*LoHa"):
        gen.apply_loras("<lora:mixed:1>")
    assert changed(before, gen) == []


def test_failure_while_merging_restores_every_weight(gen, lora_dir, monkeypatch):
    import lorakit.network.merge as merge

    n = _good_file(gen, lora_dir)
    before = snapshot(gen)
    real, calls = merge.module_update, []

    def failing(*args):
        calls.append(1)
        if len(calls) == n // 2:
            raise RuntimeError("CUDA out of memory (injected)")
        return real(*args)

    monkeypatch.setattr(merge, "module_update", failing)
    with pytest.raises(
        ModelError, match=r"'good@.*good.safetensors' could not be applied.*injected.*restored"
    ):
        gen.apply_loras("<lora:good:1>")
    assert len(calls) == n // 2 and changed(before, gen) == []


def test_pt_lora_is_refused_with_how_to_convert(gen, lora_dir, tmp_path):
    from lorakit.network.file import read_lora_file

    down, up = lora_pair(32, 32, 2, 0)
    torch.save({f"{Q}.lora_down.weight": down, f"{Q}.lora_up.weight": up}, lora_dir / "old.pt")
    before = snapshot(gen)
    with pytest.raises(ModelError, match=r"old\.pt: a \.pt LoRA is a pickle.*Convert.*old\.safetensors"):
        gen.apply_loras("<lora:old:1>")
    assert changed(before, gen) == []
    with pytest.raises(ModelError, match="Convert"):
        read_lora_file(lora_dir / "old.pt")  # inspect and network_weights read through the same rule


@pytest.mark.parametrize(
    "tensors,named",
    [
        (
            {"lora_down.weight": torch.zeros(2, 8, 1, 1), "lora_up.weight": torch.zeros(5, 2, 1, 1)},
            "lora_down",
        ),
        ({"lora_down.weight": torch.zeros(2, 8, 3, 3), "lora_up.weight": torch.zeros(4, 2, 1, 1)}, "lora_up"),
        (
            {"lora_down.weight": torch.zeros(2, 8, 1, 1), "lora_mid.weight": torch.zeros(2, 2, 1, 1)}
            | {"lora_up.weight": torch.zeros(5, 2, 1, 1)},
            "Tucker",
        ),
        (
            {"lora_down.weight": torch.zeros(2, 8, 3, 3), "lora_up.weight": torch.zeros(5, 2, 1, 1)}
            | {"dora_scale": torch.zeros(1, 5, 1, 1)},
            "dora_scale",
        ),
        (
            {"lora_down.weight": torch.zeros(2, 8, 3, 3), "lora_up.weight": torch.zeros(5, 2)}
            | {"alpha": torch.ones(2)},
            "alpha",
        ),
    ],
)
def test_each_tensor_is_checked_against_the_weight_shape(tensors, named):
    from lorakit.network.delta import check_fits, lora_modules

    m = lora_modules({f"lora_unet_x.{k}": v for k, v in tensors.items()}, "'f.safetensors'")["lora_unet_x"]
    with pytest.raises(
        ModelError, match=rf"'f.safetensors': module lora_unet_x does not fit .*\(5, 8, 3, 3\): {named}"
    ):
        check_fits(m, torch.Size((5, 8, 3, 3)), "'f.safetensors'")
