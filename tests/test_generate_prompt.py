"""A1111 prompt syntax: <lora:...> tags, emphasis, 75-token chunks, weighted encoding."""

from __future__ import annotations

import pytest

from lorakit.errors import ConfigError
from lorakit.generate.prompt import (
    LoraRef,
    encode_pair,
    encode_weighted,
    extract_loras,
    parse_prompt_attention,
    tokenize_weighted,
)

R = 1.1
S = 1 / 1.1


def L(name, te=1.0, unet=None, dyn=None):
    return LoraRef(name, te, te if unet is None else unet, dyn)


# prompt as typed -> (text left after removing tags, LoRAs, emphasis of that text)
CASES = [
    ("usu bear, in a forest <lora:kurokuma:0.8>", "usu bear, in a forest ", [L("kurokuma", 0.8)],
     [("usu bear, in a forest ", 1.0)]),
    ("<lora:kurokuma> a bear", " a bear", [L("kurokuma")], [(" a bear", 1.0)]),
    ("a <lora:x:0.5:1.2> b", "a  b", [L("x", 0.5, 1.2)], [("a  b", 1.0)]),
    ("<lora:x:0.5:1.2:8>", "", [L("x", 0.5, 1.2, 8)], [("", 1.0)]),
    ("<lora:x:te=0.3:unet=0.9>cat", "cat", [L("x", 0.3, 0.9)], [("cat", 1.0)]),
    ("<lora:x:0.7:unet=0.2>", "", [L("x", 0.7, 0.2)], [("", 1.0)]),
    ("<lora:x:unet=0.2>", "", [L("x", 1.0, 0.2)], [("", 1.0)]),
    ("<lora:x:te=0.4>", "", [L("x", 0.4, 0.4)], [("", 1.0)]),
    ("<lora:x:0.5:te=0.9>", "", [L("x", 0.9, 0.9)], [("", 1.0)]),
    ("<lora:x:1:dyn=4>", "", [L("x", 1.0, 1.0, 4)], [("", 1.0)]),
    ("<lora:x:-0.5>", "", [L("x", -0.5)], [("", 1.0)]),
    ("<lora:x:1e-1>", "", [L("x", 0.1)], [("", 1.0)]),
    ("<lora:a:0.5>, <lora:b:0.25:0.75> c", ",  c", [L("a", 0.5), L("b", 0.25, 0.75)], [(",  c", 1.0)]),
    ("<lyco:loha v2:0.6> d", " d", [L("loha v2", 0.6)], [(" d", 1.0)]),
    ("<lora:my style v1.5-final:0.9>", "", [L("my style v1.5-final", 0.9)], [("", 1.0)]),
    ("<lora:anime_v2.1-beta>", "", [L("anime_v2.1-beta")], [("", 1.0)]),
    ("a cat", "a cat", [], [("a cat", 1.0)]),
    ("", "", [], [("", 1.0)]),
    ("((a))", "((a))", [], [("a", R * R)]),
    ("(((a)))", "(((a)))", [], [("a", R**3)]),
    ("[a]", "[a]", [], [("a", S)]),
    ("[[a]]", "[[a]]", [], [("a", S * S)]),
    ("(a:1.5)", "(a:1.5)", [], [("a", 1.5)]),
    ("(a: 1.5 )", "(a: 1.5 )", [], [("a", 1.5)]),
    ("(a:0.5) [b] (c)", "(a:0.5) [b] (c)", [], [("a", 0.5), (" ", 1.0), ("b", S), (" ", 1.0), ("c", R)]),
    ("((a:1.5) b)", "((a:1.5) b)", [], [("a", 1.5 * R), (" b", R)]),
    ("([a] b)", "([a] b)", [], [("a", S * R), (" b", R)]),
    ("a (b (c:2)) d", "a (b (c:2)) d", [], [("a ", 1.0), ("b ", R), ("c", 2 * R), (" d", 1.0)]),
    (r"\(a\)", r"\(a\)", [], [("(a)", 1.0)]),
    (r"\[a\] \\ b", r"\[a\] \\ b", [], [(r"[a] \ b", 1.0)]),
    (r"(\(a\))", r"(\(a\))", [], [("(a)", R)]),
    ("(a", "(a", [], [("a", R)]),
    ("a)", "a)", [], [("a)", 1.0)]),
    ("[a", "[a", [], [("a", S)]),
    ("a] b", "a] b", [], [("a] b", 1.0)]),
    ("a:b", "a:b", [], [("a:b", 1.0)]),
    ("a:1.2)", "a:1.2)", [], [("a:1.2)", 1.0)]),
    ("a BREAK b", "a BREAK b", [], [("a", 1.0), ("BREAK", -1), ("b", 1.0)]),
    ("(a) BREAK (b)", "(a) BREAK (b)", [], [("a", R), ("", 1.0), ("BREAK", -1), ("", 1.0), ("b", R)]),
    ("aBREAK b", "aBREAK b", [], [("aBREAK b", 1.0)]),
    ("1girl, <lora:x:0.8>, (masterpiece:1.2), BREAK smile", "1girl, , (masterpiece:1.2), BREAK smile",
     [L("x", 0.8)], [("1girl, , ", 1.0), ("masterpiece", 1.2), (",", 1.0), ("BREAK", -1), ("smile", 1.0)]),
]  # fmt: skip


@pytest.mark.parametrize("prompt,text,loras,emphasis", CASES, ids=[c[0] or "empty" for c in CASES])
def test_prompt_table(prompt, text, loras, emphasis):
    got_text, got_loras = extract_loras(prompt)
    assert got_text == text
    assert got_loras == loras
    got = parse_prompt_attention(got_text)
    assert [t for t, _ in got] == [t for t, _ in emphasis]
    assert [w for _, w in got] == pytest.approx([w for _, w in emphasis])


@pytest.mark.parametrize(
    "prompt,match",
    [
        ("<lora:x:abc>", "<lora:x:abc>.*not a number"),
        ("<lora:x:inf>", "<lora:x:inf>.*finite"),
        ("<lora:x:nan>", "finite"),
        ("<lora:x:0.5:-inf>", "finite"),
        ("<lora:x:te=abc>", "not a number"),
        ("<lora:x:1:1:big>", "dyn"),
        ("<lora::0.5>", "name is missing"),
        ("<lora:x:foo=1>", "unknown argument 'foo'"),
        ("<hypernet:y:1>", "<hypernet:y:1>.*supports only <lora"),
        ("ok <embedding:z>", "supports only <lora"),
    ],
)
def test_bad_tags(prompt, match):
    with pytest.raises(ConfigError, match=match):
        extract_loras(prompt)


def test_a1111_docstring_example_exact():
    # A1111's own example (prompt_parser.py), float rounding included
    assert parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).") == [
        ("a ", 1.0),
        ("house", 1.5730000000000004),
        (" ", 1.1),
        ("on", 1.0),
        (" a ", 1.1),
        ("hill", 0.55),
        (", sun, ", 1.1),
        ("sky", 1.4641000000000006),
        (".", 1.1),
    ]


def test_bad_emphasis_number():
    with pytest.raises(ConfigError, match="1.2.3"):
        parse_prompt_attention("(a:1.2.3)")


@pytest.fixture(scope="module")
def tok():
    from lorakit.models.tokenizer import load_tokenizer

    return load_tokenizer()


@pytest.fixture(scope="module")
def te():
    import torch
    import transformers

    torch.manual_seed(0)
    cfg = transformers.CLIPTextConfig(
        vocab_size=49408,
        hidden_size=32,
        intermediate_size=37,
        num_attention_heads=4,
        num_hidden_layers=2,
        max_position_embeddings=77,
    )
    model = transformers.CLIPTextModel(cfg).eval()
    # LayerNorm starts at weight 1, bias 0: every token's mean would be 0 and the rescale 0/0
    norm = getattr(model, "text_model", model).final_layer_norm
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
        norm.bias.uniform_(-0.5, 0.5)
    return model


def ids_of(tok, text):
    return tok(text, add_special_tokens=False).input_ids


def check_chunks(tok, chunks, weights):
    for c, w in zip(chunks, weights, strict=True):
        assert len(c) == 77 and len(w) == 77
        assert c[0] == tok.bos_token_id and c[-1] == tok.eos_token_id
        assert w[0] == 1.0 and w[-1] == 1.0


def test_short_prompt_one_chunk(tok):
    chunks, weights = tokenize_weighted(tok, "a (cat:1.5)")
    check_chunks(tok, chunks, weights)
    a, cat = ids_of(tok, "a") + ids_of(tok, "cat")
    assert chunks[0][:4] == [49406, a, cat, 49407] and set(chunks[0][3:]) == {49407}
    assert weights[0][:4] == [1.0, 1.0, 1.5, 1.0] and set(weights[0][3:]) == {1.0}


def test_empty_prompt_is_one_padding_chunk(tok):
    chunks, weights = tokenize_weighted(tok, "")
    assert chunks == [[49406] + [49407] * 76] and weights == [[1.0] * 77]


def test_long_prompt_two_chunks(tok):
    text = " ".join(["cat"] * 80)  # 80 tokens, no comma
    chunks, weights = tokenize_weighted(tok, text)
    check_chunks(tok, chunks, weights)
    cat = ids_of(tok, "cat")[0]
    assert len(chunks) == 2
    assert chunks[0][1:76] == [cat] * 75
    assert chunks[1][1:6] == [cat] * 5 and set(chunks[1][6:]) == {49407}


def test_exactly_75_tokens_one_chunk(tok):
    chunks, _ = tokenize_weighted(tok, " ".join(["cat"] * 75))
    assert len(chunks) == 1


def test_break_starts_new_chunk(tok):
    chunks, weights = tokenize_weighted(tok, "a cat BREAK (a dog)")
    check_chunks(tok, chunks, weights)
    assert len(chunks) == 2
    assert chunks[0][1:3] == ids_of(tok, "a cat") and set(chunks[0][3:]) == {49407}
    assert chunks[1][1:3] == ids_of(tok, "a dog") and weights[1][1:3] == pytest.approx([1.1, 1.1])


def test_comma_backtrack_moves_tail(tok):
    cat, dog, comma = ids_of(tok, "cat")[0], ids_of(tok, "dog")[0], ids_of(tok, ",")[0]
    # 70 cats, a comma at position 70, then 10 dogs: overflow after 4 dogs -> dogs go to chunk 2
    text = " ".join(["cat"] * 70) + ", " + " ".join(["dog"] * 10)
    chunks, weights = tokenize_weighted(tok, text)
    check_chunks(tok, chunks, weights)
    assert len(chunks) == 2
    assert chunks[0][1:72] == [cat] * 70 + [comma] and set(chunks[0][72:]) == {49407}
    assert chunks[1][1:11] == [dog] * 10 and set(chunks[1][11:]) == {49407}


def test_comma_too_far_back_is_not_used(tok):
    cat, dog = ids_of(tok, "cat")[0], ids_of(tok, "dog")[0]
    # comma at 50: 25 tokens back from the end of the chunk, more than 20 -> plain split at 75
    text = " ".join(["cat"] * 50) + ", " + " ".join(["dog"] * 30)
    chunks, _ = tokenize_weighted(tok, text)
    assert len(chunks) == 2
    assert chunks[0][1:51] == [cat] * 50 and chunks[0][52:76] == [dog] * 24
    assert chunks[1][1:7] == [dog] * 6 and chunks[1][7] == 49407


def test_weights_follow_backtracked_tokens(tok):
    text = " ".join(["cat"] * 70) + ", (" + " ".join(["dog"] * 10) + ":1.3)"
    _, weights = tokenize_weighted(tok, text)
    assert weights[1][1:11] == [1.3] * 10 and weights[0][71] == 1.0


def plain(tok, te, text):
    import torch

    from lorakit.models.text import encode_tokens

    ids = tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        return encode_tokens(te, ids.unsqueeze(1))


@pytest.mark.parametrize("clip_skip", [None, 2])
def test_unweighted_equals_plain_encoding(tok, te, clip_skip):
    import torch

    from lorakit.models.text import encode_tokens

    text = "a photo of a bear in a forest"
    ids = tok(text, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    with torch.no_grad():
        expected = encode_tokens(te, ids.unsqueeze(1), clip_skip)
        got = encode_weighted(tok, te, text, clip_skip=clip_skip)
    assert got.shape == (1, 77, 32)
    torch.testing.assert_close(got, expected)


def test_weighting_follows_a1111_math(tok, te):
    import torch

    with torch.no_grad():
        z = plain(tok, te, "a photo of a bear")[0]
        got = encode_weighted(tok, te, "a photo of a (bear:1.5)")[0]
    w = torch.ones(77, 1)
    w[5] = 1.5  # BOS, a, photo, of, a, bear
    expected = z * w
    expected = expected * (z.mean() / expected.mean())
    torch.testing.assert_close(got, expected)
    torch.testing.assert_close(got.mean(), z.mean())


def test_two_chunks_shape(tok, te):
    import torch

    with torch.no_grad():
        z = encode_weighted(tok, te, " ".join(["cat"] * 80))
        first = plain(tok, te, " ".join(["cat"] * 75))
    assert z.shape == (1, 154, 32)
    torch.testing.assert_close(z[:, :77], first)


def test_encode_pair_pads_shorter_with_empty_chunks(tok, te):
    import torch

    with torch.no_grad():
        cond, uncond = encode_pair(tok, te, "cat BREAK dog BREAK bird", "lowres", None)
        empty = plain(tok, te, "")
        neg = plain(tok, te, "lowres")
        c2, u2 = encode_pair(tok, te, "cat", "a BREAK b", None)
    assert cond.shape == uncond.shape == (1, 231, 32)
    torch.testing.assert_close(uncond, torch.cat([neg, empty, empty], dim=1))
    assert c2.shape == u2.shape == (1, 154, 32)
    torch.testing.assert_close(c2[:, 77:], empty)


def test_zero_mean_chunk_is_left_unscaled(tok):
    import torch

    from lorakit.generate import prompt

    class Zero(torch.nn.Module):  # stands in for a text encoder whose outputs average to 0
        device = torch.device("cpu")

        def forward(self, ids, **kwargs):
            z = torch.zeros(ids.shape[0], ids.shape[1], 4)
            z[..., 0], z[..., 1] = 1.0, -1.0
            return (z,)

    z = prompt.encode_weighted(tok, Zero(), "a (b:2)")
    assert torch.isfinite(z).all() and z[0, 2, 0] == 2.0


def test_parser_does_not_import_torch():
    import subprocess
    import sys

    code = "import sys, lorakit.generate.prompt; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
