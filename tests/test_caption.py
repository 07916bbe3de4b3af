"""`lorakit caption` with the user's own model folder, offline: a tiny WD14-format ONNX tagger whose
scores are known (lorakit.testing.make_tiny_tagger) and a tiny random BLIP saved with save_pretrained."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from PIL import Image

from lorakit.caption import caption_folder, load_captioner
from lorakit.caption.wd14 import TagOptions, WD14Tagger, preprocess, read_tags
from lorakit.cli import main
from lorakit.errors import DatasetError, ModelError
from lorakit.testing import make_tiny_tagger

pytest.importorskip("onnxruntime")
pytest.importorskip("onnx")

RED, BLUE = (255, 0, 0), (0, 0, 255)


@pytest.fixture(scope="module")
def tagger(tmp_path_factory) -> Path:
    return make_tiny_tagger(tmp_path_factory.mktemp("wd14") / "wd-tiny-tagger")


def square(path: Path, colour, size: int = 24) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path)
    return path


def kohya_folder(root: Path) -> Path:
    """root/train/20_usu bear with a red and a blue image, and root/train/1_bear with a red one."""
    square(root / "train" / "20_usu bear" / "red.png", RED)
    square(root / "train" / "20_usu bear" / "blue.jpg", BLUE)
    square(root / "train" / "1_bear" / "red2.png", RED)
    return root / "train"


def caption(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def test_preprocess_pads_with_white_resizes_and_swaps_to_bgr():
    wide = Image.new("RGB", (40, 20), RED)
    x = preprocess(wide, 16)
    assert x.shape == (16, 16, 3) and x.dtype.name == "float32"
    assert x[0, 0].tolist() == [255.0, 255.0, 255.0]  # the white band above the picture
    assert x[8, 8].tolist() == [0.0, 0.0, 255.0]  # red, in BGR order
    clear = Image.new("RGBA", (8, 8), (255, 0, 0, 0))  # transparency goes over white, as kohya
    assert preprocess(clear, 16)[8, 8].tolist() == [255.0, 255.0, 255.0]


def test_tags_of_a_kohya_folder_with_trigger_first_and_frequencies(tagger, tmp_path, capsys):
    train = kohya_folder(tmp_path)
    rc = main(["caption", str(train), "--model_dir", str(tagger), "--always_first_tags", "usu bear",
               "--undesired_tags", "solo", "--remove_underscore"])  # fmt: skip
    assert rc == 0
    folder = train / "20_usu bear"
    assert caption(folder / "red.txt") == "usu bear, long hair, usu bear (series), ^_^\n"
    assert caption(folder / "blue.txt") == "usu bear, blue sky, ^_^\n"  # not long hair, not faint_tag
    assert caption(train / "1_bear" / "red2.txt").startswith("usu bear, long hair")
    out = capsys.readouterr().out
    assert "no images directly in" in out and "wrote 3 caption file(s) (.txt)" in out
    assert "    3  ^_^" in out and "    2  long hair" in out and "    1  blue sky" in out
    assert "solo" not in out  # undesired: neither written nor counted
    assert 'caption_extension = ".txt"' in out and "keep_tokens = 1" in out


def test_existing_captions_are_kept_unless_overwrite(tagger, tmp_path, capsys):
    train = kohya_folder(tmp_path)
    mine = train / "20_usu bear" / "red.txt"
    mine.write_text("my own caption\n", encoding="utf-8")
    assert main(["caption", str(train), "--model_dir", str(tagger), "--recursive"]) == 0
    assert caption(mine) == "my own caption\n"
    out = capsys.readouterr().out
    assert "wrote 2 caption file(s)" in out and "skipped 1 image(s) that already have a .txt caption" in out
    assert main(["caption", str(train), "--model_dir", str(tagger), "--overwrite", "--thresh", "0.2"]) == 0
    assert (
        caption(mine) == "solo, long_hair, usu_bear_(series), ^_^, faint_tag\n"
    )  # thresh 0.2: faint_tag too
    assert "wrote 3 caption file(s)" in capsys.readouterr().out
    assert not [p for p in mine.parent.iterdir() if p.name.startswith(".")]  # no temp files left


def test_thresholds_ratings_extension_and_separator(tagger, tmp_path):
    flat = tmp_path / "flat"
    square(flat / "a.png", RED)
    args = ["caption", str(flat), "--model_dir", str(tagger), "--caption_extension", "caption",
            "--character_threshold", "1.1", "--general_threshold", "0.6", "--use_rating_tags",
            "--caption_separator", "; "]  # fmt: skip
    assert main(args) == 0
    assert caption(flat / "a.caption") == "general; solo; long_hair\n"
    assert not (flat / "a.txt").exists()
    assert main(["caption", str(flat), "--model_dir", str(tagger), "--caption_extension", ".png"]) == 2


def test_broken_images_are_named_and_skipped(tagger, tmp_path, capsys):
    flat = tmp_path / "flat"
    square(flat / "good.png", BLUE)
    (flat / "broken.png").write_bytes(b"not a png at all")
    (flat / "notes.md").write_text("not an image")
    assert main(["caption", str(flat), "--model_dir", str(tagger)]) == 0
    assert caption(flat / "good.txt") == "solo, blue_sky, ^_^\n"
    assert not (flat / "broken.txt").exists() and not (flat / "notes.txt").exists()
    out = capsys.readouterr().out
    assert "wrote 1 caption file(s)" in out and f"skipped broken image {flat / 'broken.png'}" in out


def test_an_image_with_no_tag_gets_no_empty_caption_file(tmp_path):
    tags = (("general", "9", (0, 0, 0), 0.0), ("never", "0", (0, 0, 0), -9.0))
    folder = make_tiny_tagger(tmp_path / "tagger", tags=tags)
    square(tmp_path / "img" / "a.png", RED)
    report = caption_folder(tmp_path / "img", WD14Tagger(folder))
    assert report.empty == [tmp_path / "img" / "a.png"] and not report.written
    assert not (tmp_path / "img" / "a.txt").exists()  # an empty caption file would stop training


def test_missing_model_folder_files_and_onnxruntime_say_what_to_put_where(tagger, tmp_path, monkeypatch):
    with pytest.raises(ModelError, match="does not exist.*model.onnx and selected_tags.csv"):
        load_captioner(tmp_path / "nowhere")
    half = tmp_path / "half"
    half.mkdir()
    (half / "selected_tags.csv").write_text((tagger / "selected_tags.csv").read_text())
    with pytest.raises(ModelError) as e:
        load_captioner(half)
    assert "model.onnx not found. Download SmilingWolf/wd-vit-tagger-v3's" in str(e.value)
    assert f"into {half}" in str(e.value) and "selected_tags.csv not" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="model.onnx, selected_tags.csv not found.*config.json"):
        load_captioner(tmp_path / "empty")
    (half / "selected_tags.csv").write_text("name,count\nx,1\n")
    (half / "model.onnx").write_bytes((tagger / "model.onnx").read_bytes())
    with pytest.raises(ModelError, match="first line must be tag_id,name,category"):
        load_captioner(half)

    import builtins

    real_import = builtins.__import__

    def no_onnxruntime(name, *args, **kwargs):
        if name == "onnxruntime":
            raise ImportError("No module named 'onnxruntime'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_onnxruntime)
    with pytest.raises(ModelError, match=r"needs onnxruntime.*pip install \"lorakit\[caption\]\""):
        load_captioner(tagger)


def test_cli_errors_are_one_line_without_traceback(tmp_path, capsys):
    square(tmp_path / "img" / "a.png", RED)
    assert main(["caption", str(tmp_path / "img"), "--model_dir", str(tmp_path / "no-model")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: captioning model folder") and "Traceback" not in err
    with pytest.raises(DatasetError, match="does not exist"):
        caption_folder(tmp_path / "no-images", lambda ims: [])
    (tmp_path / "none").mkdir()
    with pytest.raises(DatasetError, match="no images"):
        caption_folder(tmp_path / "none", lambda ims: [])


def test_remove_underscore_keeps_short_tags(tagger):
    names = [t.name for t in read_tags(tagger / "selected_tags.csv", remove_underscore=True)]
    assert "long hair" in names and "^_^" in names and "usu bear (series)" in names
    opts = TagOptions(general_threshold=0.6, character_tags_first=True)
    t = WD14Tagger(tagger, opts)
    assert t([Image.new("RGB", (16, 16), RED)]) == [["usu_bear_(series)", "solo", "long_hair"]]
    # an undesired tag is left out in either spelling, renamed or not
    for remove, undesired in ((True, "long_hair"), (False, "long hair")):
        t = WD14Tagger(tagger, TagOptions(remove_underscore=remove, undesired_tags=frozenset({undesired})))
        tags = t([Image.new("RGB", (16, 16), RED)])[0]
        assert "solo" in tags and not {"long hair", "long_hair"} & set(tags)


# --- a transformers image-to-text model (BLIP) ------------------------------------------------


@pytest.fixture(scope="module")
def tiny_blip(tmp_path_factory) -> Path:
    """A random BLIP with 16-wide layers and a 12-word BERT vocabulary, biased to say 'bear'."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import BertTokenizer, BlipConfig, BlipForConditionalGeneration, BlipProcessor
    from transformers.models.blip import BlipImageProcessor

    folder = tmp_path_factory.mktemp("blip") / "tiny-blip"
    folder.mkdir()
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "a",
        "bear",
        "sits",
        "on",
        "grass",
        "black",
        "disc",
    ]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    processor = BlipProcessor(
        BlipImageProcessor(size={"height": 32, "width": 32}), BertTokenizer(str(folder / "vocab.txt"))
    )
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = BlipConfig(
        text_config=dict(small, vocab_size=len(words), encoder_hidden_size=16, max_position_embeddings=32,
                         bos_token_id=2, pad_token_id=0, sep_token_id=3, eos_token_id=3),
        vision_config=dict(small, image_size=32, patch_size=16),
        projection_dim=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = BlipForConditionalGeneration(config)
    with torch.no_grad():  # a known caption: every generated token is 'bear'
        model.text_decoder.cls.predictions.bias[words.index("bear")] = 50.0
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def test_blip_writes_a_sentence_per_image_after_the_trigger(tiny_blip, tmp_path, capsys):
    train = kohya_folder(tmp_path)
    rc = main(["caption", str(train), "--model_dir", str(tiny_blip), "--always_first_tags", "usu bear",
               "--max_length", "4", "--num_beams", "2", "--batch_size", "2", "--device", "cpu"])  # fmt: skip
    assert rc == 0
    for image in ("20_usu bear/red.png", "20_usu bear/blue.jpg", "1_bear/red2.png"):
        assert caption((train / image).with_suffix(".txt")) == "usu bear, bear bear bear\n"
    out = capsys.readouterr().out
    assert "wrote 3 caption file(s)" in out and "tag frequencies" not in out
    flat = tmp_path / "flat"
    square(flat / "x.png", BLUE)
    assert (
        main(["caption", str(flat), "--model_dir", str(tiny_blip), "--prompt", "a", "--max_length", "4"]) == 0
    )
    assert caption(flat / "x.txt") == "a bear bear\n"


def test_a_model_folder_without_its_processor_is_named(tiny_blip, tmp_path):
    import shutil

    folder = tmp_path / "no-processor"
    folder.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(tiny_blip / name, folder / name)
    with pytest.raises(
        ModelError, match="cannot load it as an image-to-text model.*preprocessor_config.json"
    ):
        load_captioner(folder)


def test_a_git_model_folder_captions_too(tmp_path):
    """GIT (GitForCausalLM, a decoder-only captioner) through the same path, picked from config.json."""
    import torch
    from transformers import BertTokenizer, CLIPImageProcessor, GitConfig, GitForCausalLM, GitProcessor

    folder = tmp_path / "tiny-git"
    folder.mkdir()
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "bear", "sits"]
    (folder / "vocab.txt").write_text("\n".join(words) + "\n", encoding="utf-8")
    images = CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32})
    small = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = GitConfig(
        vision_config=dict(small, image_size=32, patch_size=16), vocab_size=len(words), max_position_embeddings=32,
        bos_token_id=2, eos_token_id=3, pad_token_id=0, **small,
    )  # fmt: skip
    torch.manual_seed(0)
    model = GitForCausalLM(config)
    with torch.no_grad():
        model.output.bias[words.index("bear")] = 50.0
    model.save_pretrained(folder)
    GitProcessor(images, BertTokenizer(str(folder / "vocab.txt"))).save_pretrained(folder)
    square(tmp_path / "img" / "a.png", RED)
    from lorakit.caption.natural import TextOptions

    captioner = load_captioner(folder, text_options=TextOptions(max_length=4), device="cpu")
    report = caption_folder(tmp_path / "img", captioner, always_first_tags=["usu bear"])
    assert type(captioner.model).__name__ == "GitForCausalLM" and report.written
    assert caption(tmp_path / "img" / "a.txt") == "usu bear, bear bear bear\n"
