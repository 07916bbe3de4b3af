"""Regularization images resume only what was drawn with the same settings."""

import logging

import numpy as np
import pytest
from PIL import Image

from lorakit.generate.params import GenerationParams
from lorakit.generate.pnginfo import parse_parameters, read_png_parameters


@pytest.fixture(scope="module")
def gen(tiny_base):
    from lorakit.generate.pipeline import Generator

    return Generator.from_path(tiny_base, device="cpu")


def test_images_made_with_other_settings_are_redrawn(gen, tmp_path, caplog):
    from lorakit.generate.reg_images import make_reg_images

    small = GenerationParams(steps=2, width=64, height=64, seed=3, sampler="Euler")
    first = make_reg_images(gen, "bear", 3, tmp_path / "reg", small)
    before = [p.stat().st_mtime_ns for p in first]
    # same settings: everything kept
    make_reg_images(gen, "bear", 3, tmp_path / "reg", small)
    assert [p.stat().st_mtime_ns for p in first] == before
    # another size: every image redrawn at the new size, and the log says why
    other = GenerationParams(steps=2, width=72, height=72, seed=3, sampler="Euler")
    with caplog.at_level(logging.INFO, logger="lorakit"):
        again = make_reg_images(gen, "bear", 3, tmp_path / "reg", other)
    assert [Image.open(p).size for p in again] == [(72, 72)] * 3
    assert all(parse_parameters(read_png_parameters(p))[2]["Size"] == "72x72" for p in again)
    assert "redrawing 3 image(s)" in caplog.text and "Size 64x64 -> 72x72" in caplog.text
    # another sampler on one image only (a mixed folder): just that one is redrawn
    kept = np.asarray(Image.open(again[0]))
    again[2].unlink()
    make_reg_images(gen, "bear", 3, tmp_path / "reg", other)
    assert np.array_equal(np.asarray(Image.open(again[0])), kept)
    assert again[2].is_file()


def test_an_unlabelled_image_is_redrawn(gen, tmp_path):
    from lorakit.generate.reg_images import make_reg_images

    small = GenerationParams(steps=2, width=64, height=64, seed=3, sampler="Euler")
    folder = tmp_path / "reg" / "1_bear"
    folder.mkdir(parents=True)
    Image.new("RGB", (512, 512), "white").save(folder / "bear_00000.png")  # no parameters chunk
    paths = make_reg_images(gen, "bear", 1, tmp_path / "reg", small)
    assert Image.open(paths[0]).size == (64, 64)
