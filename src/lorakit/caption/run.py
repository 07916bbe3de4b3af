"""Caption a folder of images (flat, or a kohya train_data_dir with `<repeats>_<prompt>` folders):
`<stem><caption_extension>` beside each image, written atomically, never over an existing caption
unless asked."""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..atomic import atomic_path
from ..dataset.folders import IMAGE_EXTENSIONS
from ..errors import DatasetError, ModelError
from . import wd14

log = logging.getLogger("lorakit")


@dataclass
class CaptionReport:
    kind: str  # "tags" (WD14) or "text" (a sentence per image)
    written: list[Path] = field(default_factory=list)
    skipped: list[Path] = field(default_factory=list)  # a caption was there already (no --overwrite)
    broken: list[tuple[Path, str]] = field(default_factory=list)  # unreadable images, with why
    empty: list[Path] = field(default_factory=list)  # nothing crossed the thresholds: no file written
    tag_frequency: Counter = field(default_factory=Counter)
    notes: list[str] = field(default_factory=list)


def load_captioner(folder: str | Path, tag_options=None, text_options=None, device: str | None = None):
    """A WD14 tagger for a folder with model.onnx / selected_tags.csv, else a transformers
    image-to-text model for a folder with config.json."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelError(
            f"captioning model folder {folder} does not exist. Put a WD14 tagger there ({wd14.MODEL_FILE} and "
            f"{wd14.TAGS_FILE}, e.g. from {wd14.EXAMPLE_REPO}) or a transformers image-to-text model saved "
            "with save_pretrained (config.json, weights, processor files, e.g. a BLIP model); nothing is "
            "downloaded for you"
        )
    if (folder / wd14.MODEL_FILE).is_file() or (folder / wd14.TAGS_FILE).is_file():
        return wd14.WD14Tagger(folder, tag_options, device)
    if (folder / "config.json").is_file():
        from .natural import TextCaptioner

        return TextCaptioner(folder, text_options, device)
    raise ModelError(
        wd14.missing_files_message(folder, [wd14.MODEL_FILE, wd14.TAGS_FILE])
        + " For natural-language captions, save a transformers image-to-text model there instead "
        "(config.json, weights and processor files, as save_pretrained writes them)."
    )


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    found = []
    for p in sorted(folder.iterdir()):
        if p.name.startswith("."):  # hidden files, and lorakit's own temp files
            continue
        if p.is_dir() and recursive:
            found += _images_in(p, True)
        elif p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS:
            found.append(p)
    return found


def find_images(folder: str | Path, recursive: bool = False, notes: list[str] | None = None) -> list[Path]:
    """The images in `folder` (and below, with recursive). A folder holding only subfolders, as a
    kohya train_data_dir does, is searched recursively anyway (said in `notes`)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DatasetError(f"image folder {folder} does not exist")
    images = _images_in(folder, recursive)
    if not images and not recursive:
        images = _images_in(folder, True)
        if images and notes is not None:
            notes.append(f"no images directly in {folder}: captioned those in its subfolders")
    return images


def caption_extension_of(text: str) -> str:
    ext = (text or ".txt").strip()
    ext = ext if ext.startswith(".") else "." + ext
    if ext.lower() in IMAGE_EXTENSIONS or ext in (".", "") or any(c in ext for c in "/\\"):
        raise DatasetError(
            f"caption_extension {text!r}: give a caption file extension such as .txt or .caption"
        )
    return ext


def caption_folder(
    folder: str | Path,
    captioner: Callable[[list[Image.Image]], list[list[str]]],
    caption_extension: str = ".txt",
    overwrite: bool = False,
    always_first_tags: Sequence[str] = (),
    caption_separator: str = ", ",
    recursive: bool = False,
    batch_size: int = 1,
    on_progress: Callable[[int, int], None] | None = None,
    images: Sequence[Path] | None = None,
) -> CaptionReport:
    """Caption every image of `folder` with `captioner` (images -> the parts of each caption).

    always_first_tags (a trigger word) start every caption, so that keep_tokens can hold them in
    place; unlike kohya's tagger they are added even when the model did not find them. `images`:
    these (found in `folder` and checked by the caller) instead of all that find_images lists."""
    ext = caption_extension_of(caption_extension)
    report = CaptionReport(kind=getattr(captioner, "kind", "tags"))
    images = list(images) if images is not None else find_images(folder, recursive, report.notes)
    if not images:
        raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {folder}")
    first = [t.strip() for t in always_first_tags if t.strip()]
    todo = []
    for p in images:
        if p.with_name(p.stem + ext).exists() and not overwrite:
            report.skipped.append(p)
        else:
            todo.append(p)
    batch_size = max(1, int(batch_size))
    for start in range(0, len(todo), batch_size):
        loaded, pictures = [], []
        for p in todo[start : start + batch_size]:
            try:
                with Image.open(p) as im:
                    im.load()
                    pictures.append(im.copy() if im.mode != "P" else im.convert("RGBA"))
                loaded.append(p)
            except Exception as e:  # PIL raises many kinds for a broken file: name it and go on
                report.broken.append((p, f"{type(e).__name__}: {e}"))
                log.warning("skipped %s: cannot read the image (%s)", p, e)
        parts_of = captioner(pictures) if pictures else []
        for p, parts in zip(loaded, parts_of):
            if report.kind == "tags":
                report.tag_frequency.update(parts)
            parts = first + [t for t in parts if t and t not in first]
            if not parts:  # an empty caption file would stop training: leave the folder prompt
                report.empty.append(p)
                continue
            with atomic_path(p.with_name(p.stem + ext)) as tmp:
                tmp.write_text(caption_separator.join(parts) + "\n", encoding="utf-8")
            report.written.append(p)
        if on_progress:
            on_progress(min(start + batch_size, len(todo)), len(todo))
    return report


def summary_lines(report: CaptionReport, caption_extension: str, always_first: int = 0, top: int = 40):
    """What happened, with the tag frequencies (most frequent first) and what to set for training."""
    ext = caption_extension_of(caption_extension)
    lines = list(report.notes)
    lines.append(f"wrote {len(report.written)} caption file(s) ({ext})")
    if report.skipped:
        lines.append(
            f"skipped {len(report.skipped)} image(s) that already have a {ext} caption (--overwrite replaces them)"
        )
    for p, why in report.broken:
        lines.append(f"skipped broken image {p}: {why}")
    if report.empty:
        lines.append(
            f"{len(report.empty)} image(s) got no tag above the thresholds, so no file: training uses "
            "their folder prompt (lower --thresh to tag them)"
        )
    if report.tag_frequency:
        lines.append("tag frequencies:")
        for tag, n in report.tag_frequency.most_common(top):
            lines.append(f"  {n:5d}  {tag}")
        if len(report.tag_frequency) > top:
            lines.append(f"  ... and {len(report.tag_frequency) - top} more tags")
    if report.written:
        hint = f'train with caption_extension = "{ext}"'
        if always_first:
            hint += (
                f" (and keep_tokens = {always_first} to keep the first tags in place with shuffle_caption)"
            )
        lines.append(hint)
    return lines
