"""What the command line says: help text without doubled defaults or double negatives."""

import re
import subprocess
import sys


def test_train_help_has_one_default_per_option_and_no_double_negatives():
    out = subprocess.run(
        [sys.executable, "-m", "lorakit", "train", "--help"], capture_output=True, text=True, check=True
    ).stdout
    flat = " ".join(out.split())  # argparse wraps lines
    assert "--no-no_" not in flat
    assert "--no_metadata" in flat
    for option in re.split(r"\s(?=--\w)", flat):
        assert option.count("(default:") <= 1, option
    assert "U-Net LoRA learning rate (default: learning_rate;" in flat
    assert "--cache_latents, --no-cache_latents" in flat  # ordinary switches keep both forms


def test_quickstart_names_the_lorakit_the_user_can_run(monkeypatch, tmp_path):
    import os
    from pathlib import Path

    from lorakit.demo.workflow import lorakit_command

    script = Path(sys.executable).parent / ("lorakit.exe" if os.name == "nt" else "lorakit")
    if not script.exists():
        assert lorakit_command() == f"{sys.executable} -m lorakit"
        return
    monkeypatch.chdir(script.parent.parent.parent)  # the folder that holds .venv
    assert lorakit_command() == str(Path(script.parent.parent.name) / script.parent.name / script.name)
    monkeypatch.chdir(tmp_path)  # elsewhere: the full path, which works from anywhere
    assert Path(lorakit_command()) == script and Path(lorakit_command()).is_absolute()


def test_inspect_table_shows_a_date_and_aligns_wide_characters():
    from lorakit.network.inspect import display_width, format_table

    info = {
        "file": "x.safetensors",
        "architecture": "SD1",
        "modules": {"text_encoder": 72, "unet": 192, "conv3x3_locon": 0, "tucker": 0, "dora": 0},
        "dim_alpha": [],
        "dtype": "float16",
        "hash": "0123456789ab",
        "network_args": None,
        "training": {"started at": "1764140400.5", "seed": "1"},
        "tag_frequency": {"10_クマ": [("usu", 3)], "10_bear": [("bear", 2)]},
        "per_module": None,
    }
    text = format_table(info)
    assert "1764140400" not in text and "2025-11-26" in text  # a date, not a unix time
    rows = [line for line in text.splitlines() if "usu (3)" in line or "bear (2)" in line]
    columns = {display_width(line[: line.index(v)]) for line, v in zip(rows, ("usu (3)", "bear (2)"))}
    assert len(columns) == 1  # the values start in the same column, CJK folder name or not


def test_close_matches_name_each_lora_once(tmp_path):
    import pytest

    from lorakit.errors import ModelError
    from lorakit.generate.loras import LoraFile, resolve

    loras = [LoraFile("kurokuma", tmp_path / "kurokuma.safetensors", "kurokuma")]
    with pytest.raises(ModelError) as e:
        resolve("kurokma", loras, tmp_path)
    assert str(e.value).count("kurokuma") == 1


def test_generate_names_each_image_once(tiny_base, tmp_path):
    out_dir = tmp_path / "outs"
    run = subprocess.run(
        [sys.executable, "-m", "lorakit", "generate", "--model", str(tiny_base), "--prompt", "bear",
         "--steps", "2", "--width", "64", "--height", "64", "--seed", "5", "--batch_count", "2",
         "--outdir", str(out_dir)],
        capture_output=True, text=True,
    )  # fmt: skip
    pngs = sorted(out_dir.glob("*.png"))
    assert run.returncode == 0 and len(pngs) == 2, run.stderr
    for png in pngs:
        assert (run.stdout + run.stderr).count(png.name) == 1  # printed once, not logged again
