"""`lorakit merge --sd_model`: LoRAs baked into a checkpoint in its own layout. The expectation is
the base loaded by lorakit with the LoRAs merged by LoraMerger (what drawing with <lora:> does)."""

import json

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from lorakit.cli import main
from lorakit.errors import ConfigError, ModelError
from lorakit.models.loader import load_base_model
from lorakit.network.bake import bake_loras
from lorakit.network.merge import LoraMerger


def random_lora(base, seed: int, every: int = 1, rank: int = 2, alpha: float = 1.5) -> dict:
    """A LoRA over every `every`-th module the base's family knows (UNet convs, all text encoders)."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    modules = sorted(base.spec.module_map(base.unet, base.text_encoders).items())
    for name, mod in modules[::every]:
        w = mod.weight
        kernel = tuple(w.shape[2:])
        out[f"{name}.lora_down.weight"] = torch.randn(rank, w.shape[1], *kernel, generator=g) * 0.1
        out[f"{name}.lora_up.weight"] = (
            torch.randn(w.shape[0], rank, *((1, 1) if kernel else ()), generator=g) * 0.1
        )
        out[f"{name}.alpha"] = torch.tensor(alpha)
    return out


def random_lycoris(base, seed: int) -> dict:
    """A LyCORIS-style file mixing every type on the base's Linear layers (LoHa, LoKr, (IA)³, full with
    diff_b where the layer has a bias, DoRA'd LoRA) and norm modules on every GroupNorm / LayerNorm."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    out = {}
    linears = [(n, m) for n, m in sorted(base.spec.module_map(base.unet, base.text_encoders).items())
               if isinstance(m, torch.nn.Linear)]  # fmt: skip
    for i, (name, mod) in enumerate(linears):
        o, n = mod.weight.shape
        kind = ("loha", "lokr", "ia3", "full", "dora")[i % 5]
        if kind == "loha":
            t = {
                "hada_w1_a": rnd(o, 2),
                "hada_w1_b": rnd(2, n),
                "hada_w2_a": rnd(o, 2),
                "hada_w2_b": rnd(2, n),
            }
            t["alpha"] = torch.tensor(1.0)
        elif kind == "lokr":
            a, c = (2 if o % 2 == 0 else 1), (2 if n % 2 == 0 else 1)
            t = {
                "lokr_w1": rnd(a, c),
                "lokr_w2_a": rnd(o // a, 2),
                "lokr_w2_b": rnd(2, n // c),
                "alpha": torch.tensor(1.0),
            }
        elif kind == "ia3":
            t = {"weight": rnd(o), "on_input": torch.tensor(0)}
        elif kind == "full":
            t = {"diff": rnd(o, n)} | ({"diff_b": rnd(o)} if mod.bias is not None else {})
        else:
            t = {"lora_down.weight": rnd(2, n), "lora_up.weight": rnd(o, 2), "dora_scale": 1 + rnd(o, 1)}
        out |= {f"{name}.{p}": v for p, v in t.items()}
    for name, mod in sorted(base.spec.norm_module_map(base.unet, base.text_encoders).items()):
        out |= {f"{name}.w_norm": rnd(mod.weight.shape[0]), f"{name}.b_norm": rnd(mod.weight.shape[0])}
    return out


def save_lora(path, tensors, metadata=None):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


def header(path):
    with safe_open(str(path), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})


def models_of(base):
    return {"unet": base.unet, **{f"te{i}": te for i, te in enumerate(base.text_encoders)}}


def assert_same_weights(expected, got):
    for part, model in models_of(expected).items():
        want, have = model.state_dict(), models_of(got)[part].state_dict()
        assert set(want) == set(have)
        for k in want:
            assert torch.equal(want[k], have[k]), f"{part} {k}"


def raw(t):
    return t.contiguous().reshape(-1).view(torch.uint8)


def assert_untouched_bytes_identical(src, out):
    """Same keys, dtypes and shapes; returns the keys whose bytes differ (the baked ones)."""
    before, _ = header(src)
    after, _ = header(out)
    assert set(before) == set(after)
    for k in before:
        assert before[k].dtype == after[k].dtype and before[k].shape == after[k].shape, k
    return [k for k in before if not torch.equal(raw(before[k]), raw(after[k]))]


@pytest.fixture(scope="module")
def sd1(tiny_base):
    return load_base_model(tiny_base)


def test_bake_sd1_equals_loramerger_and_keeps_every_other_tensor(sd1, tiny_base, tmp_path):
    lora = save_lora(tmp_path / "a.safetensors", random_lora(sd1, 1), {"modelspec.title": "Alpha"})
    out = tmp_path / "baked.safetensors"
    result = bake_loras(tiny_base, [lora], [0.7], out)

    expected = load_base_model(tiny_base)
    LoraMerger.for_base(expected).apply([("a", header(lora)[0], 0.7, 0.7)])
    assert_same_weights(expected, load_base_model(out))

    changed = assert_untouched_bytes_identical(tiny_base, out)
    assert len(changed) == result.tensors == result.modules > 50  # UNet attention + convs + TE
    assert all(k.endswith(".weight") for k in changed)
    assert not any(k.startswith("first_stage_model.") for k in changed)  # the VAE is never touched
    _, md = header(out)
    assert json.loads(md["lorakit.arch"]) == sd1.arch
    assert md["modelspec.title"] == "baked"
    assert md["modelspec.merged_from"] == "tiny-sd1, Alpha"
    assert md["modelspec.architecture"] == "stable-diffusion-v1"


def test_two_loras_with_ratios_and_drawing_matches_the_lora_drawn(sd1, tiny_base, tmp_path):
    from lorakit.generate.params import GenerationParams
    from lorakit.generate.pipeline import Generator

    loras = tmp_path / "Lora"
    loras.mkdir()
    a = save_lora(loras / "a.safetensors", random_lora(sd1, 2, every=2))
    b = save_lora(loras / "b.safetensors", random_lora(sd1, 3, every=3, rank=3, alpha=3.0))
    out = tmp_path / "ab.safetensors"
    assert main(["merge", "--sd_model", str(tiny_base), "--models", str(a), str(b), "--ratios", "0.5", "-0.8",
                 "--save_to", str(out)]) == 0  # fmt: skip

    expected = load_base_model(tiny_base)
    LoraMerger.for_base(expected).apply([("a", header(a)[0], 0.5, 0.5), ("b", header(b)[0], -0.8, -0.8)])
    assert_same_weights(expected, load_base_model(out))

    small = dict(steps=3, width=64, height=64, seed=5, sampler="Euler a")
    with_loras = Generator.from_path(tiny_base, loras, device="cpu")
    drawn = with_loras.generate(GenerationParams(prompt="a bear <lora:a:0.5> <lora:b:-0.8>", **small))[0]
    plain = with_loras.generate(GenerationParams(prompt="a bear", **small))[0]
    baked = Generator.from_path(out, loras, device="cpu").generate(
        GenerationParams(prompt="a bear", **small)
    )[0]
    assert np.array_equal(np.asarray(baked.image), np.asarray(drawn.image))
    assert not np.array_equal(np.asarray(plain.image), np.asarray(drawn.image))  # the LoRAs do show


def test_save_precision_casts_every_float_and_ckpt_input(sd1, tiny_base, tmp_path):
    lora = save_lora(tmp_path / "a.safetensors", random_lora(sd1, 4, every=5))
    tensors, md = header(tiny_base)
    ckpt = tmp_path / "base.ckpt"
    torch.save({"state_dict": tensors, "lorakit.arch": md["lorakit.arch"], "global_step": 1}, ckpt)
    from_ckpt = bake_loras(ckpt, [lora], None, tmp_path / "c.safetensors").path
    from_st = bake_loras(tiny_base, [lora], None, tmp_path / "s.safetensors").path
    a, b = header(from_ckpt)[0], header(from_st)[0]
    assert set(a) == set(b) == set(tensors)
    assert all(torch.equal(a[k], b[k]) for k in a)

    half = bake_loras(tiny_base, [lora], [1.0], tmp_path / "h.safetensors", save_precision="fp16").path
    h = header(half)[0]
    assert set(h) == set(tensors)
    assert all(
        h[k].dtype == (torch.float16 if tensors[k].is_floating_point() else tensors[k].dtype) for k in h
    )
    untouched = [k for k in tensors if torch.equal(b[k], tensors[k])]
    assert untouched and all(torch.equal(h[k], tensors[k].half()) for k in untouched)


@pytest.mark.parametrize("which", ["sd1", "sdxl"])
def test_every_lycoris_type_bakes_like_the_merger(which, tiny_base, tiny_sdxl_bases, tmp_path):
    """LoHa, LoKr, (IA)³, full (with biases: SDXL's bigG q/k/v land in thirds of in_proj_bias), DoRA, and
    norm modules (GroupNorm / LayerNorm, bigG's ln_final) all bake to what LoraMerger merges."""
    path = tiny_base if which == "sd1" else tiny_sdxl_bases["eps"]
    base = load_base_model(path)
    tensors = random_lycoris(base, 12)
    lora = save_lora(tmp_path / "ly.safetensors", tensors)
    out = bake_loras(path, [lora], [0.8], tmp_path / "out.safetensors").path
    expected = load_base_model(path)
    LoraMerger.for_base(expected).apply([("ly", tensors, 0.8, 0.8)])
    assert_same_weights(expected, load_base_model(out))
    changed = assert_untouched_bytes_identical(path, out)
    assert any(k.endswith(".bias") for k in changed) and any("norm" in k for k in changed)
    if which == "sdxl":
        te2 = "conditioner.embedders.1.model."
        assert f"{te2}ln_final.weight" in changed and f"{te2}ln_final.bias" in changed
        assert any(k.startswith(te2) and k.endswith("attn.in_proj_bias") for k in changed)
        assert any(k.startswith(te2) and k.endswith("ln_1.bias") for k in changed)


def test_old_style_te_keys_are_kept(sd1, tiny_base, tmp_path):
    """Old SD1 files name TE weights without `text_model.`; the output keeps the file's own names."""
    tensors, md = header(tiny_base)
    inner = "cond_stage_model.transformer.text_model."
    old = {k.replace(inner, "cond_stage_model.transformer."): v for k, v in tensors.items()}
    base = tmp_path / "old.safetensors"
    save_file(old, str(base), metadata=md)
    lora_tensors = random_lora(sd1, 11, every=3)
    assert any(k.startswith("lora_te_") for k in lora_tensors)
    lora = save_lora(tmp_path / "a.safetensors", lora_tensors)
    out = bake_loras(base, [lora], [1.0], tmp_path / "out.safetensors").path
    changed = assert_untouched_bytes_identical(base, out)
    assert any(k.startswith("cond_stage_model.transformer.encoder.") for k in changed)
    expected = load_base_model(base)
    LoraMerger.for_base(expected).apply([("a", lora_tensors, 1.0, 1.0)])
    assert_same_weights(expected, load_base_model(out))


def test_refusals_leave_no_output(sd1, tiny_base, tmp_path, tiny_sdxl_bases):
    lora = save_lora(tmp_path / "a.safetensors", random_lora(sd1, 5, every=7))
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"old")
    with pytest.raises(ConfigError, match="--overwrite"):
        bake_loras(tiny_base, [lora], None, out)
    assert out.read_bytes() == b"old"
    bake_loras(tiny_base, [lora], None, out, overwrite=True)
    assert set(header(out)[0]) == set(header(tiny_base)[0])

    xl = load_base_model(tiny_sdxl_bases["eps"])
    xl_lora = save_lora(tmp_path / "xl.safetensors", random_lora(xl, 6, every=5))
    fresh = tmp_path / "fresh.safetensors"
    with pytest.raises(ModelError, match="another architecture"):
        bake_loras(tiny_base, [lora, xl_lora], None, fresh)
    assert list(tmp_path.glob("*fresh*")) == []
    with pytest.raises(ModelError, match="LoRA file, not a base model"):
        bake_loras(lora, [lora], None, fresh)
    import argparse

    unsafe = tmp_path / "unsafe.ckpt"  # pickles run code when loaded unrestricted: refused by name
    torch.save({"state_dict": header(tiny_base)[0], "args": argparse.Namespace(x=1)}, unsafe)
    with pytest.raises(ModelError, match="Python code/objects"):
        bake_loras(unsafe, [lora], None, fresh)
    with pytest.raises(ConfigError, match="one per model"):
        bake_loras(tiny_base, [lora], [1.0, 2.0], fresh)
    assert main(["merge", "--sd_model", str(tiny_base), "--models", str(lora), "--save_to", str(fresh),
                 "--new_rank", "4"]) == 2  # fmt: skip
    assert list(tmp_path.glob("*fresh*")) == []


def test_bake_sdxl_single_file(tiny_sdxl_bases, tmp_path):
    path = tiny_sdxl_bases["vpred"]
    xl = load_base_model(path)
    lora_tensors = random_lora(xl, 7)  # every module: TE2's q/k/v land in thirds of in_proj_weight
    lora = save_lora(tmp_path / "xl.safetensors", lora_tensors)
    out = bake_loras(path, [lora], [0.6], tmp_path / "xl-baked.safetensors").path

    expected = load_base_model(path)
    LoraMerger.for_base(expected).apply([("xl", lora_tensors, 0.6, 0.6)])
    got = load_base_model(out)
    assert (got.spec.key, got.family.v_pred) == ("sdxl", True)  # the v_pred/ztsnr markers are kept
    assert_same_weights(expected, got)
    changed = assert_untouched_bytes_identical(path, out)
    assert any("in_proj_weight" in k for k in changed)
    _, md = header(out)
    assert md["modelspec.prediction_type"] == "v"
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base"


def test_bake_diffusers_folder(sd1, tmp_path):
    folder = tmp_path / "base"
    for name, model in (("unet", sd1.unet), ("vae", sd1.vae), ("text_encoder", sd1.text_encoder)):
        model.save_pretrained(folder / name)
    (folder / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    stale = folder / "unet" / "diffusion_pytorch_model.bin"
    stale.write_bytes(b"old pickle")  # would keep unbaked weights beside the baked ones
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "vocab.json").write_text("{}")
    lora_tensors = random_lora(sd1, 8, every=2)
    lora = save_lora(tmp_path / "a.safetensors", lora_tensors)
    lycoris_tensors = random_lycoris(sd1, 13)  # biases and norms too
    lycoris = save_lora(tmp_path / "ly.safetensors", lycoris_tensors)
    out = tmp_path / "merged"
    bake_loras(folder, [lora, lycoris], [0.9, -0.5], out)
    assert (out / "tokenizer" / "vocab.json").read_text() == "{}"
    assert not (out / "unet" / "diffusion_pytorch_model.bin").exists()
    assert (out / "vae" / "diffusion_pytorch_model.safetensors").read_bytes() == (
        folder / "vae" / "diffusion_pytorch_model.safetensors"
    ).read_bytes()

    expected = load_base_model(folder)
    LoraMerger.for_base(expected).apply([("a", lora_tensors, 0.9, 0.9), ("ly", lycoris_tensors, -0.5, -0.5)])
    assert_same_weights(expected, load_base_model(out))
    with pytest.raises(ConfigError, match="--overwrite"):
        bake_loras(folder, [lora], [0.9], out)
    bake_loras(folder, [lora], [0.0], out, overwrite=True)  # ratio 0: the base, copied
    assert_same_weights(load_base_model(folder), load_base_model(out))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]  # no temp folders left


def test_lora_plus_lora_calls_merge_loras_and_saves_like_kohya(sd1, tmp_path, monkeypatch):
    """The CLI's side of LoRA+LoRA, with a stand-in for network/combine.py (tested on its own)."""
    import sys
    import types

    calls = []

    def merge_loras(loras, ratios, concat, new_rank, new_conv_rank):
        calls.append((len(loras), ratios, concat, new_rank, new_conv_rank))
        tensors, _ = loras[0]
        return {k: v * 2 for k, v in tensors.items()}, {
            "ss_network_module": "networks.lora",
            "modelspec.x": "1",
        }

    monkeypatch.setitem(
        sys.modules, "lorakit.network.combine", types.SimpleNamespace(merge_loras=merge_loras)
    )
    a_tensors = random_lora(sd1, 9, every=4)
    a = save_lora(tmp_path / "a.safetensors", a_tensors, {"modelspec.title": "A"})
    b = save_lora(tmp_path / "b.safetensors", random_lora(sd1, 10, every=4))
    out = tmp_path / "ab.safetensors"
    argv = [
        "merge",
        "--models",
        str(a),
        str(b),
        "--ratios",
        "0.5",
        "0.25",
        "--new_rank",
        "8",
        "--save_to",
        str(out),
    ]
    assert main(argv) == 0
    assert calls == [(2, [0.5, 0.25], False, 8, None)]
    tensors, md = header(out)
    assert all(torch.equal(tensors[k], a_tensors[k] * 2) for k in a_tensors)  # float by default, as kohya
    assert md["modelspec.title"] == "ab" and md["modelspec.merged_from"] == "A, b"
    assert md["sshs_model_hash"] and md["sshs_legacy_hash"] and md["ss_network_module"] == "networks.lora"
    assert main(argv) == 2  # exists, no --overwrite
    assert main([*argv, "--overwrite", "--no_metadata", "--save_precision", "fp16"]) == 0
    tensors, md = header(out)
    assert not any(k.startswith("modelspec.") for k in md) and md["ss_network_module"] == "networks.lora"
    assert {t.dtype for t in tensors.values()} == {torch.float16}


def test_lora_plus_lora_goes_to_combine(sd1, tmp_path):
    a = save_lora(tmp_path / "a.safetensors", random_lora(sd1, 9, every=4), {"modelspec.title": "A"})
    b = save_lora(tmp_path / "b.safetensors", random_lora(sd1, 10, every=4))
    out = tmp_path / "ab.safetensors"
    assert main(["merge", "--models", str(a), str(b), "--ratios", "0.5", "0.5", "--concat", "--save_to",
                 str(out)]) == 0  # fmt: skip
    tensors, md = header(out)
    assert md["modelspec.title"] == "ab" and md["modelspec.merged_from"] == "A, b"
    assert "sshs_model_hash" in md
    assert main(["merge", "--models", str(a), "--save_to", str(out)]) == 2  # exists, no --overwrite


def test_cli_help_lists_kohya_flags(capsys):
    with pytest.raises(SystemExit):
        main(["merge", "--help"])
    text = capsys.readouterr().out
    for flag in ("--sd_model", "--models", "--ratios", "--save_to", "--concat", "--new_rank", "--new_conv_rank",
                 "--save_precision", "--precision", "--no_metadata", "--overwrite"):  # fmt: skip
        assert flag in text
