"""A1111 "PNG info": the `parameters` text chunk that AUTOMATIC1111 writes and reads back.

Layout (modules/processing.py create_infotext, modules/infotext_utils.py):
    prompt as typed (may span lines)
    Negative prompt: ...            (omitted when empty)
    Steps: 20, Sampler: Euler a, ... (key: value pairs)
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from lorakit.atomic import atomic_file
from lorakit.errors import ModelError
from lorakit.hashing import cached_file_sha256

NEGATIVE = "Negative prompt:"
# A1111's re_param: `key: value` with value either JSON-quoted or up to the next comma
_RE_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_RE_HEX = re.compile(r"[0-9a-fA-F]{12,}")


def quote(value) -> str:
    """A value as written in the params line: JSON-quoted when it would break the `k: v, ` layout."""
    text = str(value)
    if any(c in text for c in ',:"\n'):
        return json.dumps(text, ensure_ascii=False)
    return text


def unquote(text: str) -> str:
    if len(text) < 2 or text[0] != '"' or text[-1] != '"':
        return text
    try:
        return json.loads(text)
    except ValueError:  # A1111 keeps what it cannot decode
        return text


def format_parameters(prompt: str, negative_prompt: str, params: dict) -> str:
    """The infotext A1111 would write; params keep their order, None values are left out."""
    line = ", ".join(f"{k}: {quote(v)}" for k, v in params.items() if v is not None)
    negative = f"\n{NEGATIVE} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()  # A1111 strips the whole text


def parse_parameters(text: str) -> tuple[str, str, dict[str, str]]:
    """(prompt, negative prompt, params) from an infotext, like A1111's parse_generation_parameters.

    Values stay strings; "Size" is kept as "WxH" (A1111 splits it into Size-1/Size-2).
    """
    *lines, last = text.strip().split("\n")
    if len(_RE_PARAM.findall(last)) < 3:  # no params line: everything is prompt
        lines.append(last)
        last = ""
    prompt, negative, in_negative = [], [], False
    for line in lines:
        line = line.strip()
        if line.startswith(NEGATIVE):
            in_negative = True
            line = line[len(NEGATIVE) :].strip()
        (negative if in_negative else prompt).append(line)
    params = {k: unquote(v) for k, v in _RE_PARAM.findall(last)}
    return "\n".join(prompt), "\n".join(negative), params


def save_png_with_parameters(image, path, text: str) -> Path:
    """Save `image` as PNG with a `parameters` text chunk; written to a temp file then renamed into place."""
    from PIL.PngImagePlugin import PngInfo

    path = Path(path)
    info = PngInfo()
    info.add_text("parameters", text)  # PIL writes iTXt instead when the text is not Latin-1
    with atomic_file(path) as f:
        image.save(f, format="PNG", pnginfo=info)
    return path


def read_png_parameters(path) -> str | None:
    """The `parameters` text of an image written by A1111 or lorakit; None when it has none."""
    from PIL import Image

    with Image.open(path) as im:
        text = getattr(im, "text", None)  # PNG: also reads text chunks stored after the image data
        if text is None:
            text = im.info
        value = text.get("parameters")
    return value if isinstance(value, str) else None


def model_hash(path) -> str:
    """A1111 "Model hash": the first 10 hex digits of the sha256 of the whole file."""
    return cached_file_sha256(path)[:10]


def lora_short_hash(addnet_hash: str) -> str:
    """A1111 "Lora hashes" entry: the first 12 hex digits of the addnet hash (kohya's sshs_model_hash)."""
    if not _RE_HEX.fullmatch(addnet_hash or ""):
        raise ModelError(f"LoRA hash {addnet_hash!r} is not a sha256 hex digest.")
    return addnet_hash[:12].lower()
