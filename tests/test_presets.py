"""Shipped presets: each validates and trains the tiny model; the CLI applies them under --config and flags."""

from __future__ import annotations

import importlib.util
import re

import pytest

from lorakit.cli import main
from lorakit.config import TrainConfig
from lorakit.errors import ConfigError
from lorakit.presets import list_presets, load_preset

SHIPPED = sorted(list_presets())
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None


def test_the_presets_the_issue_asks_for_are_shipped_with_a_description_that_names_the_vram():
    wanted = {
        "sd15-8gb-character", "sd15-12gb-style", "sdxl-8gb-character", "sdxl-12gb-character",
        "sdxl-24gb-character", "sdxl-24gb-style",
    }  # fmt: skip
    assert wanted <= set(SHIPPED)
    for name, description in list_presets().items():
        m = re.match(r"(sd15|sdxl)-(\d+)gb-", name)
        if m:  # the card memory in the name is the one the description is for
            assert f"{m[2]} GB" in description, name
        assert len(description) > 40, name


@pytest.mark.parametrize("name", SHIPPED)
def test_every_preset_validates(name):
    cfg = TrainConfig.from_dict(
        {"pretrained_model_name_or_path": "base.safetensors", "train_data_dir": "data", **load_preset(name)},
        source=f"preset {name!r}",
    )
    cfg.validate()
    assert set(load_preset(name)) <= cfg.given  # model defaults leave the preset's values alone


@pytest.mark.parametrize("name", SHIPPED)
def test_every_preset_trains_the_tiny_model_for_two_steps(name, request):
    from lorakit.train.trainer import train

    make = request.getfixturevalue("sdxl_config" if name.startswith("sdxl") else "train_config")
    flat = load_preset(name)
    small = {  # the tiny model on a CPU: the paths come from the factory, the size from here
        "resolution": "64", "min_bucket_reso": 64, "max_bucket_reso": 128, "bucket_reso_steps": 64,
        "max_train_steps": 2, "max_train_epochs": None, "mixed_precision": "no",
        "save_every_n_epochs": None, "sample_every_n_epochs": None, "sample_every_n_steps": None,
    }  # fmt: skip
    if flat.get("optimizer_type") == "AdamW8bit" and not HAS_BNB:
        small["optimizer_type"] = (
            "AdamW"  # bitsandbytes is not installed here: the rest of the preset still runs
        )
    cfg = make(**{**flat, **small})
    cfg.validate()
    assert cfg.network.network_dim == flat["network_dim"]  # the preset's own rank is trained
    path = train(cfg)
    assert path.is_file()


def test_cli_preset_then_config_then_flags(tmp_path, capsys):
    config = tmp_path / "c.toml"
    config.write_text('[training]\nlr_scheduler = "constant"\n', encoding="utf-8")
    args = ["train", "--preset", "sdxl-12gb-character", "--config", str(config), "--network_dim", "24"]
    args += ["--pretrained_model_name_or_path", "x.safetensors", "--train_data_dir", "d", "--dump_config"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "network_dim = 24" in out  # the flag wins over the preset's 16
    assert 'lr_scheduler = "constant"' in out  # --config wins over the preset's cosine
    assert 'optimizer_type = "AdamW8bit"' in out and "cache_text_encoder_outputs = true" in out  # the preset
    assert 'resolution = "1024,1024"' in out


def test_cli_lists_the_presets_with_their_descriptions(capsys):
    assert main(["train", "--list_presets"]) == 0
    out = capsys.readouterr().out
    assert "sdxl-12gb-character" in out and "12 GB card" in out


def test_an_unknown_preset_names_the_known_ones(capsys):
    with pytest.raises(ConfigError, match=r"unknown preset 'sdxl-16gb'.*sdxl-12gb-character"):
        load_preset("sdxl-16gb")
    assert main(["train", "--preset", "sdxl-16gb", "--dump_config"]) != 0
    err = capsys.readouterr().err
    assert "unknown preset 'sdxl-16gb'" in err and "sd15-8gb-character" in err


def test_the_4gb_sd15_profile_is_within_2_5_gib_by_the_estimate():
    from lorakit.train.memory_estimate import estimate_for_config

    flat = load_preset("sd15-4gb-character")
    cfg = TrainConfig.from_dict(
        {"pretrained_model_name_or_path": "b.safetensors", "train_data_dir": "d", **flat}
    )
    cfg.validate()
    est = estimate_for_config(cfg, "sd1")
    assert est.peak_gib <= 2.5 and est.train_gib <= 2.5
    assert (cfg.training.gradient_checkpointing, cfg.dataset.cache_latents) == (True, True)
    assert cfg.dataset.cache_text_encoder_outputs and not cfg.trains_text_encoder  # the TE can leave the GPU
    cfg.training.optimizer_type = "AdamW"  # without bitsandbytes it still fits
    assert estimate_for_config(cfg, "sd1").peak_gib <= 2.5
