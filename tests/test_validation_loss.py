"""Validation loss: held-out images (validation_split) or a folder of its own (validation_data_dir),
measured with fixed timesteps and fixed noise so that the same weights always give the same number."""

from __future__ import annotations

import pytest
from safetensors import safe_open

from lorakit.config import TrainConfig
from lorakit.dataset.folders import scan_dataset
from lorakit.errors import ConfigError
from lorakit.testing import make_dataset


def _metadata(path) -> dict[str, str]:
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.mark.parametrize(
    "overrides, option",
    [
        ({"validation_split": 1.0}, "validation_split"),
        ({"validation_split": -0.1}, "validation_split"),
        ({"validation_split": 0.2, "validation_data_dir": "v"}, "validation_data_dir"),
        ({"validate_every_n_steps": 0}, "validate_every_n_steps"),
        ({"validate_every_n_epochs": -1}, "validate_every_n_epochs"),
        ({"max_validation_steps": 0}, "max_validation_steps"),
        ({"validation_seed": -1}, "validation_seed"),
    ],
)
def test_bad_validation_options_name_the_option(overrides, option):
    cfg = TrainConfig.from_dict(
        {"pretrained_model_name_or_path": "m.safetensors", "train_data_dir": "d", **overrides}
    )
    with pytest.raises(ConfigError, match=option):
        cfg.validate()


def test_split_holds_out_train_images_by_seed(tmp_path):
    train, reg = make_dataset(tmp_path / "data", n_train=6, n_reg=3, repeats=2)
    full = scan_dataset(train, reg)
    split = scan_dataset(train, reg, validation_split=0.34, validation_seed=7)
    held = {s.image for s in split.validation.samples}
    assert len(held) == 2 and all(not s.is_reg for s in split.validation.samples)
    assert len(split.validation.samples) == 2  # each validation image once, repeats aside
    assert split.num_train_images == full.num_train_images - 2 * 2  # 2 images x 2 repeats left training
    assert not held & {s.image for s in split.samples}  # never trained on
    assert {s.image for s in split.samples if s.is_reg} == {s.image for s in full.samples if s.is_reg}
    again = scan_dataset(train, reg, validation_split=0.34, validation_seed=7)
    assert {s.image for s in again.validation.samples} == held  # a function of the seed
    others = {
        frozenset(s.image for s in scan_dataset(train, reg, validation_split=0.34, validation_seed=k)
                  .validation.samples)
        for k in range(8)
    }  # fmt: skip
    assert len(others) > 1  # other seeds hold out other images


def test_validation_loss_is_repeatable_and_drops_with_training(train_config):
    from lorakit.train.trainer import build_trainer

    cfg = train_config(
        validation_split=0.25, learning_rate=1e-2, max_train_steps=12, validate_every_n_steps=6
    )
    trainer = build_trainer(cfg)
    assert trainer.dataset.plan.num_train_images == 6  # 3 of 4 images x 2 repeats train
    before = trainer.validation_loss()
    assert trainer.validation_loss() == before  # same weights, same number
    seen = []
    path = trainer.run(on_progress=seen.append)
    after = trainer.validation_loss()
    assert trainer.validation_loss() == after
    assert after < before
    assert [p.step for p in seen if p.validation_loss is not None] == [6, 10, 12]  # 10: a plain report
    assert seen[-1].validation_loss == after and seen[-1].loss is not None
    meta = _metadata(path)
    assert float(meta["lorakit_validation_loss"]) == pytest.approx(after, rel=1e-5)
    assert meta["ss_num_validation_images"] == "1"
    assert meta["ss_num_train_images"] == "6"
    assert meta["ss_validation_split"] == "0.25"
    assert meta["ss_validation_seed"] == "1"  # the training seed, by default
    assert meta["ss_validate_every_n_steps"] == "6"
    assert meta["ss_validate_every_n_epochs"] == "None"
    assert meta["ss_max_validation_steps"] == "None"


def test_no_validation_writes_zero_images(train_config):
    from lorakit.train.trainer import train

    meta = _metadata(train(train_config(max_train_steps=1)))
    assert meta["ss_num_validation_images"] == "0"
    assert "lorakit_validation_loss" not in meta


def test_validation_seed_changes_the_noise_not_the_weights(train_config):
    from lorakit.train.trainer import build_trainer

    a = build_trainer(train_config(validation_split=0.25, validation_seed=5)).validation_loss()
    b = build_trainer(train_config(validation_split=0.25, validation_seed=5)).validation_loss()
    assert a == b


def test_validation_data_dir_sdxl(sdxl_config, tmp_path):
    from lorakit.train.trainer import train

    val_dir, _ = make_dataset(tmp_path / "val", n_train=3, n_reg=0, repeats=4)
    cfg = sdxl_config(validation_data_dir=str(val_dir), max_train_steps=2, max_validation_steps=1)
    meta = _metadata(train(cfg))
    assert meta["ss_num_validation_images"] == "3"  # repeats ignored
    assert meta["ss_num_train_images"] == "8"  # the train set is whole
    assert meta["ss_max_validation_steps"] == "1"
    assert float(meta["lorakit_validation_loss"]) > 0


def test_validating_does_not_change_training(train_config, tmp_path):
    """The validation noise comes from its own generators: validating every step trains the same LoRA."""
    import torch
    from safetensors.torch import load_file

    from lorakit.train.trainer import train

    often = train(train_config(validation_split=0.25, validate_every_n_steps=1, output_name="often"))
    once = train(train_config(validation_split=0.25, validate_every_n_epochs=100, output_name="once"))
    a, b = load_file(str(often)), load_file(str(once))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _metadata(often)["lorakit_validation_loss"] == _metadata(once)["lorakit_validation_loss"]


def test_validation_with_cached_latents_and_text_encoder_outputs(train_config):
    from lorakit.train.trainer import build_trainer

    cfg = train_config(
        validation_split=0.5,
        cache_latents=True,
        cache_text_encoder_outputs=True,
        network_train_unet_only=True,
        max_validation_steps=1,
    )
    trainer = build_trainer(cfg)
    assert trainer.dataset.validation._latents is not None  # encoded once, like the train images
    first = trainer.validation_loss()
    assert trainer.validation_loss() == first


def test_sdxl_split_is_repeatable(sdxl_config):
    from lorakit.train.trainer import build_trainer

    trainer = build_trainer(sdxl_config(validation_split=0.25))
    assert trainer.dataset.plan.num_train_images == 6
    assert trainer.validation_loss() == trainer.validation_loss()


def test_validation_loss_in_tensorboard(train_config, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lorakit.train.trainer import train

    logs = tmp_path / "logs"
    train(train_config(validation_split=0.25, validate_every_n_steps=2, logging_dir=str(logs)))
    steps = []
    for events in logs.rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if "loss/validation" in acc.Tags()["scalars"]:
            steps += [e.step for e in acc.Scalars("loss/validation")]
    assert sorted(steps) == [2, 4]


def test_validation_every_epoch_by_default(train_config):
    from lorakit.train.trainer import train

    seen = []
    # 3 train images x 2 repeats / batch 2 = 3 batches an epoch: epochs end at steps 3 and 6
    train(train_config(validation_split=0.25, max_train_steps=7, progress_every_n_steps=100), seen.append)
    assert [p.step for p in seen] == [3, 6, 7]  # each epoch's end, and the final LoRA
    assert all(p.validation_loss is not None for p in seen)


def test_split_of_a_single_image_and_a_missing_folder_are_explained(tmp_path):
    from lorakit.errors import DatasetError

    train, _ = make_dataset(tmp_path / "one", n_train=1, n_reg=0, repeats=1)
    with pytest.raises(DatasetError, match="validation_split = 0.5 needs at least 2 train images"):
        scan_dataset(train, validation_split=0.5)
    train, _ = make_dataset(tmp_path / "two", n_train=2, n_reg=0, repeats=1)
    assert len(scan_dataset(train, validation_split=0.9).samples) == 1  # never all: one image trains
    with pytest.raises(DatasetError, match="validation_data_dir .*does not exist"):
        scan_dataset(train, validation_data_dir=tmp_path / "nowhere")


def test_the_gui_plots_validation_beside_training_loss_and_shows_it(tmp_path):
    """The Train tab's curve (long form: one series per loss) and status line, from a job's progress."""
    import json

    from lorakit.gui.train_tab import loss_frame, status_html
    from lorakit.train.job import Job

    run = tmp_path / "run"
    run.mkdir()
    rows = [
        {"step": 10, "loss": 0.30, "validation_loss": None},
        {"step": 20, "loss": 0.25, "validation_loss": 0.28},
        {"step": 30, "loss": 0.22, "validation_loss": 0.28},  # carried over, not measured again
        {"step": 40, "loss": 0.20, "validation_loss": 0.24},
    ]
    common = {
        "total_steps": 40,
        "epoch": 1,
        "total_epochs": 1,
        "lr": 1e-4,
        "its": 2.0,
        "eta_s": 0.0,
        "time": 0,
    }
    (run / "progress.jsonl").write_text("".join(json.dumps({**common, **r}) + "\n" for r in rows))
    (run / "status.json").write_text(json.dumps({"state": "done", "message": "", "pid": None}))
    frame = loss_frame(Job(run))
    assert frame[frame.series == "training"].step.tolist() == [10, 20, 30, 40]
    val = frame[frame.series == "validation"]
    assert val.step.tolist() == [20, 40] and val.loss.tolist() == [0.28, 0.24]
    assert "validation loss <b class='lk-val'>0.2400</b>" in status_html(Job(run))
