"""The GPU memory estimate: it reproduces the peaks measured on an H200 and grows with what costs
memory (batch, resolution, rank, text-encoder training, fp32), falls with what saves it."""

from __future__ import annotations

import pytest

from lorakit.config import TrainConfig
from lorakit.train.memory_estimate import describe, estimate_for_config, estimate_memory

SDXL_12GB = dict(gradient_checkpointing=True, cache_text_encoder_outputs=True, optimizer="AdamW8bit")


@pytest.mark.parametrize(
    "family, size, kw, allocated, used",
    [
        ("sdxl", 1024, dict(train_text_encoder=True), 16.66, 17.70),
        ("sdxl", 1024, SDXL_12GB, 6.90, 7.54),  # the setup peak (6.27 while training)
        ("sdxl", 1024, dict(SDXL_12GB, batch_size=4), 8.45, 10.52),
        ("sd1", 512, {}, 3.54, None),
        ("sd1", 512, dict(train_text_encoder=True), 3.65, None),
        ("sd1", 512, dict(batch_size=4), 7.36, None),
    ],
)
def test_the_calibration_points_within_15_percent(family, size, kw, allocated, used):
    est = estimate_memory(family, size, size, rank=32, mixed_precision="bf16", cache_latents=True, **kw)
    assert est.peak_gib == pytest.approx(allocated, rel=0.15)
    if used is not None:
        assert est.device_gib == pytest.approx(used, rel=0.15)


def test_the_sdxl_training_peak_without_the_setup():
    est = estimate_memory("sdxl", 1024, 1024, rank=32, **SDXL_12GB)
    assert est.train_gib == pytest.approx(6.27, rel=0.15) and est.setup_gib > est.train_gib


@pytest.mark.parametrize("family", ["sd1", "sdxl"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_monotone_in_batch_resolution_and_rank(family, checkpointing):
    def peak(**kw):
        args = dict(width=768, height=768, batch_size=2, rank=16, gradient_checkpointing=checkpointing)
        args.update(kw)
        return estimate_memory(family, **args).train_gib

    batches = [peak(batch_size=b) for b in (1, 2, 4, 8)]
    sizes = [peak(width=s, height=s) for s in (512, 768, 1024, 1536)]
    ranks = [peak(rank=r) for r in (4, 16, 64, 256)]
    for series in (batches, sizes, ranks):
        assert all(a < b for a, b in zip(series, series[1:])), series
    assert peak(gradient_checkpointing=True) <= peak(gradient_checkpointing=False)
    assert peak(train_text_encoder=True) > peak()
    assert peak(mixed_precision="no") > peak()
    assert peak(optimizer="AdamW8bit") < peak(optimizer="AdamW")
    assert peak(cache_text_encoder_outputs=True) < peak()


def test_from_a_config_and_the_card_warning():
    flat = {
        "pretrained_model_name_or_path": "m.safetensors",
        "train_data_dir": "t",
        "resolution": "1024",
        "network_dim": 32,
        "mixed_precision": "bf16",
        "cache_latents": True,
        "network_train_unet_only": True,
        "gradient_checkpointing": True,
        "cache_text_encoder_outputs": True,
        "optimizer_type": "AdamW8bit",
    }
    cfg = TrainConfig.from_dict(flat)
    cfg.validate()
    est = estimate_for_config(cfg, "sdxl")
    assert est == estimate_memory("sdxl", 1024, 1024, rank=32, **SDXL_12GB)
    assert "about 8.1 GB" in describe(est) and "H200" in describe(est)
    assert "More than the 6 GB card" in describe(est, 6) and "More than" not in describe(est, 12)
    with pytest.raises(ValueError, match="no memory model"):
        estimate_memory("flux", 1024, 1024)


def test_the_preflight_line_only_for_full_size_bases(tmp_path):
    from lorakit.train.memory_estimate import preflight_line

    cfg = TrainConfig.from_dict({"resolution": "1024", "network_dim": 32, "mixed_precision": "bf16"})
    folder = tmp_path / "diffusers-sdxl"  # a diffusers folder: full size
    folder.mkdir()
    line, warn = preflight_line(cfg, "sdxl", folder, 8.0)
    assert line.startswith("GPU memory estimate: about") and "this GPU has 8 GB" in line and warn
    line, warn = preflight_line(cfg, "sdxl", folder, 80.0)
    assert not warn and "More than" not in line
    assert preflight_line(cfg, "sdxl", folder, None)[0].endswith("H200")
    small = tmp_path / "tiny.safetensors"
    small.write_bytes(b"x" * 1000)  # the demo and test models: nothing fitted for them
    assert preflight_line(cfg, "sdxl", small, 8.0) is None
    assert preflight_line(cfg, "flux1_dev", folder, 8.0) is None
    graphs = TrainConfig.from_dict({"resolution": "1024", "mixed_precision": "bf16", "cuda_graph": True})
    est = estimate_for_config(graphs, "sdxl")
    assert (
        f"each recorded batch shape also keeps about {est.activations_gib:.1f} GB"
        in (preflight_line(graphs, "sdxl", folder, None)[0])
    )
    assert "cuda_graph" not in preflight_line(cfg, "sdxl", folder, None)[0]


def test_the_vae_counts_in_float32_under_fp16_and_vae_batches_raise_the_setup():
    def est(**kw):
        return estimate_memory("sd1", 512, 512, cache_latents=True, **kw)

    vae_gib = 83_653_863 * 2 / 2**30  # the fp32 VAE's extra two bytes per parameter
    fp16, bf16 = est(mixed_precision="fp16"), est(mixed_precision="bf16")
    assert fp16.setup_gib - bf16.setup_gib == pytest.approx(vae_gib)
    assert est(mixed_precision="fp16", vae_fp32=False).setup_gib == pytest.approx(bf16.setup_gib)
    assert est(mixed_precision="bf16", vae_fp32=True).setup_gib == pytest.approx(fp16.setup_gib)
    assert est(vae_batch_size=4).setup_gib > est(vae_batch_size=1).setup_gib
    assert est(vae_batch_size=4).train_gib == est(vae_batch_size=1).train_gib
