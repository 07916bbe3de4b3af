"""kohya's LoRA tools: resize (fixed and dynamic rank), extract from two models, LoRA+LoRA merge
(kohya's sum, exact concat, SVD), their metadata and CLI. Small random LoRAs and the tiny bases."""

import json
import math

import pytest
import torch
from safetensors.torch import save_file

from lorakit.cli import main
from lorakit.errors import ModelError
from lorakit.network.combine import merge_loras
from lorakit.network.delta import lora_delta, lora_modules
from lorakit.network.file import addnet_hash, read_lora_file, save_lora_file
from lorakit.network.resize import resize_lora
from lorakit.network.svd import (
    Spectrum,
    choose_rank,
    dynamic_rank,
    matrix_spectrum,
    module_weight_shape,
    product_spectrum,
)


def small_lora(seed=0, rank=8, alpha=4.0, sdxl=False):
    """A LoRA with a Linear, a 1x1 conv, a 3x3 LoCon conv and a Tucker conv module (SD1 or SDXL names)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    te = "lora_te1" if sdxl else "lora_te"
    a = torch.tensor(alpha)
    return {
        f"{te}_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": r(rank, 24),
        f"{te}_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": r(40, rank),
        f"{te}_text_model_encoder_layers_0_mlp_fc1.alpha": a,
        "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": r(rank, 16, 1, 1),
        "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": r(16, rank, 1, 1),
        "lora_unet_mid_block_attentions_0_proj_in.alpha": a,
        "lora_unet_mid_block_resnets_0_conv1.lora_down.weight": r(rank, 12, 3, 3),
        "lora_unet_mid_block_resnets_0_conv1.lora_up.weight": r(20, rank, 1, 1),
        "lora_unet_mid_block_resnets_0_conv1.alpha": a,
        "lora_unet_mid_block_resnets_0_conv2.lora_down.weight": r(rank, 12, 1, 1),
        "lora_unet_mid_block_resnets_0_conv2.lora_mid.weight": r(rank, rank, 3, 3),
        "lora_unet_mid_block_resnets_0_conv2.lora_up.weight": r(20, rank, 1, 1),
        "lora_unet_mid_block_resnets_0_conv2.alpha": a,
    }


def deltas(tensors):
    """name -> ΔW at multiplier 1 of every module (shape read off the module)."""
    return {n: lora_delta(m, module_weight_shape(m)) for n, m in lora_modules(tensors, "t").items()}


def best_rank(delta, rank):
    U, S, Vh = torch.linalg.svd(delta.reshape(delta.shape[0], -1), full_matrices=False)
    return ((U[:, :rank] * S[:rank]) @ Vh[:rank]).reshape(delta.shape)


def close(a, b, rel=1e-4):
    return float((a - b).abs().max()) <= rel * float(b.abs().max()) + 1e-6


# --- the SVD itself ---------------------------------------------------------------------------------
def test_product_svd_equals_the_full_svd():
    g = torch.Generator().manual_seed(1)
    up, down = torch.randn(30, 5, generator=g), torch.randn(5, 70, generator=g)
    fast, full = product_spectrum(up, down), matrix_spectrum(up @ down)
    assert fast.full == full.full == 30
    assert torch.allclose(fast.singular_values, full.S, atol=1e-4)
    assert torch.allclose((fast.U * fast.S) @ fast.Vh, up @ down, atol=1e-4)


def test_quantile_matches_torch_quantile():
    from lorakit.network.svd import quantile

    for n in (1, 2, 7, 1001):
        x = torch.randn(n, generator=torch.Generator().manual_seed(n))
        for q in (0.0, 0.5, 0.99, 1.0):
            assert torch.allclose(quantile(x, q), torch.quantile(x, q)), (n, q)


def spectrum_of(values):
    S = torch.tensor(values, dtype=torch.float32)
    return Spectrum(torch.eye(len(S)), S, torch.eye(len(S)), len(S))


def test_dynamic_rules_pick_the_rank_they_say():
    S = torch.tensor([10.0, 5.0, 2.5, 1.0, 0.5, 0.0])  # ΣS = 19; ΣS² = 132.5
    assert dynamic_rank(S, "sv_ratio", 4) == 2  # above 10/4 = 2.5: 10, 5 (2.5 is not above)
    assert dynamic_rank(S, "sv_ratio", 4.1) == 3
    assert dynamic_rank(S, "sv_ratio", 1000) == 5  # the zero is never kept
    assert dynamic_rank(S, "sv_cumulative", 15 / 19) == 2  # 10 + 5 reach 15/19 exactly
    assert dynamic_rank(S, "sv_cumulative", 15.01 / 19) == 3
    assert dynamic_rank(S, "sv_cumulative", 0.1) == 1
    assert dynamic_rank(S, "sv_fro", math.sqrt(125 / 132.5)) == 2  # 10² + 5² = 125
    assert dynamic_rank(S, "sv_fro", math.sqrt(125.1 / 132.5)) == 3
    assert dynamic_rank(S, "sv_fro", 1.0) == 5  # the last non-zero value completes the norm
    # capped at the rank asked for; all zero -> rank 1 (kohya)
    assert choose_rank(spectrum_of([10.0, 5.0, 2.5, 1.0]), 2, "sv_ratio", 1000) == 2
    assert choose_rank(spectrum_of([10.0, 5.0, 2.5, 1.0]), 3) == 3
    assert choose_rank(spectrum_of([0.0, 0.0]), 8, "sv_fro", 0.9) == 1
    assert choose_rank(spectrum_of([0.0, 0.0]), 8) == 1


# --- resize -----------------------------------------------------------------------------------------
def test_resize_to_full_rank_is_lossless():
    lora = small_lora()
    out, _, stats = resize_lora(lora, {}, 8)
    before, after = deltas(lora), deltas(out)
    assert before.keys() == after.keys()
    for n in before:
        assert close(after[n], before[n]), n
    assert all(s.fro_retained > 0.9999 and s.new_rank == 8 for s in stats)


def test_resize_is_the_best_rank_r_approximation_and_keeps_the_scale():
    lora = small_lora(alpha=2.0)
    out, _, stats = resize_lora(lora, {}, 3, new_conv_rank=5)
    before, after = deltas(lora), deltas(out)
    modules = lora_modules(out, "out")
    for n in before:
        rank = 5 if "resnets" in n else 3  # 3x3 convs at new_conv_rank; the 1x1 proj_in at new_rank
        assert modules[n].rank == rank, n
        assert close(after[n], best_rank(before[n], rank)), n
        # alpha = old scale (2/8) x new rank: alpha/rank, the strength, is unchanged
        assert float(modules[n].alpha) == pytest.approx(0.25 * rank)
    assert modules["lora_unet_mid_block_resnets_0_conv2"].mid is None  # Tucker comes out as plain LoCon
    fc1 = next(s for s in stats if "fc1" in s.name)
    S = torch.linalg.svdvals(before[fc1.name])
    assert fc1.fro_retained == pytest.approx(float(S[:3].norm() / S.norm()), rel=1e-4)
    assert fc1.old_rank == 8 and fc1.new_rank == 3


def test_resize_dynamic_picks_each_modules_rank_from_its_spectrum():
    # a module whose ΔW has singular values 8, 4, 2, 1 (times alpha/rank): sv_ratio 5 keeps 8, 4, 2
    U = torch.linalg.qr(torch.randn(20, 4, generator=torch.Generator().manual_seed(3)))[0]
    V = torch.linalg.qr(torch.randn(30, 4, generator=torch.Generator().manual_seed(4)))[0]
    S = torch.tensor([8.0, 4.0, 2.0, 1.0])
    lora = {
        "lora_unet_x.lora_up.weight": U * S,
        "lora_unet_x.lora_down.weight": V.T.contiguous(),
        "lora_unet_x.alpha": torch.tensor(2.0),
        "lora_unet_zero.lora_up.weight": torch.zeros(20, 4),
        "lora_unet_zero.lora_down.weight": torch.randn(4, 30),
        "lora_unet_zero.alpha": torch.tensor(2.0),
    }
    meta = {"ss_network_dim": "4", "ss_network_alpha": "2.0", "ss_training_comment": "mine"}
    out, new_meta, _ = resize_lora(lora, meta, 16, None, "sv_ratio", 5)
    modules = lora_modules(out, "out")
    assert modules["lora_unet_x"].rank == 3 and float(modules["lora_unet_x"].alpha) == pytest.approx(1.5)
    assert modules["lora_unet_zero"].rank == 1  # all zero: rank 1, as kohya
    out, _, _ = resize_lora(lora, meta, 2, None, "sv_ratio", 5)
    assert lora_modules(out, "out")["lora_unet_x"].rank == 2  # new_rank caps the rule
    # sv_fro: 8, 4 keep √(80/85) = 0.970 of the norm, 8, 4, 2 keep 0.994
    out, _, _ = resize_lora(lora, meta, 16, None, "sv_fro", 0.97)
    assert lora_modules(out, "out")["lora_unet_x"].rank == 2
    out, _, _ = resize_lora(lora, meta, 16, None, "sv_fro", 0.98)
    assert lora_modules(out, "out")["lora_unet_x"].rank == 3
    assert new_meta["ss_network_dim"] == new_meta["ss_network_alpha"] == "Dynamic"
    assert new_meta["ss_training_comment"] == "Dynamic resize with sv_ratio: 5.0 from 4; mine"
    with pytest.raises(ModelError, match="dynamic_param"):
        resize_lora(lora, meta, 4, None, "sv_fro", None)
    with pytest.raises(ModelError, match="fraction"):
        resize_lora(lora, meta, 4, None, "sv_fro", 5)


def test_resize_metadata_as_kohya(tmp_path):
    lora = small_lora()
    meta = {
        "ss_network_dim": "8",
        "ss_network_alpha": "4.0",
        "ss_network_args": json.dumps({"conv_dim": "8", "conv_alpha": "4.0", "algo": "locon"}),
        "ss_training_comment": "None",
        "ss_tag_frequency": '{"a": {"cat": 3}}',
        "sshs_model_hash": "stale",
    }
    out, new, _ = resize_lora(lora, meta, 4, new_conv_rank=2)
    assert new["ss_training_comment"] == "dimension is resized from 8 to 4 (conv: 2); "
    assert new["ss_network_dim"] == "4" and new["ss_network_alpha"] == "2.0"  # 4/8 x 4
    assert json.loads(new["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "1.0", "algo": "locon"}
    assert new["ss_tag_frequency"] == meta["ss_tag_frequency"] and "sshs_model_hash" not in new
    path = save_lora_file(tmp_path / "r.safetensors", out, new, "fp16")
    _, saved = read_lora_file(path)
    assert saved["sshs_model_hash"] == addnet_hash(path)


def test_resize_refuses_dora():
    lora = small_lora()
    lora["lora_unet_mid_block_attentions_0_proj_in.dora_scale"] = torch.ones(16, 1, 1, 1)
    with pytest.raises(ModelError, match="DoRA"):
        resize_lora(lora, {}, 4)


# --- merge_loras ------------------------------------------------------------------------------------
def test_concat_merge_is_exact():
    a, b = small_lora(seed=1, rank=8, alpha=4.0), small_lora(seed=2, rank=4, alpha=1.0)
    del b["lora_unet_mid_block_attentions_0_proj_in.lora_up.weight"]  # a module only `a` has ...
    del b["lora_unet_mid_block_attentions_0_proj_in.lora_down.weight"]
    del b["lora_unet_mid_block_attentions_0_proj_in.alpha"]
    out, meta = merge_loras([(a, {}), (b, {})], [0.7, -1.3], concat=True)
    da, db, dm = deltas(a), deltas(b), deltas(out)
    for n in dm:
        want = 0.7 * da[n] + (-1.3 * db[n] if n in db else 0)
        assert close(dm[n], want), n
    modules = lora_modules(out, "m")
    assert modules["lora_unet_mid_block_resnets_0_conv2"].rank == 12  # ranks add up
    assert modules["lora_unet_mid_block_attentions_0_proj_in"].rank == 8
    assert meta["ss_network_dim"] == "Dynamic" and meta["ss_network_module"] == "networks.lora"


def test_svd_merge_at_full_rank_is_exact_and_truncates_as_svd():
    a, b = small_lora(seed=1, rank=4), small_lora(seed=2, rank=4, alpha=8.0)
    meta_a = {"ss_base_model_version": "sd_v1", "ss_v2": "False", "modelspec.title": "alpha"}
    loras = [(a, meta_a), (b, {"ss_output_name": "beta"})]
    out, meta = merge_loras(loras, [1.0, 0.5], new_rank=8, clamp_quantile=None)
    da, db, dm = deltas(a), deltas(b), deltas(out)
    for n in dm:  # rank 8 holds two rank-4 updates
        assert close(dm[n], da[n] + 0.5 * db[n]), n
    clamped, _ = merge_loras(loras, [1.0, 0.5], new_rank=8)  # kohya's 0.99 quantile clamp of the factors
    for key, t in clamped.items():
        if not key.endswith("alpha"):
            assert float(t.abs().max()) <= float(out[key].abs().max()) + 1e-6
    assert any(not torch.equal(t, out[k]) for k, t in clamped.items())
    assert meta["ss_network_dim"] == "8" and meta["ss_network_alpha"] == "8.0"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "8", "conv_alpha": "8.0"}
    assert meta["ss_base_model_version"] == "sd_v1" and meta["ss_v2"] == "False"
    assert meta["modelspec.merged_from"] == "alpha, beta"
    assert meta["modelspec.architecture"] == "stable-diffusion-v1/lora"
    out, _ = merge_loras([(a, {}), (b, {})], [1.0, 0.5], new_rank=2, new_conv_rank=3, clamp_quantile=None)
    modules, dm = lora_modules(out, "m"), deltas(out)
    assert modules["lora_te_text_model_encoder_layers_0_mlp_fc1"].rank == 2
    assert modules["lora_unet_mid_block_resnets_0_conv1"].rank == 3
    n = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    assert close(dm[n], best_rank(da[n] + 0.5 * db[n], 2))


def test_kohya_sum_merge_scales_as_kohya():
    a, b = small_lora(seed=1, rank=4, alpha=4.0), small_lora(seed=2, rank=4, alpha=1.0)
    out, meta = merge_loras([(a, {}), (b, {})], [0.5, -2.0])
    n = "lora_te_text_model_encoder_layers_0_mlp_fc1"
    s_b = math.sqrt(1.0 / 4.0) * -2.0
    up = 0.5 * a[f"{n}.lora_up.weight"] + abs(s_b) * b[f"{n}.lora_up.weight"]
    down = 0.5 * a[f"{n}.lora_down.weight"] + s_b * b[f"{n}.lora_down.weight"]
    assert torch.allclose(out[f"{n}.lora_up.weight"], up) and torch.allclose(
        out[f"{n}.lora_down.weight"], down
    )
    assert float(out[f"{n}.alpha"]) == 4.0 and meta["ss_network_alpha"] == "4.0"
    with pytest.raises(ModelError, match="concat"):
        merge_loras([(a, {}), (small_lora(rank=8), {})], [1, 1])


def test_merge_refuses_other_families_and_bad_arguments():
    sd1, xl = small_lora(), small_lora(sdxl=True)
    with pytest.raises(ModelError, match="SDXL.*SD1.x|SD1.x.*SDXL"):
        merge_loras([(sd1, {}), (xl, {"ss_base_model_version": "sdxl_base_v1-0"})], [1, 1], concat=True)
    with pytest.raises(ModelError, match="ratios"):
        merge_loras([(sd1, {})], [1, 1])
    with pytest.raises(ModelError, match="not both"):
        merge_loras([(sd1, {})], [1], concat=True, new_rank=4)


# --- extract ----------------------------------------------------------------------------------------
def lora_for(base, seed, conv_dim=None, te=True, scale=0.1):
    """A rank-4 LoRA with random weights on every kohya target of `base` (TE too if `te`)."""
    spec = base.spec
    parts = {"unet", *(spec.text_encoder_parts if te else ())}
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for t in spec.lora_targets(base, 4, 4.0, conv_dim, 4.0, parts):
        w = t.module.weight
        tensors[f"{t.name}.lora_down.weight"] = torch.randn(4, *w.shape[1:], generator=g) * scale
        tensors[f"{t.name}.lora_up.weight"] = (
            torch.randn(w.shape[0], 4, *([1] * (w.ndim - 2)), generator=g) * scale
        )
        tensors[f"{t.name}.alpha"] = torch.tensor(4.0)
    return tensors


@pytest.fixture(scope="module")
def tuned_sd1(tiny_base, tmp_path_factory):
    """(tiny SD1 base, the same base with a rank-4 LoCon merged into UNet and TE, that LoCon)."""
    from lorakit.models.loader import load_base_model, save_ldm_checkpoint
    from lorakit.network.merge import merge_lora_into_base

    base = load_base_model(tiny_base)
    lora = lora_for(base, seed=5, conv_dim=4)
    merge_lora_into_base(base, lora)
    path = tmp_path_factory.mktemp("tuned") / "tuned-sd1.safetensors"
    save_ldm_checkpoint(path, base.unet, base.vae, base.text_encoder, base.arch)
    return tiny_base, path, lora


def test_extract_recovers_the_merged_lora(tuned_sd1):
    from lorakit.models.loader import load_base_model
    from lorakit.network.extract import extract_lora

    org_path, tuned_path, lora = tuned_sd1
    org, tuned = load_base_model(org_path), load_base_model(tuned_path)
    out = extract_lora(org, tuned, dim=4, conv_dim=4, clamp_quantile=1.0, min_diff=0.0)
    want, got = deltas(lora), deltas(out)
    assert want.keys() == got.keys()
    for n in want:
        assert close(got[n], want[n], rel=1e-3), n
    assert all(float(m.alpha) == m.rank == 4 for m in lora_modules(out, "x").values())
    # without conv_dim no 3x3 conv is extracted; 1x1 convs and Linear keep kohya's shapes
    out = extract_lora(org, tuned, dim=2, clamp_quantile=0.99, min_diff=0.0)
    assert not any(t.dim() == 4 and t.shape[2] == 3 for t in out.values())
    assert len(lora_modules(out, "x")) < len(want)
    assert all(m.rank == 2 for m in lora_modules(out, "x").values())


def test_extract_drops_an_unchanged_text_encoder(tiny_base, tmp_path):
    from lorakit.models.loader import load_base_model, save_ldm_checkpoint
    from lorakit.network.extract import extract_lora
    from lorakit.network.merge import merge_lora_into_base

    org = load_base_model(tiny_base)
    tuned = load_base_model(tiny_base)
    merge_lora_into_base(tuned, lora_for(tuned, seed=6, te=False))
    out = extract_lora(org, tuned, dim=2)
    assert out and not any(k.startswith("lora_te") for k in out)
    te_lora = {
        k: v * 0.01
        for k, v in lora_for(tuned, seed=7).items()
        if k.startswith("lora_te") and "alpha" not in k
    }
    te_lora.update(
        {k: v for k, v in lora_for(tuned, seed=7).items() if k.startswith("lora_te") and "alpha" in k}
    )
    merge_lora_into_base(tuned, te_lora)  # TE moves by ~1e-5: below min_diff 0.01, above 0
    assert not any(k.startswith("lora_te") for k in extract_lora(org, tuned, dim=2, min_diff=0.01))
    assert any(k.startswith("lora_te") for k in extract_lora(org, tuned, dim=2, min_diff=0.0))
    del save_ldm_checkpoint, tmp_path


def test_extract_cli_writes_kohya_metadata_and_refuses_overwrite(tuned_sd1, tmp_path, capsys):
    org_path, tuned_path, _ = tuned_sd1
    out = tmp_path / "extracted.safetensors"
    argv = ["extract", "--model_org", str(org_path), "--model_tuned", str(tuned_path), "--save_to", str(out)]
    assert main([*argv, "--dim", "2", "--conv_dim", "3", "--save_precision", "fp16"]) == 0
    tensors, meta = read_lora_file(out)
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_network_dim"] == "2"
    assert meta["ss_network_alpha"] == "2.0" and meta["ss_base_model_version"] == "sd_v1"
    assert json.loads(meta["ss_network_args"]) == {"conv_dim": "3", "conv_alpha": "3.0"}
    assert meta["modelspec.title"] == "extracted" and meta["sshs_model_hash"] == addnet_hash(out)
    assert next(iter(tensors.values())).dtype == torch.float16
    assert "text encoder" in capsys.readouterr().out
    before = out.read_bytes()
    assert main([*argv, "--dim", "1"]) == 2
    assert "--overwrite" in capsys.readouterr().err and out.read_bytes() == before
    assert main([*argv, "--dim", "1", "--overwrite"]) == 0 and out.read_bytes() != before


def test_extract_sdxl(tiny_sdxl_base, tmp_path):
    from lorakit.models.families.sdxl import save_sgm_checkpoint
    from lorakit.models.loader import load_base_model
    from lorakit.network.extract import extract_lora, extract_metadata
    from lorakit.network.merge import merge_lora_into_base

    org, tuned = load_base_model(tiny_sdxl_base), load_base_model(tiny_sdxl_base)
    lora = lora_for(tuned, seed=8)
    merge_lora_into_base(tuned, lora)
    path = save_sgm_checkpoint(
        tmp_path / "tuned-xl.safetensors", tuned.unet, tuned.vae, *tuned.text_encoders, arch=tuned.arch
    )
    out = extract_lora(org, load_base_model(path), dim=4, clamp_quantile=1.0, min_diff=0.0)
    want, got = deltas(lora), deltas(out)
    assert want.keys() == got.keys() and any(n.startswith("lora_te2_") for n in got)
    for n in want:
        assert close(got[n], want[n], rel=1e-3), n
    meta = extract_metadata(org, 4, None, "x")
    assert meta["ss_base_model_version"] == "sdxl_base_v1-0"
    assert meta["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


def test_extract_refuses_two_families(tiny_base, tiny_sdxl_base, tmp_path, capsys):
    out = tmp_path / "x.safetensors"
    argv = [
        "extract",
        "--model_org",
        str(tiny_base),
        "--model_tuned",
        str(tiny_sdxl_base),
        "--save_to",
        str(out),
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "one family" in err and "SDXL" in err and not out.exists()
    argv[2] = str(tmp_path / "nowhere.safetensors")
    assert main(argv) == 2 and "--model_org" in capsys.readouterr().err


# --- resize CLI -------------------------------------------------------------------------------------
def test_resize_cli(tmp_path, capsys):
    src = tmp_path / "big.safetensors"
    lora = {k: v.half() for k, v in small_lora().items()}
    save_file(lora, str(src), metadata={"ss_network_dim": "8", "ss_network_alpha": "4.0"})
    out = tmp_path / "small.safetensors"
    argv = ["resize", "--model", str(src), "--save_to", str(out), "--new_rank", "2"]
    assert main([*argv, "--verbose"]) == 0
    text = capsys.readouterr().out
    assert "lora_unet_mid_block_resnets_0_conv1" in text and "fro retained" in text
    assert "big.safetensors" in text and "small.safetensors" in text and "->" in text
    tensors, meta = read_lora_file(out)
    assert meta["ss_network_dim"] == "2" and meta["ss_training_comment"].startswith(
        "dimension is resized from 8 to 2"
    )
    assert (
        tensors["lora_unet_mid_block_resnets_0_conv1.lora_down.weight"].dtype == torch.float16
    )  # the input's
    assert out.stat().st_size < src.stat().st_size
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--dynamic_method", "sv_fro"]) == 2
    assert "dynamic_param" in capsys.readouterr().err
    assert main([*argv, "--overwrite", "--dynamic_method", "sv_fro", "--dynamic_param", "0.9"]) == 0
    assert read_lora_file(out)[1]["ss_network_dim"] == "Dynamic"
    capsys.readouterr()
    assert (
        main(
            [
                "resize",
                "--model",
                str(tmp_path / "missing.safetensors"),
                "--save_to",
                str(tmp_path / "o.safetensors"),
            ]
        )
        == 2
    )
    assert "missing.safetensors" in capsys.readouterr().err


def lycoris_lora(seed=0):
    """A LoHa on a real SD1.5 3x3 conv (factors stored flat, as LyCORIS does without Tucker) and a
    LoKr (w1 full, w2 factored) on a real SD1.5 attention Linear."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.1

    conv, lin = "lora_unet_down_blocks_0_resnets_0_conv1", "lora_unet_down_blocks_0_attentions_0_proj_in"
    return {
        f"{conv}.hada_w1_a": r(320, 4),
        f"{conv}.hada_w1_b": r(4, 320 * 9),
        f"{conv}.hada_w2_a": r(320, 4),
        f"{conv}.hada_w2_b": r(4, 320 * 9),
        f"{conv}.alpha": torch.tensor(2.0),
        f"{lin}.lokr_w1": r(16, 16),
        f"{lin}.lokr_w2_a": r(20, 4),
        f"{lin}.lokr_w2_b": r(4, 20),
        f"{lin}.alpha": torch.tensor(4.0),
    }


def test_lycoris_modules_resize_and_svd_merge_into_plain_locon():
    """LoHa / LoKr become LoRA/LoCon modules by SVD: at full rank ΔW is kept, the flat LoHa conv gets
    its 3x3 kernel from the real SD1.5 UNet."""
    tensors = lycoris_lora()
    want = deltas(tensors)
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    assert want[conv].shape == (320, 320, 3, 3)
    out, meta, stats = resize_lora(tensors, {}, new_rank=320)
    assert out[f"{conv}.lora_down.weight"].shape[1:] == (320, 3, 3)
    got = deltas(out)
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=1e-5, rtol=1e-4)
    merged, _ = merge_loras(
        [(tensors, {}), (small_lora(), {})], [1.0, 0.5], new_rank=320, clamp_quantile=None
    )
    got = deltas(merged)
    torch.testing.assert_close(got[conv], want[conv], atol=1e-5, rtol=1e-4)


def test_flat_lycoris_conv_of_a_smaller_unet_takes_the_kernel_of_its_layer_kind():
    """A LoHa on conv1 of a small UNet (64 channels, as the demo model's): not the real SD1.5 size,
    but conv1 is a 3x3 conv in every SD UNet, so the resized LoCon gets (r, 64, 3, 3) and the same ΔW."""
    g = torch.Generator().manual_seed(3)
    conv = "lora_unet_down_blocks_1_resnets_0_conv1"
    t = {
        f"{conv}.hada_w1_a": torch.randn(128, 2, generator=g),
        f"{conv}.hada_w1_b": torch.randn(2, 64 * 9, generator=g),
        f"{conv}.hada_w2_a": torch.randn(128, 2, generator=g),
        f"{conv}.hada_w2_b": torch.randn(2, 64 * 9, generator=g),
        f"{conv}.alpha": torch.tensor(1.0),
    }
    want = deltas(t)[conv]
    assert want.shape == (128, 64, 3, 3)
    out, _, _ = resize_lora(t, {}, new_rank=4)  # LoHa rank 2 x 2: ΔW has rank <= 4, kept whole
    assert out[f"{conv}.lora_down.weight"].shape == (4, 64, 3, 3)
    torch.testing.assert_close(deltas(out)[conv], want, atol=1e-4, rtol=1e-4)
