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
