"""kohya DreamBooth folder scanning: names, captions, bad images, reg balancing, metadata."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image

from lorakit.dataset.folders import balance_reg_repeats, parse_folder_name, scan_dataset
from lorakit.errors import DatasetError


def img(path: Path, size=(32, 24), color=(200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def folder(root: Path, name: str, n: int, ext: str = ".png") -> list[Path]:
    return [img(root / name / f"img{i:02d}{ext}") for i in range(n)]


def test_folder_name_parsing_like_kohya():
    assert parse_folder_name("20_usu bear") == (20, "usu bear")
    assert parse_folder_name("5_usu_bear style") == (5, "usu_bear style")
    assert parse_folder_name("3") == (3, "")
    assert parse_folder_name("usu bear") is None


def test_repeats_and_prompt(tmp_path):
    folder(tmp_path / "train", "5_usu_bear style", 2)
    folder(tmp_path / "train", "3_other", 1)
    plan = scan_dataset(tmp_path / "train")
    assert plan.num_train_images == 5 * 2 + 3
    assert len(plan.samples) == 13
    caps = [s.caption for s in plan.samples]
    assert caps.count("usu_bear style") == 10 and caps.count("other") == 3
    assert plan.dataset_dirs == {
        "5_usu_bear style": {"n_repeats": 5, "img_count": 2},
        "3_other": {"n_repeats": 3, "img_count": 1},
    }
    assert plan.reg_dataset_dirs == {} and plan.num_reg_images == 0
    assert all(s.size == (32, 24) and not s.is_reg for s in plan.samples)


def test_images_are_sorted_and_extensions_case_insensitive(tmp_path):
    d = tmp_path / "train" / "1_x"
    img(d / "b.JPG")
    img(d / "a.png")
    img(d / "c.WebP")
    (d / "notes.md").write_text("hi")
    plan = scan_dataset(tmp_path / "train")
    assert [s.image.name for s in plan.samples] == ["a.png", "b.JPG", "c.WebP"]


def test_caption_file_replaces_prompt_first_line_only(tmp_path):
    a, b = folder(tmp_path / "train", "2_usu bear", 2)
    a.with_suffix(".caption").write_text("usu bear, red hat\nsecond line ignored\n", encoding="utf-8")
    a.with_suffix(".txt").write_text("txt caption", encoding="utf-8")
    plan = scan_dataset(tmp_path / "train")
    caps = {s.image.name: s.caption for s in plan.samples}
    assert caps == {a.name: "usu bear, red hat", b.name: "usu bear"}
    plan_txt = scan_dataset(tmp_path / "train", caption_extension=".txt")
    caps = {s.image.name: s.caption for s in plan_txt.samples}
    assert caps == {a.name: "txt caption", b.name: "usu bear"}


def test_warns_when_captions_use_the_other_extension(tmp_path):
    for p in folder(tmp_path / "train", "1_x", 3):
        p.with_suffix(".txt").write_text("a, b")
    plan = scan_dataset(tmp_path / "train", caption_extension=".caption")
    assert any("caption_extension" in w and ".txt" in w for w in plan.warnings)
    assert all(s.caption == "x" for s in plan.samples)  # kohya's rule: only the configured extension
    assert not any(
        "caption_extension" in w for w in scan_dataset(tmp_path / "train", caption_extension=".txt").warnings
    )


def test_bad_folder_name_error_names_folder_and_form(tmp_path):
    folder(tmp_path / "train", "usu bear", 1)
    with pytest.raises(DatasetError) as e:
        scan_dataset(tmp_path / "train")
    msg = str(e.value)
    assert str(tmp_path / "train" / "usu bear") in msg
    assert "<repeats>_<prompt>" in msg and "20_usu bear" in msg


def test_missing_and_empty_dirs(tmp_path):
    with pytest.raises(DatasetError, match="does not exist"):
        scan_dataset(tmp_path / "nope")
    (tmp_path / "train").mkdir()
    with pytest.raises(DatasetError, match="no subfolders"):
        scan_dataset(tmp_path / "train")
    (tmp_path / "train" / "10_empty").mkdir()
    (tmp_path / "train" / "10_empty" / "a.caption").write_text("x")
    with pytest.raises(DatasetError, match="10_empty.*no usable images"):
        scan_dataset(tmp_path / "train")


def test_files_directly_in_train_dir_are_ignored_with_warning(tmp_path):
    folder(tmp_path / "train", "1_x", 1)
    img(tmp_path / "train" / "stray.png")
    plan = scan_dataset(tmp_path / "train")
    assert len(plan.samples) == 1
    assert any("stray.png" in w and "ignored" in w for w in plan.warnings)


def make_bad_images(d: Path) -> tuple[Path, Path, Path]:
    zero = d / "zero.png"
    zero.write_bytes(b"")
    fake = d / "fake.jpg"
    fake.write_bytes(b"this is not an image at all")
    good = img(d / "trunc_src.png", size=(64, 64))
    trunc = d / "trunc.png"
    trunc.write_bytes(good.read_bytes()[:-40])
    good.unlink()
    return zero, fake, trunc


def test_bad_images_stop_lists_every_bad_file(tmp_path):
    d = tmp_path / "train" / "1_x"
    img(d / "good.png")
    bad = make_bad_images(d)
    with pytest.raises(DatasetError) as e:
        scan_dataset(tmp_path / "train", bad_images="stop")
    msg = str(e.value)
    assert "3 image(s)" in msg and "bad_images" in msg
    for p in bad:
        assert str(p) in msg
    assert "good.png" not in msg


def test_bad_images_skip_drops_them_with_warnings(tmp_path):
    d = tmp_path / "train" / "2_x"
    img(d / "good.png")
    bad = make_bad_images(d)
    plan = scan_dataset(tmp_path / "train", bad_images="skip")
    assert [s.image.name for s in plan.samples] == ["good.png", "good.png"]
    assert plan.num_train_images == 2 and plan.dataset_dirs["2_x"]["img_count"] == 1
    for p in bad:
        assert any(str(p) in w and "skipped" in w for w in plan.warnings)


def reg_counts(plan) -> dict[str, int]:
    out: dict[str, int] = {}
    for s in plan.samples:
        if s.is_reg:
            out[s.image.name] = out.get(s.image.name, 0) + 1
    return out


def test_reg_few_images_are_repeated_up_to_train_count(tmp_path):
    folder(tmp_path / "train", "10_usu bear", 2)  # N = 20
    folder(tmp_path / "reg", "1_bear", 3)
    plan = scan_dataset(tmp_path / "train", tmp_path / "reg")
    assert plan.num_train_images == 20 and plan.num_reg_images == 3
    # first pass 1+1+1 = 3, then +1 per image in order: 17 = 5 full passes + 2
    assert reg_counts(plan) == {"img00.png": 7, "img01.png": 7, "img02.png": 6}
    assert sum(s.is_reg for s in plan.samples) == 20 and len(plan.samples) == 40
    assert all(s.caption == "bear" for s in plan.samples if s.is_reg)
    assert plan.reg_dataset_dirs == {"1_bear": {"n_repeats": 1, "img_count": 3}}
    assert not any("not used" in w for w in plan.warnings)


def test_reg_excess_images_unused_with_warning(tmp_path):
    folder(tmp_path / "train", "10_usu bear", 2)  # N = 20
    folder(tmp_path / "reg", "1_bear", 25)
    plan = scan_dataset(tmp_path / "train", tmp_path / "reg")
    counts = reg_counts(plan)
    assert plan.num_reg_images == 25
    assert counts == {f"img{i:02d}.png": 1 for i in range(20)}  # always the first ones
    assert any("5 of 25" in w and "not used" in w for w in plan.warnings)


def test_balance_reg_repeats_matches_kohya_loop():
    assert balance_reg_repeats(20, [1, 1, 1]) == [7, 7, 6]
    assert balance_reg_repeats(10, [3, 3, 3, 3]) == [3, 3, 3, 3]  # first pass overshoots: 12
    assert balance_reg_repeats(7, [3, 3, 3, 3]) == [3, 3, 3, 0]
    assert balance_reg_repeats(8, [2, 1]) == [5, 3]  # 3, then +1 each: 5, 6, 7, 8
    assert balance_reg_repeats(5, []) == []


def test_tag_frequency_per_dir_includes_reg(tmp_path):
    a, b = folder(tmp_path / "train", "2_usu bear", 2)
    a.with_suffix(".caption").write_text("Usu Bear, red hat, , smiling")
    b.with_suffix(".caption").write_text("usu bear,  Red Hat")
    folder(tmp_path / "reg", "1_bear", 2)
    plan = scan_dataset(tmp_path / "train", tmp_path / "reg")
    assert plan.tag_frequency == {
        "2_usu bear": {"usu bear": 2, "red hat": 2, "smiling": 1},  # per image, not per repeat
        "1_bear": {"bear": 2},
    }
