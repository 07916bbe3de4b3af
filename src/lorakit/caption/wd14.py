"""A WD14-style tagger (SmilingWolf's wd-v1-4-* / wd-*-tagger-v3): `model.onnx` + `selected_tags.csv`.

Preprocessing follows kohya's finetune/tag_images_by_wd14_tagger.py: transparency over white, pad to
a square with white, resize to the model's input size (area-like shrink, Lanczos enlarge), BGR,
float32 0-255, NHWC. Output i is the probability of the CSV's row i.
"""

from __future__ import annotations

import csv
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from ..errors import ModelError

MODEL_FILE = "model.onnx"
TAGS_FILE = "selected_tags.csv"
EXAMPLE_REPO = "SmilingWolf/wd-vit-tagger-v3"
PIP_ONNXRUNTIME = 'pip install "lorakit[caption]" (or: pip install onnxruntime; onnxruntime-gpu for CUDA)'
RATING, GENERAL, CHARACTER = "9", "0", "4"  # selected_tags.csv categories


@dataclass(frozen=True)
class Tag:
    name: str
    category: str


@dataclass
class TagOptions:
    """kohya's tagger flags that choose and name the tags."""

    general_threshold: float = 0.35
    character_threshold: float = 0.35
    undesired_tags: frozenset[str] = field(default_factory=frozenset)
    remove_underscore: bool = False
    use_rating_tags: bool = False  # the most likely rating tag first (kohya --use_rating_tags)
    character_tags_first: bool = False


def missing_files_message(folder: Path, missing: Iterable[str]) -> str:
    return (
        f"WD14 tagger folder {folder}: {', '.join(missing)} not found. Download {EXAMPLE_REPO}'s (or "
        f"another SmilingWolf wd tagger's) {MODEL_FILE} and {TAGS_FILE} into {folder}; nothing is "
        "downloaded for you."
    )


def read_tags(path: Path, remove_underscore: bool = False) -> list[Tag]:
    """The rows of selected_tags.csv (tag_id,name,category,count), in the model's output order."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            rows = list(csv.reader(f))
    except (OSError, UnicodeDecodeError) as e:
        raise ModelError(f"{path}: cannot read it ({e})") from None
    if not rows or [c.strip() for c in rows[0][:3]] != ["tag_id", "name", "category"]:
        raise ModelError(
            f"{path}: not a WD14 tag list; its first line must be tag_id,name,category,count "
            f"(found {','.join(rows[0]) if rows else 'an empty file'})"
        )
    tags = []
    for row in rows[1:]:
        if len(row) < 3:
            continue
        name = row[1]
        if remove_underscore and len(name) > 3:  # kohya: keeps kaomoji such as ^_^ as they are
            name = name.replace("_", " ")
        tags.append(Tag(name, row[2].strip()))
    return tags


def preprocess(image: Image.Image, size: int) -> np.ndarray:
    """One image as the tagger wants it: (size, size, 3) float32 BGR 0-255 on white."""
    if image.mode in ("RGBA", "LA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = Image.new("RGB", rgba.size, (255, 255, 255))
        image.paste(rgba, mask=rgba.split()[3])
    elif image.mode != "RGB":
        image = image.convert("RGB")
    side = max(image.size)
    square = Image.new("RGB", (side, side), (255, 255, 255))
    square.paste(image, ((side - image.width) // 2, (side - image.height) // 2))
    # kohya: cv2's INTER_AREA when shrinking (PIL's BOX is the same averaging), Lanczos when enlarging
    resample = Image.Resampling.BOX if side >= size else Image.Resampling.LANCZOS
    square = square.resize((size, size), resample)
    return np.asarray(square, dtype=np.float32)[:, :, ::-1].copy()  # RGB -> BGR


def _undesired(name: str, undesired: frozenset[str]) -> bool:
    # 'long_hair' and 'long hair' are one tag, whether or not --remove_underscore renamed it
    return bool(undesired) and (
        name in undesired or name.replace("_", " ") in undesired or name.replace(" ", "_") in undesired
    )


def select_tags(probs: np.ndarray, tags: list[Tag], opts: TagOptions) -> list[str]:
    """The tags of one image, most confident first (character tags first if asked)."""
    general, character, rating = [], [], []
    for p, tag in zip(probs.tolist(), tags):
        if _undesired(tag.name, opts.undesired_tags):
            continue
        if tag.category == RATING:
            rating.append((p, tag.name))
        elif tag.category == CHARACTER:
            if p >= opts.character_threshold:
                character.append((p, tag.name))
        elif p >= opts.general_threshold:  # general (0) and any other category
            general.append((p, tag.name))

    def by_confidence(pairs):  # a stable sort: equal scores keep the CSV's order
        return sorted(pairs, key=lambda pair: -pair[0])

    if opts.character_tags_first:
        chosen = by_confidence(character) + by_confidence(general)
    else:
        chosen = by_confidence(general + character)
    names = [name for _, name in chosen]
    if opts.use_rating_tags and rating:
        names.insert(0, by_confidence(rating)[0][1])
    return names


def _onnxruntime():
    try:
        import onnxruntime
    except ImportError:
        raise ModelError(
            f"WD14 tagging needs onnxruntime, which is not installed: {PIP_ONNXRUNTIME}"
        ) from None
    return onnxruntime


class WD14Tagger:
    """Tags images with a tagger folder's model.onnx; CUDA when onnxruntime has it, else CPU."""

    kind = "tags"

    def __init__(self, folder: str | Path, opts: TagOptions | None = None, device: str | None = None):
        folder = Path(folder)
        missing = [n for n in (MODEL_FILE, TAGS_FILE) if not (folder / n).is_file()]
        if missing:
            raise ModelError(missing_files_message(folder, missing))
        ort = _onnxruntime()
        self.opts = opts or TagOptions()
        self.tags = read_tags(folder / TAGS_FILE, self.opts.remove_underscore)
        available = ort.get_available_providers()
        want_cuda = device != "cpu" and "CUDAExecutionProvider" in available
        providers = (["CUDAExecutionProvider"] if want_cuda else []) + ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(folder / MODEL_FILE), providers=providers)
        except Exception as e:  # onnxruntime raises its own classes for a truncated or foreign file
            raise ModelError(f"{folder / MODEL_FILE}: onnxruntime cannot load it ({e})") from None
        inp = self.session.get_inputs()[0]
        self.input_name, shape = inp.name, list(inp.shape)
        if len(shape) != 4 or shape[3] != 3:
            raise ModelError(
                f"{folder / MODEL_FILE}: input {inp.name} has shape {shape}; a WD14 tagger takes NHWC "
                "[batch, size, size, 3] images (SmilingWolf's wd-v1-4 / wd-*-tagger-v3 format)"
            )
        self.size = shape[1] if isinstance(shape[1], int) else 448  # kohya's IMAGE_SIZE
        # some exports fix the batch dimension: run that many at a time
        self.max_batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self.provider = self.session.get_providers()[0]

    def __call__(self, images: list[Image.Image]) -> list[list[str]]:
        out: list[list[str]] = []
        step = self.max_batch or len(images)
        for start in range(0, len(images), step):
            chunk = images[start : start + step]
            batch = np.stack([preprocess(im, self.size) for im in chunk])
            probs = self.session.run(None, {self.input_name: batch})[0]
            if probs.shape[-1] != len(self.tags):
                raise ModelError(
                    f"the tagger gives {probs.shape[-1]} scores but {TAGS_FILE} lists {len(self.tags)} tags: "
                    "use the model.onnx and selected_tags.csv of the same tagger"
                )
            out += [select_tags(p, self.tags, self.opts) for p in probs[: len(chunk)]]
        return out
