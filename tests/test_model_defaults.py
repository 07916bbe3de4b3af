"""Defaults from the base model (issue 9, item 3): its native resolution and learning rate, read from
the header only, and taken by `train`, `generate` and `reg-images` when the user gave none."""

import json
import logging

import numpy as np
import pytest
from PIL import Image
from safetensors.numpy import save_file

from lorakit.cli import main
from lorakit.demo import DEMO_MODEL
from lorakit.models.defaults import ModelDefaults, model_defaults, resolution_warning


def model_file(path, **metadata):
    """A stand-in model: one tensor and the given header metadata (nothing reads its weights)."""
    save_file({"x": np.zeros(1, dtype=np.float32)}, str(path), metadata=metadata or None)
    return path


def test_the_demo_model_names_its_64_px_and_a_learning_rate_that_moves_it():
    d = model_defaults(DEMO_MODEL)
    assert d.resolution == (64, 64) and d.learning_rate == 1e-3
    assert "modelspec.resolution" in d.source
    assert "lorakit.recommended_learning_rate" in d.learning_rate_source


def test_where_the_native_resolution_comes_from(tmp_path, tiny_base):
    spec = model_defaults(model_file(tmp_path / "a.safetensors", **{"modelspec.resolution": "768x512"}))
    assert spec.resolution == (768, 512) and spec.learning_rate == 1e-4
    # a lorakit model without modelspec: UNet sample_size 8 x the VAE's 8x downscale
    assert model_defaults(tiny_base).resolution == (64, 64)
    # SD1.x without metadata, a .ckpt, a missing file: 512
    assert model_defaults(model_file(tmp_path / "plain.safetensors")).resolution == (512, 512)
    (tmp_path / "m.ckpt").write_bytes(b"\x80\x02}q\x00.")
    assert model_defaults(tmp_path / "m.ckpt") == ModelDefaults(
        (512, 512), 1e-4, "the SD1.x default: its metadata names none"
    )
    # a diffusers folder: its unet/vae configs
    folder = tmp_path / "diffusers"
    for part, cfg in (("unet", {"sample_size": 96}), ("vae", {"block_out_channels": [1, 2, 3, 4]})):
        (folder / part).mkdir(parents=True)
        (folder / part / "config.json").write_text(json.dumps(cfg))
    assert model_defaults(folder).resolution == (768, 768)
    # a bad rate in the metadata is ignored, not used
    bad = model_file(tmp_path / "b.safetensors", **{"lorakit.recommended_learning_rate": "fast"})
    assert model_defaults(bad).learning_rate == 1e-4


def test_a_resolution_far_from_the_native_one_is_warned_about():
    demo = ModelDefaults((64, 64), 1e-3, "test")
    assert resolution_warning((64, 64), demo) is None
    assert resolution_warning((96, 128), demo) is None  # up to twice the native side
    warning = resolution_warning((512, 512), demo)
    assert "512x512" in warning and "native 64x64" in warning
    assert resolution_warning((256, 256), ModelDefaults((512, 512), 1e-4, "t")) is None
    assert resolution_warning((192, 512), ModelDefaults((512, 512), 1e-4, "t")) is not None


def _dumped(capsys) -> dict:
    import tomllib

    flat = {}
    for table in tomllib.loads(capsys.readouterr().out).values():
        flat.update(table)
    return flat


def test_train_takes_resolution_and_learning_rate_from_the_model_unless_given(tmp_path, capsys, caplog):
    model = model_file(
        tmp_path / "m.safetensors",
        **{"modelspec.resolution": "128x128", "lorakit.recommended_learning_rate": "5e-3"},
    )
    base = ["train", "--pretrained_model_name_or_path", str(model), "--train_data_dir", "x", "--dump_config"]
    with caplog.at_level(logging.INFO, logger="lorakit"):
        assert main(base) == 0
    flat = _dumped(capsys)
    assert flat["resolution"] == "128,128" and flat["learning_rate"] == 5e-3
    assert "resolution not given: 128,128" in caplog.text and "learning_rate not given" in caplog.text

    # given on the command line or in the file: kept, and a resolution far from 128 is warned about
    caplog.clear()
    toml = tmp_path / "c.toml"
    toml.write_text('[dataset]\nresolution = "512"\n')
    with caplog.at_level(logging.INFO, logger="lorakit"):
        assert main([*base, "--config", str(toml), "--learning_rate", "2e-4"]) == 0
    flat = _dumped(capsys)
    assert flat["resolution"] == "512" and flat["learning_rate"] == 2e-4
    assert "not given" not in caplog.text
    assert any(r.levelno == logging.WARNING and "native 128x128" in r.message for r in caplog.records)


def test_generate_draws_at_the_models_size_when_none_is_given(tiny_base, tmp_path, caplog):
    out = tmp_path / "out"
    args = ["generate", "--model", str(tiny_base), "--lora_dir", str(tmp_path), "--outdir", str(out)]
    with caplog.at_level(logging.INFO, logger="lorakit"):
        assert main([*args, "--prompt", "bear", "--steps", "1", "--seed", "3"]) == 0
    assert Image.open(out / "00000-3.png").size == (64, 64)  # the tiny model's, not SD1.x's 512
    assert "size 64x64, the base model's" in caplog.text
    assert main([*args, "--prompt", "bear", "--steps", "1", "--seed", "4", "--width", "80"]) == 0
    assert Image.open(out / "00001-4.png").size == (80, 64)


@pytest.mark.slow
def test_reg_images_of_the_demo_model_are_drawn_at_64_px(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="lorakit"):
        rc = main(["reg-images", "--model", str(DEMO_MODEL), "--class_prompt", "bear", "--count", "1",
                   "--steps", "2", "--out", str(tmp_path / "reg")])  # fmt: skip
    assert rc == 0
    (png,) = (tmp_path / "reg" / "1_bear").glob("*.png")
    assert Image.open(png).size == (64, 64)
    assert not caplog.records  # no size warning at the model's own size
