"""Files and folders lorakit writes honour the umask (A1111/ComfyUI running as another user must read them)."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(os.name == "nt", reason="Windows has no POSIX permission bits")


@pytest.fixture
def umask():
    """Set the process umask for one test; the old one comes back afterwards."""
    old = os.umask(0o022)
    yield os.umask
    os.umask(old)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_lora_png_cache_and_state_follow_the_umask(train_config, tiny_data, tmp_path, umask, mask):
    from lorakit.train.trainer import train

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("bear --s 1 --w 64 --h 64\n")
    umask(mask)
    train(
        train_config(
            max_train_steps=2,
            save_state=True,
            cache_latents_to_disk=True,
            sample_prompts=str(prompts),
            sample_every_n_steps=2,
            logging_dir=str(tmp_path / "out" / "logs"),
        )
    )
    out = tmp_path / "out"
    written = [p for p in out.rglob("*")] + list(tiny_data[0].rglob("*.npz"))
    kinds = {p.suffix for p in written if p.is_file()}
    assert {".safetensors", ".png", ".npz", ".pt", ".json"} <= kinds, kinds
    assert any(p.is_dir() and p.name.endswith("-state") for p in written)
    assert any("tfevents" in p.name for p in written)  # TensorBoard logs
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    wrong = {
        str(p.relative_to(tmp_path)): oct(_mode(p))
        for p in written
        if _mode(p) != (dir_mode if p.is_dir() else file_mode)
    }
    assert not wrong, f"expected files {oct(file_mode)}, folders {oct(dir_mode)}"


def test_atomic_writes_follow_the_umask(tmp_path, umask):
    """Also when the writer replaces our temp file with its own 0600 one, as safetensors' save_file does."""
    import torch
    from safetensors.torch import save_file

    from lorakit.atomic import atomic_file, atomic_path, make_temp_dir

    for mask in (0o022, 0o077, 0o002):
        umask(mask)
        with atomic_file(tmp_path / f"a{mask}.bin") as f:
            f.write(b"x")
        with atomic_path(tmp_path / f"b{mask}.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp))
        folder = make_temp_dir(tmp_path / f"c{mask}")
        assert _mode(tmp_path / f"a{mask}.bin") == 0o666 & ~mask
        assert _mode(tmp_path / f"b{mask}.safetensors") == 0o666 & ~mask
        assert _mode(folder) == 0o777 & ~mask and folder.name.startswith(f".c{mask}.")
    leftovers = [p.name for p in tmp_path.iterdir() if p.is_file() and p.name.startswith(".")]
    assert not leftovers  # every temp file was renamed into place
