"""The shipped CLIP tokenizer matches open_clip's SimpleTokenizer (the reference CLIP BPE)."""

from __future__ import annotations

import importlib.util
import random
from pathlib import Path

import pytest

from lorakit.models.tokenizer import BOS_ID, EOS_ID, TOKENIZER_DIR, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def _load_by_path(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer()


@pytest.fixture(scope="module")
def simple_tokenizer():
    # `import open_clip` needs torchvision; its tokenizer module alone does not
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.skip("open_clip_torch not installed")
    folder = Path(next(iter(spec.submodule_search_locations)))
    return _load_by_path("_open_clip_tokenizer", folder / "tokenizer.py").SimpleTokenizer()


def test_known_ids_and_special_tokens(tok):
    assert tok("a photo of a cat").input_ids == [49406, 320, 1125, 539, 320, 2368, 49407]
    assert tok.model_max_length == 77
    assert (tok.bos_token, tok.bos_token_id) == ("<|startoftext|>", BOS_ID)
    assert (tok.eos_token, tok.eos_token_id) == ("<|endoftext|>", EOS_ID)
    assert tok.pad_token_id == EOS_ID
    assert len(tok) == 49408
    padded = tok("a photo of a cat", padding="max_length", truncation=True, max_length=77).input_ids
    assert len(padded) == 77 and padded[7:] == [EOS_ID] * 70
    long = tok("cat " * 200, padding="max_length", truncation=True, max_length=77).input_ids
    assert len(long) == 77 and long[0] == BOS_ID and long[-1] == EOS_ID


WORDS = (
    "a photo of cat dog masterpiece best quality portrait woman man landscape sunset mountains "
    "highly detailed 8k uhd dslr bokeh anime girl blue eyes long hair smiling standing outdoors "
    "cyberpunk city night neon lights watercolor oil painting by greg rutkowski trending on artstation "
    "unreal engine octane render sks person ohwx 1girl solo looking at viewer"
).split()
ODD = [
    "café",
    "naïve",
    "Ünïcödé",
    "日本語",
    "東京タワー",
    "Привет",
    "Ελληνικά",
    "עברית",
    "العربية",
    "한국어",
    "🐱",
    "🔥🔥",
    "👩‍🚀",
    "❤️",
    "ℌ𝔢𝔩𝔩𝔬",
    "“curly”",
    "‘single’",
    "I’m",
    "ﬁne",
    "ｆｕｌｌ",
    "ﾊﾝｶｸ",
    "&amp;",
    "&lt;3",
    "e\u0301",
    "\u00a0",
    "x²",
    "½",
    "№5",
    "—",
    "…",
    "«quote»",
    "don't",
    "it's",
    "we'll",
    "<lora:my_lora:0.8>",
    "(masterpiece:1.2)",
    "[[bad hands]]",
    "{x|y}",
    "BREAK",
    "\\(escaped\\)",
    "3.14159",
    "1024x768",
    "#hashtag",
    "@user",
    "http://example.com/a?b=c",
    "C++",
    "snake_case_word",
    "CamelCaseWord",
    "ALLCAPS",
    "tab\there",
    "new\nline",
    "   ",
    "!!!???",
    "$100",
    "50%",
]
PUNCT = [
    ",",
    ", ",
    ".",
    " . ",
    ":",
    ";",
    "!",
    "?",
    "-",
    "_",
    "/",
    "|",
    "(",
    ")",
    "[",
    "]",
    "{",
    "}",
    "  ",
    "\t",
]


def _prompts(n: int = 400) -> list[str]:
    rnd = random.Random(1234)
    out = ["", " ", "a photo of a cat", "A Photo Of A Cat", "a  photo\tof\na cat  ", "cat " * 120]
    while len(out) < n:
        parts = []
        for _ in range(rnd.randint(1, 60)):
            r = rnd.random()
            if r < 0.55:
                parts.append(rnd.choice(WORDS).upper() if rnd.random() < 0.1 else rnd.choice(WORDS))
            elif r < 0.75:
                parts.append(rnd.choice(ODD))
            elif r < 0.9:
                parts.append(rnd.choice(PUNCT))
            elif r < 0.95:
                parts.append(f"({rnd.choice(WORDS)}:{rnd.uniform(0, 2):.{rnd.randint(1, 2)}f})")
            else:
                parts.append(str(rnd.randint(0, 10 ** rnd.randint(1, 8))))
        out.append(rnd.choice(["", " ", ", "]).join(parts) if rnd.random() < 0.5 else " ".join(parts))
    return out


def test_matches_open_clip_simple_tokenizer(tok, simple_tokenizer):
    prompts = _prompts()
    assert len(prompts) >= 300
    # open_clip's encode() gives the untruncated BPE ids without BOS/EOS
    ours = tok(prompts, add_special_tokens=False).input_ids
    mismatches = [
        (p, a, b) for p, a, b in zip(prompts, ours, map(simple_tokenizer.encode, prompts)) if a != b
    ]
    assert not mismatches, f"{len(mismatches)} prompts differ, first: {mismatches[0]!r}"
    # single-prompt call and tokenize() take the same path
    for p in prompts[:50]:
        assert tok(p, add_special_tokens=False).input_ids == simple_tokenizer.encode(p)
        assert tok.convert_tokens_to_ids(tok.tokenize(p)) == simple_tokenizer.encode(p)


def test_special_token_text_is_special(tok):
    # like the Hub tokenizer (open_clip names these <start_of_text>/<end_of_text>, so it differs here)
    assert tok("x <|endoftext|>", add_special_tokens=False).input_ids == [343, EOS_ID]


def test_vocab_files_are_what_the_tool_derives():
    tool = _load_by_path("_make_clip_tokenizer", ROOT / "tools" / "make_clip_tokenizer.py")
    vocab_json, merges_txt = tool.derive()
    assert (TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8") == vocab_json
    assert (TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8") == merges_txt
