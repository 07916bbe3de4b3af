"""The shipped CLIP tokenizer gives the ids of transformers 4.x's slow CLIPTokenizer, the one kohya and
A1111 run (with ftfy installed, as both have it)."""

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
def open_clip_dir() -> Path:
    # `import open_clip` needs torchvision; its tokenizer module and BPE table alone do not
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch not installed")
    return Path(next(iter(spec.submodule_search_locations)))


@pytest.fixture(scope="module")
def simple_tokenizer(open_clip_dir):
    """open_clip's SimpleTokenizer (the reference CLIP BPE, written apart from transformers) cleaning text
    as transformers' CLIPTokenizer does: ftfy only, without open_clip's extra double HTML unescape."""
    module = _load_by_path("_open_clip_tokenizer", open_clip_dir / "tokenizer.py")
    module.basic_clean = lambda text: module.ftfy.fix_text(text).strip()
    return module.SimpleTokenizer()


# Ids (without BOS/EOS) from transformers 4.57.6's slow CLIPTokenizer with ftfy 6.3.1, built from the
# shipped vocab.json/merges.txt. It lowercases with str.lower() (a word-final Σ gives ς, 480, not σ, 481)
# and unescapes HTML only through ftfy: entities that end in `;`, in text without `<`.
TRICKY_IDS = {
    "ΟΔΟΣ": [138, 123, 138, 112, 138, 123, 139, 480],
    "ΣΑΣ.": [139, 225, 138, 109, 139, 480, 269],
    "όσος ΑΓΡΌΣ": [139, 234, 139, 225, 138, 123, 139, 480, 138, 109, 138, 111, 139, 223, 139, 234, 139, 480],
    "ΑΣ1": [138, 109, 139, 480, 272],
    "Σ": [139, 481],
    "&amp": [261, 6259],
    "&amp;": [261],
    "&lt;": [283],
    "&#39": [5, 258, 274, 280],
    "&#39;": [262],
    "<&amp>": [27, 261, 6259, 285],
    "&lt;3": [283, 274],
    "a &amp b": [320, 261, 6259, 321],
    "1 &gt 2": [272, 261, 4725, 273],
    "x&amp;amp;y": [343, 261, 344],
    "&quot;hi&quot;": [257, 1883, 257],
    "<|endoftext|>&amp;": [EOS_ID, 261],
    "<|ENDOFTEXT|>": [EOS_ID],
    "a <|endoftext|> b": [320, EOS_ID, 321],
    "\U0001f431 \U0001f469\u200d\U0001f680 \u2764\ufe0f": [22979, 26304, 13542, 1752],
    "日本語 東京タワー 한국어": [
        39121,
        44353,
        34002,
        508,
        48338,
        21078,
        105,
        34941,
        2429,
        107,
        30391,
        15197,
        250,
        31871,
        255,
        31625,
        368,
    ],
    "café naïve Ünïcödé e\u0301": [15304, 1097, 35689, 563, 6522, 77, 35689, 66, 7255, 67, 4166, 4166],
    "İstanbul ẞ": [328, 16384, 11231, 127, 509],
    "a  b   c": [320, 321, 322],
    "new\nline\r\n\ttab": [686, 1148, 14724],
    "  lead and trail  ": [2784, 537, 4921],
    "\u00a0nbsp\u3000ideo": [6459, 4393, 1909, 334],
    "“curly” ‘single’ I’m": [257, 20795, 257, 568, 17005, 262, 328, 880],
    "ﬁne ｆｕｌｌ ﾊﾝｶｸ": [3797, 1476, 2429, 237, 17671, 37367, 3909, 363],
    "â€œmojibakeâ€\x9d": [257, 617, 3252, 11878, 257],
    "(masterpiece:1.2), <lora:x:0.8>": [
        263,
        12066,
        281,
        272,
        269,
        273,
        2361,
        283,
        2179,
        320,
        281,
        343,
        281,
        271,
        269,
        279,
        285,
    ],
}


def test_tricky_strings_match_the_transformers_slow_tokenizer(tok):
    texts = list(TRICKY_IDS)
    wrong = {
        t: ids
        for t, ids in zip(texts, tok(texts, add_special_tokens=False).input_ids)
        if ids != TRICKY_IDS[t]
    }
    assert not wrong, f"{len(wrong)} differ: {wrong}"
    for text, expected in TRICKY_IDS.items():  # one prompt, with BOS/EOS, and tokenize() agree
        assert tok(text).input_ids == [BOS_ID, *expected, EOS_ID], text
        assert tok.convert_tokens_to_ids(tok.tokenize(text)) == expected, text


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


def test_matches_a_separate_clip_bpe_on_random_prompts(tok, simple_tokenizer):
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


def test_vocab_files_are_what_the_tool_derives(open_clip_dir):
    tool = _load_by_path("_make_clip_tokenizer", ROOT / "tools" / "make_clip_tokenizer.py")
    vocab_json, merges_txt = tool.derive(open_clip_dir / "bpe_simple_vocab_16e6.txt.gz")
    assert (TOKENIZER_DIR / "vocab.json").read_text(encoding="utf-8") == vocab_json
    assert (TOKENIZER_DIR / "merges.txt").read_text(encoding="utf-8") == merges_txt
