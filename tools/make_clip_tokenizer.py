"""Derive the CLIP ViT-L/14 tokenizer files (vocab.json, merges.txt) from open_clip's BPE table.

The result is the same vocabulary as openai/clip-vit-large-patch14 on the Hub, built offline.
open_clip is not imported (it needs torchvision); only its data file is read.

    python tools/make_clip_tokenizer.py [OUT_DIR]   # default: src/lorakit/models/tokenizer
"""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from pathlib import Path

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "lorakit" / "models" / "tokenizer"
N_MERGES = 49152 - 256 - 2  # CLIP's vocab: 256 bytes x2 (+</w>), merges, 2 special tokens = 49408


def bpe_table_path() -> Path:
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("open_clip_torch is not installed: pip install --no-deps open_clip_torch")
    return Path(next(iter(spec.submodule_search_locations))) / "bpe_simple_vocab_16e6.txt.gz"


def bytes_to_unicode() -> dict[int, str]:
    # GPT-2/CLIP byte-to-printable-char table (same as open_clip's and transformers').
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


def derive(bpe_path: Path | None = None) -> tuple[str, str]:
    """Return (vocab.json text, merges.txt text)."""
    lines = gzip.open(bpe_path or bpe_table_path()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : N_MERGES + 1]]  # line 0 is a header
    byte_chars = list(bytes_to_unicode().values())
    vocab = byte_chars + [c + "</w>" for c in byte_chars]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]  # HF names for open_clip's <start_of_text>/<end_of_text>
    assert len(vocab) == 49408 and len(set(vocab)) == 49408
    vocab_json = json.dumps({tok: i for i, tok in enumerate(vocab)}, ensure_ascii=False) + "\n"
    merges_txt = "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    return vocab_json, merges_txt


def main(argv: list[str]) -> None:
    out = Path(argv[0]) if argv else DEFAULT_OUT
    out.mkdir(parents=True, exist_ok=True)
    vocab_json, merges_txt = derive()
    (out / "vocab.json").write_text(vocab_json, encoding="utf-8")
    (out / "merges.txt").write_text(merges_txt, encoding="utf-8")
    print(f"wrote {out / 'vocab.json'} and {out / 'merges.txt'}")


if __name__ == "__main__":
    main(sys.argv[1:])
