"""`lorakit reg-images` and `lorakit quickstart` through the command line, as users run them."""

from __future__ import annotations

import re

import numpy as np
import pytest
from PIL import Image
from safetensors import safe_open

from lorakit.cli import main
from lorakit.generate.pnginfo import parse_parameters, read_png_parameters


def png_params(path):
    prompt, negative, kv = parse_parameters(read_png_parameters(path))
    return prompt, negative, kv


def test_reg_images_cli_draws_named_pngs_with_their_parameters(tiny_base, tmp_path, capsys):
    out = tmp_path / "reg"
    args = ["reg-images", "--model", str(tiny_base), "--lora_dir", str(tmp_path / "none"), "--device", "cpu"]
    draw = ["--steps", "2", "--width", "64", "--height", "64", "--sampler", "Euler", "--cfg_scale", "4.5"]
    rc = main(
        args
        + draw
        + ["--from_train_folder", str(tmp_path / "train" / "20_usu bear"), "--count", "2", "--out", str(out)]
        + ["--seed", "5", "--negative_prompt", "blurry"]
    )
    assert rc == 0
    stdout = capsys.readouterr().out
    folder = out / "1_bear"  # the class word of '20_usu bear', in kohya's reg folder form
    assert f"drawing 2 images of 'bear' into {folder}" in stdout
    assert f"--reg_data_dir {out}" in stdout
    assert sorted(p.name for p in folder.iterdir()) == ["bear_00000.png", "bear_00001.png"]  # no temp files
    pixels = []
    for i, name in enumerate(["bear_00000.png", "bear_00001.png"]):
        with Image.open(folder / name) as im:
            assert im.format == "PNG" and im.size == (64, 64) and im.mode == "RGB"
            pixels.append(np.asarray(im))
        prompt, negative, kv = png_params(folder / name)
        assert (prompt, negative) == ("bear", "blurry")
        assert kv["Seed"] == str(5 + i)  # image i on seed + i
        assert (kv["Steps"], kv["Sampler"], kv["CFG scale"], kv["Size"]) == ("2", "Euler", "4.5", "64x64")
        assert kv["Model"] == "tiny-sd1" and re.fullmatch(r"[0-9a-f]{10}", kv["Model hash"])
    assert not np.array_equal(*pixels)  # two seeds, two drawings

    # --out named like a kohya folder is used as it is; a class prompt of two words
    assert (
        main(args + draw + ["--class_prompt", "brown bear", "--count", "1", "--out", str(tmp_path / "3_x")])
        == 0
    )
    assert [p.name for p in (tmp_path / "3_x").iterdir()] == ["brown_bear_00000.png"]
    assert png_params(tmp_path / "3_x" / "brown_bear_00000.png")[0] == "brown bear"


@pytest.mark.parametrize(
    "extra,message",
    [
        ([], "--class_prompt"),
        (["--from_train_folder", "train/usu bear"], "usu bear"),
        (["--class_prompt", "bear", "--width", "60"], "60x64"),  # the height: the model's native size
    ],
)
def test_reg_images_cli_errors(tiny_base, tmp_path, capsys, extra, message):
    rc = main(["reg-images", "--model", str(tiny_base), "--out", str(tmp_path / "reg"), *extra])
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "reg").exists()  # refused before anything was drawn


@pytest.mark.slow
def test_quickstart_cli_runs_the_whole_workflow(tmp_path, capsys):
    """About 35 s on 2 CPU cores: 32 reg images and a 32-image grid at 20 DDIM steps, 2 training steps."""
    from lorakit.config import TrainConfig

    work = tmp_path / "qs"
    assert main(["quickstart", "--workdir", str(work), "--steps", "2"]) == 0
    stdout = capsys.readouterr().out
    for line in ("1/4 instance images", "2/4 regularization images", "3/4 LoRA ->", "4/4 before/after grid"):
        assert line in stdout, line

    instance = sorted((work / "data" / "train" / "10_usu bear").glob("*.png"))
    assert len(instance) >= 15
    reg = sorted((work / "data" / "reg" / "1_bear").glob("*.png"))
    assert [p.name for p in reg] == [f"bear_{i:05d}.png" for i in range(32)]
    prompt, _, kv = png_params(reg[7])
    assert (prompt, kv["Seed"], kv["Steps"], kv["Sampler"], kv["Size"]) == (
        "bear",
        "7",
        "20",
        "DDIM",
        "64x64",
    )

    lora = work / "output" / "usu-bear.safetensors"
    with safe_open(str(lora), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    assert meta["ss_steps"] == "2" and meta["ss_seed"] == "42" and meta["ss_network_dim"] == "8"
    assert meta["ss_num_train_images"] == str(10 * len(instance)) and meta["ss_num_reg_images"] == "32"
    assert any(k.startswith("lora_te_") for k in keys) and any(k.startswith("lora_unet_") for k in keys)
    cfg = TrainConfig.from_toml(work / "demo.toml")  # the config it trained with, for `lorakit train`
    assert cfg.training.max_train_steps == 2 and cfg.dataset.reg_data_dir == str(work / "data" / "reg")

    with Image.open(work / "grid.png") as grid:
        assert grid.size == (190 + 8 * 128, 4 * 128)  # label column + 8 seeds, 4 rows, cells x2
    scores = re.findall(r"^  (usu bear|bear)(?: <lora:usu-bear:1>)?\s+([0-9.]+)$", stdout, re.M)
    assert len(scores) == 4 and all(0 <= float(s) <= 1 for _, s in scores)
    assert f"--lora_dir {work / 'output'}" in stdout
