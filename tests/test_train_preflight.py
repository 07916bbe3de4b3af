"""Input that would fail mid-run is refused before the base model loads, naming the field or file."""

import shutil
from collections import namedtuple

import pytest
from PIL import Image

from lorakit.errors import ConfigError, DatasetError
from lorakit.train import preflight
from lorakit.train.trainer import train


@pytest.fixture
def no_model_load(monkeypatch):
    import lorakit.models.loader as loader

    def never(*a, **k):
        raise AssertionError("the model was loaded before the input was checked")

    monkeypatch.setattr(loader, "load_base_model", never)


def test_output_dir_that_cannot_be_created_is_named(train_config, tmp_path, no_model_load):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with pytest.raises(ConfigError, match=r"output_dir .*a-file.*cannot be written"):
        train(train_config(output_dir=str(blocker / "out")))


def test_output_dir_without_write_permission_is_named(train_config, tmp_path, monkeypatch, no_model_load):
    def refused(*a, **k):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(preflight.tempfile, "TemporaryFile", refused)  # root ignores chmod, so fake it
    with pytest.raises(ConfigError, match=r"output_dir .*out cannot be written \(Permission denied\)"):
        train(train_config())


def test_full_disk_is_reported_with_the_space_needed(train_config, monkeypatch, no_model_load):
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage(10**9, 10**9 - 2**20, 2**20))
    cfg = train_config(network_dim=64, save_every_n_epochs=1, max_train_epochs=3, save_state=True)
    with pytest.raises(
        ConfigError, match=r"output_dir .*out: the disk has 1 MiB free, but this run saves about"
    ):
        train(cfg)


def test_space_estimate_counts_every_save_and_state(train_config):
    cfg = train_config(network_dim=128, save_precision="fp16")
    one = preflight.estimated_output_bytes(cfg, epochs=10)
    # kohya's dim-128 SD1.5 LoRA (U-Net + text encoder, fp16) is about 144 MiB, written once plus a temp copy
    assert 2 * 120 * 2**20 < one < 2 * 180 * 2**20
    cfg.output.save_every_n_epochs = 3  # saves after epochs 3, 6, 9 and the final one
    assert preflight.estimated_output_bytes(cfg, epochs=10) == one // 2 * 5
    cfg.output.save_state = True
    assert preflight.estimated_output_bytes(cfg, epochs=10) > 4 * preflight.estimated_output_bytes(
        train_config(network_dim=128, save_every_n_epochs=3), epochs=10
    )


@pytest.mark.parametrize(
    ("opts", "match"),
    [
        ({"seed": -1}, r"seed = -1: a seed is a whole number from 0 to 4294967295"),
        ({"seed": 2**32}, r"seed = 4294967296"),
        ({"network_dim": 100_000}, r"network_dim = 100000: use a rank from 1 to 1280"),
        ({"conv_dim": 4096}, r"conv_dim = 4096: use a rank from 1 to 1280"),
    ],
)
def test_out_of_range_numbers_are_refused(train_config, opts, match, no_model_load):
    with pytest.raises(ConfigError, match=match):
        train(train_config(**opts))


def test_absurd_repeats_name_the_folder(train_config, tiny_data, no_model_load):
    folder = tiny_data[0] / "999999999_bear"
    folder.mkdir()
    Image.new("RGB", (64, 64)).save(folder / "a.png")
    with pytest.raises(
        DatasetError, match=r"999999999_bear: 999999999 repeats is more than lorakit allows \(10000\)"
    ):
        train(train_config())


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("bear --w 100000", r"prompts.txt:2: --w 100000: sample images are at most 2048 pixels"),
        ("bear --h 4096", r"prompts.txt:2: --h 4096"),
        (f"bear --d {2**64}", r"prompts.txt:2: --d 18446744073709551616: a seed is -1 \(random\) or 0 to"),
        ("bear --d -7", r"prompts.txt:2: --d -7"),
        ("bear --l nan", r"prompts.txt:2: --l nan: the CFG scale"),
        ("bear --ss euler_bogus", r"prompts.txt:2: sampler 'euler_bogus' is unknown"),
    ],
)
def test_bad_sample_prompts_fail_before_training(train_config, tmp_path, line, match, no_model_load):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"bear --w 64 --h 64 --d 5 --d -1 --ss euler_a\n{line}\n")
    with pytest.raises(ConfigError, match=match):
        train(train_config(sample_prompts=str(prompts)))
