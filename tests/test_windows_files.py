"""Files as Windows users have them: a destination another program holds open (os.replace raising
PermissionError with winerror 5/32), folder names with spaces and Japanese, Windows paths in TOML."""

from __future__ import annotations

import errno
import shutil
from pathlib import Path, PureWindowsPath

import pytest

from lorakit import atomic
from lorakit.atomic import FileInUseError, atomic_file, replace_file
from lorakit.cli import main
from lorakit.config import TrainConfig
from lorakit.testing import make_dataset


def held_open(times: int, winerror: int = 32, blocked=lambda src, dst: True):
    """An os.replace that fails `times` times the way Windows does while another program has a file
    open (for the replaces that `blocked` picks), then works; the list holds the attempts picked."""
    real, attempts = atomic.os.replace, []

    def replace(src, dst):
        if not blocked(Path(src), Path(dst)):
            return real(src, dst)
        attempts.append(Path(dst))
        if len(attempts) <= times:
            e = PermissionError(errno.EACCES, "The process cannot access the file because it is being used")
            e.winerror = winerror  # set by Windows only; os.replace raises it as PermissionError there
            raise e
        real(src, dst)

    return replace, attempts


@pytest.mark.parametrize("winerror", [5, 32])
def test_replace_waits_until_the_destination_is_closed(tmp_path, monkeypatch, winerror):
    lora = tmp_path / "出力 フォルダ" / "usu bear.safetensors"
    lora.parent.mkdir()
    lora.write_bytes(b"old")
    replace, attempts = held_open(3, winerror)
    monkeypatch.setattr(atomic.os, "replace", replace)
    with atomic_file(lora) as f:
        f.write(b"new")
    assert lora.read_bytes() == b"new"
    assert attempts == [lora] * 4
    assert [p.name for p in lora.parent.iterdir()] == [lora.name]  # no temp file left


def test_replace_gives_up_naming_the_file_and_the_remedy(tmp_path, monkeypatch):
    lora = tmp_path / "usu bear.safetensors"
    lora.write_bytes(b"old")
    replace, attempts = held_open(10**6)
    monkeypatch.setattr(atomic.os, "replace", replace)
    monkeypatch.setattr(atomic, "REPLACE_WAIT_S", 0.4)  # 5 s in real use
    with pytest.raises(FileInUseError) as e, atomic_file(lora) as f:
        f.write(b"new")
    assert str(lora) in str(e.value) and "Close the program holding it" in str(e.value)
    assert isinstance(e.value, PermissionError)
    assert 3 <= len(attempts) <= 5  # waited 0.05 + 0.1 + 0.2 s between tries
    assert lora.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == [lora.name]


def test_a_posix_permission_error_is_not_retried(tmp_path, monkeypatch):
    attempts = []

    def denied(src, dst):
        attempts.append(dst)
        raise PermissionError(errno.EACCES, "Permission denied")  # no winerror: waiting cures nothing

    monkeypatch.setattr(atomic.os, "replace", denied)
    with pytest.raises(PermissionError) as e:
        replace_file(tmp_path / "a", tmp_path / "b")
    assert not isinstance(e.value, FileInUseError) and len(attempts) == 1


def test_state_swap_waits_for_a_file_held_open_in_the_old_state(train_config, tmp_path, monkeypatch):
    """Windows cannot rename a folder while a file in it is open: the state swap waits it out."""
    from lorakit.train.trainer import train

    cfg = train_config(max_train_steps=2, save_state=True, reg_data_dir=None, save_every_n_epochs=None)
    train(cfg)
    state = tmp_path / "out" / "tiny-state"
    first = (state / "train_state.json").read_text()
    # renaming the old state aside fails while a file in it is open
    replace, attempts = held_open(2, winerror=5, blocked=lambda src, dst: src == state)
    monkeypatch.setattr(atomic.os, "replace", replace)
    train(train_config(max_train_steps=3, save_state=True, reg_data_dir=None, resume=str(state)))
    assert (state / "train_state.json").read_text() != first and '"step": 3' in (
        state / "train_state.json"
    ).read_text()
    assert attempts == [state.with_name(".tiny-state.old")] * 3  # set aside on the third try
    assert sorted(p.name for p in state.parent.iterdir()) == ["tiny-state", "tiny.safetensors"]


def test_windows_paths_in_toml_are_kept_as_written(tmp_path):
    toml = tmp_path / "設定 file.toml"
    toml.write_text(
        "[model]\n"
        'pretrained_model_name_or_path = "C:\\\\Users\\\\me\\\\models\\\\v1-5 pruned.safetensors"\n'
        "[dataset]\n"
        "train_data_dir = 'D:\\学習\\データ\\10_usu bear'\n"  # a literal string: backslashes as typed
        "[output]\n"
        "output_dir = '\\\\nas\\share\\出力 フォルダ'\n",
        encoding="utf-8",
    )
    cfg = TrainConfig.from_toml(toml)
    model = PureWindowsPath(cfg.model.pretrained_model_name_or_path)
    assert model.drive == "C:" and model.parts[1:] == ("Users", "me", "models", "v1-5 pruned.safetensors")
    data = PureWindowsPath(cfg.dataset.train_data_dir)
    assert data.drive == "D:" and data.name == "10_usu bear" and data.parent.name == "データ"
    assert PureWindowsPath(cfg.output.output_dir).drive == "\\\\nas\\share"  # a UNC share
    # the run folder's config.toml (written by the GUI's job) reads back the same
    again = tmp_path / "again.toml"
    again.write_text(cfg.to_toml(), encoding="utf-8")
    assert TrainConfig.from_toml(again) == cfg


def test_train_reg_images_generate_with_japanese_and_spaces(tiny_base, tmp_path, capsys):
    """Every path option of the three commands, in folders named as Windows users name them."""
    root = tmp_path / "学習 work"
    model = root / "モデル" / "tiny base.safetensors"
    model.parent.mkdir(parents=True)
    shutil.copyfile(tiny_base, model)
    train_root, _ = make_dataset(root / "データ", n_train=2, n_reg=0, repeats=10)
    instance = train_root / "10_usu bear"
    reg = root / "正則化 reg"
    draw = ["--steps", "2", "--width", "64", "--height", "64", "--device", "cpu"]

    rc = main(["reg-images", "--model", str(model), "--from_train_folder", str(instance)]
              + ["--count", "1", "--out", str(reg), "--lora_dir", str(root / "ロラ なし"), *draw])  # fmt: skip
    assert rc == 0 and [p.name for p in (reg / "1_bear").iterdir()] == ["bear_00000.png"]

    out = root / "出力 フォルダ"
    toml = root / "設定.toml"
    toml.write_text(
        f"pretrained_model_name_or_path = '{model}'\ntrain_data_dir = '{train_root}'\n"
        f"reg_data_dir = '{reg}'\noutput_dir = '{out}'\noutput_name = 'usu クマ'\n"
        "resolution = '64'\nnetwork_dim = 2\nmax_train_steps = 2\nsave_state = true\n",
        encoding="utf-8",
    )
    assert main(["train", "--config", str(toml)]) == 0
    lora = out / "usu クマ.safetensors"
    assert lora.is_file() and (out / "usu クマ-state" / "train_state.json").is_file()

    images = root / "画像 出力"
    rc = main(["generate", "--model", str(model), "--lora_dir", str(out), "--outdir", str(images)]
              + ["--prompt", "usu bear <lora:usu クマ:1>", "--seed", "1", *draw])  # fmt: skip
    assert rc == 0
    [png] = images.rglob("*.png")
    assert str(png) in capsys.readouterr().out
