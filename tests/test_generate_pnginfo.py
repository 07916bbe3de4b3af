"""A1111 PNG info: infotext layout, parsing, the `parameters` PNG chunk, model/LoRA hashes."""

from __future__ import annotations

import pytest
from PIL import Image

from lorakit.errors import ModelError
from lorakit.generate.pnginfo import (
    format_parameters,
    lora_short_hash,
    model_hash,
    parse_parameters,
    read_png_parameters,
    save_png_with_parameters,
)

REFERENCE = (
    "usu bear, in a forest <lora:kurokuma:0.8>\n"
    "Negative prompt: lowres, bad anatomy\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x512, "
    'Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Lora hashes: "kurokuma: 0123456789ab", '
    "Version: v1.10.1"
)
REFERENCE_PARAMS = {
    "Steps": 20,
    "Sampler": "DPM++ 2M",
    "Schedule type": "Karras",
    "CFG scale": 7,
    "Seed": 1234,
    "Size": "512x512",
    "Model hash": "6ce0161689",
    "Model": "v1-5-pruned-emaonly",
    "Lora hashes": "kurokuma: 0123456789ab",
    "Version": "v1.10.1",
}
BASIC = {"Steps": 20, "Sampler": "Euler a", "CFG scale": 7.5, "Seed": 42}


def test_reference_example_byte_for_byte():
    text = format_parameters(
        "usu bear, in a forest <lora:kurokuma:0.8>", "lowres, bad anatomy", REFERENCE_PARAMS
    )
    assert text == REFERENCE
    prompt, negative, params = parse_parameters(REFERENCE)
    assert prompt == "usu bear, in a forest <lora:kurokuma:0.8>"
    assert negative == "lowres, bad anatomy"
    assert params == {k: str(v) for k, v in REFERENCE_PARAMS.items()}


ROUND_TRIPS = [
    ("a cat", "blurry", BASIC),
    ("a cat", "", BASIC),  # no negative prompt line
    ("", "", BASIC),  # empty prompt: the text is just the params line
    ("", "lowres", BASIC),
    ("line one,\nline two (x:1.2)\nline three", "neg one\nneg two", BASIC),
    ("a <lora:a:0.5> <lora:b>", "x", {**BASIC, "Lora hashes": "a: 0123456789ab, b: ba9876543210"}),
    ("p", "n", {**BASIC, "Comment": 'say "hi", then: go'}),
    ("p", "n", {**BASIC, "Note": "two\nlines"}),
    ("p", "n", {**BASIC, "Path": "C:\\models\\x.safetensors"}),
    ("p", "n", {**BASIC, "Hires upscaler": "R-ESRGAN 4x+", "Denoising strength": 0.5}),
    ("ünïcode ☃ prompt", "日本語", {**BASIC, "Model": "モデル"}),
]


@pytest.mark.parametrize("prompt,negative,params", ROUND_TRIPS)
def test_round_trip(prompt, negative, params):
    text = format_parameters(prompt, negative, params)
    assert parse_parameters(text) == (prompt, negative, {k: str(v) for k, v in params.items()})


@pytest.mark.parametrize(
    "params,line",
    [
        (
            {"Lora hashes": "a: 0123456789ab, b: ba9876543210"},
            'Lora hashes: "a: 0123456789ab, b: ba9876543210"',
        ),
        ({"A": "x,y"}, 'A: "x,y"'),
        ({"A": "x:y"}, 'A: "x:y"'),
        ({"A": 'x"y'}, 'A: "x\\"y"'),
        ({"A": "x\ny"}, 'A: "x\\ny"'),
        ({"A": "plain text", "B": 1.5, "C": None}, "A: plain text, B: 1.5"),  # None is left out
        ({"A": "☃"}, "A: ☃"),  # no ASCII escaping, like A1111
    ],
)
def test_quoting(params, line):
    assert format_parameters("p", "", params) == f"p\n{line}"


def test_negative_omitted_when_empty():
    assert (
        format_parameters("a cat", "", BASIC)
        == "a cat\nSteps: 20, Sampler: Euler a, CFG scale: 7.5, Seed: 42"
    )


@pytest.mark.parametrize(
    "text,expected",
    [
        ("just a prompt", ("just a prompt", "", {})),
        ("a\nNegative prompt: b", ("a", "b", {})),
        ("a\nSteps: 20, Seed: 1", ("a\nSteps: 20, Seed: 1", "", {})),  # fewer than 3 pairs: prompt text
        ("  a  \n  Negative prompt:   b  \nSteps: 1, Seed: 2, CFG scale: 3", ("a", "b", {"Steps": "1", "Seed": "2", "CFG scale": "3"})),
        ("a\nSteps: 1, Sampler: DPM++ 2M Karras, Seed: 2", ("a", "", {"Steps": "1", "Sampler": "DPM++ 2M Karras", "Seed": "2"})),
        ('a\nSteps: 1, Seed: 2, Bad: "unterminated', ("a", "", {"Steps": "1", "Seed": "2", "Bad": '"unterminated'})),
    ],
)  # fmt: skip
def test_parse_a1111_texts(text, expected):
    assert parse_parameters(text) == expected


def test_png_chunk_written_and_read(tmp_path):
    path = tmp_path / "00001-1234.png"
    image = Image.new("RGB", (8, 8), (10, 20, 30))
    assert save_png_with_parameters(image, path, REFERENCE) == path
    with Image.open(path) as im:
        assert im.format == "PNG" and im.text["parameters"] == REFERENCE
        assert im.getpixel((0, 0)) == (10, 20, 30)
    assert read_png_parameters(path) == REFERENCE
    assert [p.name for p in tmp_path.iterdir()] == [path.name]  # no temp file left behind


def test_png_non_latin1_text(tmp_path):
    text = format_parameters("雪 ☃", "", BASIC)
    path = save_png_with_parameters(Image.new("RGB", (4, 4)), tmp_path / "u.png", text)
    assert read_png_parameters(path) == text


def test_png_overwrite_and_failure_leave_no_temp(tmp_path):
    path = tmp_path / "x.png"
    save_png_with_parameters(Image.new("RGB", (4, 4)), path, "first")
    save_png_with_parameters(Image.new("RGB", (4, 4)), path, "second")
    assert read_png_parameters(path) == "second"
    with pytest.raises(OSError):
        save_png_with_parameters(Image.new("CMYK", (4, 4)), path, "bad mode")  # PNG cannot hold CMYK
    assert read_png_parameters(path) == "second"
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_png_without_parameters(tmp_path):
    path = tmp_path / "plain.png"
    Image.new("RGB", (4, 4)).save(path)
    assert read_png_parameters(path) is None


def test_model_hash(tmp_path):
    path = tmp_path / "model.safetensors"
    data = bytes(range(256)) * 9000  # > 1 MiB: read in blocks
    path.write_bytes(data)
    assert model_hash(path) == "62bf4dac31"  # sha256 of the whole file, first 10 hex (A1111's short hash)


@pytest.mark.parametrize(
    "value,expected",
    [("0123456789abcdef" * 4, "0123456789ab"), ("ABCDEF0123456789", "abcdef012345")],
)
def test_lora_short_hash(value, expected):
    assert lora_short_hash(value) == expected


@pytest.mark.parametrize("value", ["", "0123", "not-a-hash-at-all", None])
def test_lora_short_hash_rejects(value):
    with pytest.raises(ModelError):
        lora_short_hash(value)
