"""Dataset sanity warnings: each fires on a planted problem and stays quiet on a clean dataset."""

import shutil

import pytest
from PIL import Image

from lorakit.config import TrainConfig
from lorakit.dataset.folders import scan_dataset
from lorakit.dataset.loader import DreamBoothDataset
from lorakit.dataset.sanity import (
    count_batches,
    duplicate_groups,
    near_pairs,
    sanity_warnings,
    small_image_warnings,
    trigger_word_warnings,
)
from lorakit.errors import DatasetError
from lorakit.testing import draw_shapes, make_dataset
from lorakit.train.summary import step_lines


def test_clean_dataset_has_no_warnings(tmp_path):
    train, reg = make_dataset(tmp_path, n_train=6, n_reg=6)
    plan = scan_dataset(train, reg)
    assert sanity_warnings(plan, "64") == []
    # caption files that carry the trigger word are fine too
    for p in (train / "5_usu bear").glob("*.png"):
        p.with_suffix(".caption").write_text("a photo of usu bear, black disc")
    assert sanity_warnings(scan_dataset(train, reg), "64") == []


def test_small_images_are_listed_with_a_count(tmp_path):
    train, _ = make_dataset(tmp_path, n_train=8, n_reg=0)  # 64x64 images
    plan = scan_dataset(train)
    assert small_image_warnings(plan, "128") == []  # exactly 2x: not "under half"
    (w,) = small_image_warnings(plan, "512")
    assert "8 image(s)" in w and "512x512" in w and "(64x64)" in w and "and 3 more" in w
    assert "usu_00.png" in w and "usu_07.png" not in w  # first few named, the rest counted
    assert "larger originals" in w or "lower the resolution" in w
    # one side too small without buckets; with buckets the area decides
    Image.new("RGB", (40, 200), "white").save(train / "5_usu bear" / "thin.png")
    plan = scan_dataset(train)
    (w,) = small_image_warnings(plan, "100")
    assert "thin.png (40x200)" in w and "usu_00" not in w
    assert small_image_warnings(plan, "100", enable_bucket=True) == []


def test_duplicates_are_grouped(tmp_path):
    train, reg = make_dataset(tmp_path, n_train=6, n_reg=3)
    folder = train / "5_usu bear"
    shutil.copy(folder / "usu_00.png", folder / "copy_a.png")
    shutil.copy(folder / "usu_00.png", reg / "1_bear" / "copy_b.png")  # across train and reg too
    # near-identical: the same picture saved as JPEG (other bytes, same look)
    Image.open(folder / "usu_03.png").convert("RGB").save(folder / "usu_03_again.jpg", quality=90)
    plan = scan_dataset(train, reg)
    images = list(dict.fromkeys(s.image for s in plan.samples))
    identical, near = duplicate_groups(images)
    assert [sorted(p.name for p in g) for g in identical] == [["copy_a.png", "copy_b.png", "usu_00.png"]]
    assert [sorted(p.name for p in g) for g in near] == [["usu_03.png", "usu_03_again.jpg"]]
    warnings = sanity_warnings(plan, "64")
    assert sum("byte-identical" in w for w in warnings) == 1
    assert sum("nearly identical" in w for w in warnings) == 1
    (w,) = [w for w in warnings if "byte-identical" in w]
    assert w.startswith("3 files") and "copy_b.png" in w and "delete the copies" in w


def test_near_pairs_uses_hamming_distance():
    a = 0xF0F0F0F0F0F0F0F0
    hashes = [a, a ^ 0b11, a ^ 0b111, a ^ (1 << 63) ^ 1]
    pairs = near_pairs(hashes, max_bits=2)
    assert (0, 1) in pairs and (0, 3) in pairs and (1, 2) in pairs
    assert (0, 2) not in pairs  # 3 bits apart
    brute = [(i, j) for i in range(4) for j in range(i + 1, 4) if bin(hashes[i] ^ hashes[j]).count("1") <= 2]
    assert pairs == brute


def test_captions_missing_the_trigger_word(tmp_path):
    train, reg = make_dataset(tmp_path, n_train=4, n_reg=2)
    folder = train / "5_usu bear"
    (folder / "usu_00.caption").write_text("usu bear, sitting")
    (folder / "usu_01.caption").write_text("a bear sitting on grass")  # forgot 'usu'
    (folder / "usu_02.caption").write_text("usually a bear")  # 'usu' only inside a word
    (reg / "1_bear" / "bear_00.caption").write_text("a bear")  # reg folders have no trigger word
    plan = scan_dataset(train, reg)
    (w,) = trigger_word_warnings(plan)
    assert "2 caption(s)" in w and "'usu'" in w and "usu_01.png" in w and "usu_02.png" in w
    assert "usu_00.png" not in w and "usu_03.png" not in w  # the folder prompt has the word
    assert "Add 'usu'" in w
    # a folder prompt of one word has no '<token> <class>' to check against
    single = tmp_path / "single"
    draw_shapes(single / "10_style" / "a.png", seed=1, colour=(0, 0, 0))
    (single / "10_style" / "a.caption").write_text("a painting")
    assert trigger_word_warnings(scan_dataset(single)) == []


def test_train_data_dir_pointed_at_the_images(tmp_path):
    train, _ = make_dataset(tmp_path, n_train=2, n_reg=0)
    with pytest.raises(DatasetError) as e:
        scan_dataset(train / "5_usu bear")
    msg = str(e.value)
    assert "Give the folder that CONTAINS '5_usu bear'" in msg
    assert f"train_data_dir = {train}" in msg
    loose = tmp_path / "loose"
    draw_shapes(loose / "a.png", seed=1, colour=(0, 0, 0))
    with pytest.raises(DatasetError, match="holds the images itself") as e:
        scan_dataset(loose)
    assert "20_usu bear" in str(e.value) and "CONTAINS" in str(e.value)


@pytest.mark.parametrize("bucket", [False, True])
def test_step_math(tmp_path, bucket):
    train, reg = make_dataset(tmp_path, n_train=6, n_reg=6, repeats=5)  # 30 train samples, 30 reg
    cfg = TrainConfig()
    d = cfg.dataset
    d.train_data_dir, d.reg_data_dir, d.resolution, d.enable_bucket = str(train), str(reg), "64", bucket
    d.train_batch_size = 4
    cfg.training.max_train_epochs = 3
    plan = scan_dataset(train, reg)
    batches = count_batches(plan, d)
    assert batches == DreamBoothDataset(plan, d, seed=0).num_batches_per_epoch  # the trainer's count
    text = "\n".join(step_lines(cfg, plan, batches))
    assert "30 train samples" in text and "+ 30 reg samples" in text and "double" in text
    if not bucket:
        assert batches == 15  # ceil(60 / 4)
    assert f"{batches} batches per epoch" in text
    assert f"x 3 epochs (max_train_epochs) = {3 * batches} total steps" in text


def test_dataset_tab_report_shows_the_warnings_and_the_step_math(tmp_path):
    pytest.importorskip("gradio")
    from lorakit.gui.dataset_tab import check_folders

    train, reg = make_dataset(tmp_path, n_train=4, n_reg=4, repeats=5)
    ok, text = check_folders(str(train), str(reg), ".caption", "stop", {"resolution": "64"})
    assert ok and "⚠" not in text and "20 train samples" in text and "+ 20 reg samples" in text
    options = {
        "resolution": "512,512",
        "train_batch_size": 2,
        "max_train_epochs": "10",
        "max_train_steps": 1600,
    }
    (train / "5_usu bear" / "usu_00.caption").write_text("a bear")
    ok, text = check_folders(str(train), str(reg), ".caption", "stop", options)
    assert ok and "upscaled more than 2x" in text and "trigger word" in text
    assert "20 batches per epoch" in text and "x 10 epochs (max_train_epochs) = 200 total steps" in text
    ok, text = check_folders(str(train / "5_usu bear"), "", ".caption", "stop")
    assert not ok and "CONTAINS &#x27;5_usu bear&#x27;" in text


def test_trainer_preflight_log_has_the_step_math_and_the_warnings(tmp_path, caplog):
    import logging

    from lorakit.dataset.loader import build_dataset
    from lorakit.train.summary import log_dataset_summary

    train, reg = make_dataset(tmp_path, n_train=3, n_reg=0)
    shutil.copy(train / "5_usu bear" / "usu_00.png", train / "5_usu bear" / "dup.png")
    cfg = TrainConfig()
    cfg.dataset.train_data_dir, cfg.dataset.resolution = str(train), "256"
    cfg.training.max_train_steps = 40
    dataset = build_dataset(cfg.dataset, seed=0)
    log = logging.getLogger("lorakit.test_sanity")
    with caplog.at_level(logging.INFO, logger=log.name):
        log_dataset_summary(cfg, dataset, log)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    infos = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.INFO)
    assert "20 batches per epoch" in infos and "max_train_steps = 40 total steps, that is 2 epoch(s)" in infos
    assert any("byte-identical" in w and "dup.png" in w for w in warnings)
    assert any("upscaled" in w for w in warnings)
