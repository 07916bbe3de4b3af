"""kohya DreamBooth folders: `<train_data_dir>/<repeats>_<prompt>/` -> a checked list of samples.

Everything a user can get wrong about the folders is found here, before any model is loaded:
bad folder names, empty folders, unreadable images, caption files with the wrong extension.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from ..errors import DatasetError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
CAPTION_EXTENSIONS = (".caption", ".txt")
MAX_REPEATS = 10_000  # each repeat is an entry in the epoch's sample list: far more runs out of memory


@dataclass(frozen=True)
class Sample:
    """One image as seen once in an epoch (an image with 10 repeats gives 10 equal Samples)."""

    image: Path
    caption: str
    is_reg: bool
    size: tuple[int, int]  # (width, height) read while checking the image


@dataclass
class DatasetPlan:
    samples: list[Sample]
    num_train_images: int  # Σ repeats × images of the train folders (kohya ss_num_train_images)
    num_reg_images: int  # Σ repeats × images of the reg folders, before balancing (ss_num_reg_images)
    warnings: list[str] = field(default_factory=list)
    dataset_dirs: dict[str, dict[str, int]] = field(default_factory=dict)
    reg_dataset_dirs: dict[str, dict[str, int]] = field(default_factory=dict)
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    # the images that measure the validation loss (one sample each), or None without validation
    validation: DatasetPlan | None = None


@dataclass
class _Folder:
    path: Path
    repeats: int
    prompt: str
    is_reg: bool
    images: list[Path] = field(default_factory=list)
    captions: list[str] = field(default_factory=list)
    sizes: list[tuple[int, int]] = field(default_factory=list)


def scan_dataset(
    train_data_dir: str | os.PathLike,
    reg_data_dir: str | os.PathLike | None = None,
    caption_extension: str = ".caption",
    bad_images: str = "stop",
    validation_split: float = 0.0,
    validation_seed: int = 0,
    validation_data_dir: str | os.PathLike | None = None,
) -> DatasetPlan:
    """Read the train (and reg) folders, check every image, and lay out one epoch of samples.

    validation_split holds out that fraction of the train images (a function of validation_seed);
    validation_data_dir gives the validation images instead. Either lands in `plan.validation`."""
    if bad_images not in ("stop", "skip"):
        raise DatasetError(f"bad_images = {bad_images!r}: use 'stop' or 'skip'")
    if not caption_extension.startswith("."):
        caption_extension = "." + caption_extension  # 'txt' surely means '.txt'
    warnings: list[str] = []
    folders = _list_folders(Path(train_data_dir), "train_data_dir", False, warnings)
    if reg_data_dir:
        folders += _list_folders(Path(reg_data_dir), "reg_data_dir", True, warnings)
    val_folders: list[_Folder] = []
    if validation_data_dir:
        val_folders = _list_folders(Path(validation_data_dir), "validation_data_dir", False, warnings)
        for f in val_folders:
            f.repeats = 1  # each validation image counts once
    folders += val_folders

    for folder in folders:
        folder.images = sorted(
            p for p in folder.path.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()
        )
        if any(p.is_dir() for p in folder.path.iterdir()):
            warnings.append(f"{folder.path}: folders inside it are not searched (kohya does not recurse)")

    _check_images(folders, bad_images, warnings)
    for folder in folders:
        if not folder.images:
            raise DatasetError(
                f"{folder.path}: no usable images (png, jpg, jpeg, webp, bmp). "
                "Add images or remove the folder."
            )
        folder.captions = [read_caption(p, caption_extension, folder.prompt) for p in folder.images]
        if any(c == "" for c in folder.captions):
            warnings.append(
                f"{folder.path}: some images have neither a caption file nor a folder prompt; "
                "they train with an empty caption"
            )
    _warn_other_caption_extension(folders, caption_extension, warnings)
    folders = [f for f in folders if not any(f is v for v in val_folders)]
    if validation_split > 0:
        val_folders = _hold_out(folders, validation_split, validation_seed)
    plan = _plan(folders, warnings)
    if val_folders:
        plan.validation = _plan(val_folders, [])
    return plan


def _hold_out(folders: list[_Folder], fraction: float, seed: int) -> list[_Folder]:
    """Move round(fraction x train images) of the train images (at least one, never all) into
    validation folders of their own; which ones is a function of `seed`. Reg images stay."""
    import random

    train = [(fi, i) for fi, f in enumerate(folders) if not f.is_reg for i in range(len(f.images))]
    if len(train) < 2:
        raise DatasetError(
            f"validation_split = {fraction} needs at least 2 train images (found {len(train)}): add images "
            "or give validation_data_dir instead"
        )
    count = min(max(1, round(fraction * len(train))), len(train) - 1)
    held = set(random.Random(seed).sample(train, count))
    val_folders = []
    for fi, f in enumerate(folders):
        if f.is_reg:
            continue
        keep = [i for i in range(len(f.images)) if (fi, i) not in held]
        out = [i for i in range(len(f.images)) if (fi, i) in held]
        if out:
            val_folders.append(
                _Folder(
                    f.path, 1, f.prompt, False,
                    [f.images[i] for i in out], [f.captions[i] for i in out], [f.sizes[i] for i in out],
                )
            )  # fmt: skip
        f.images, f.captions, f.sizes = (
            [f.images[i] for i in keep], [f.captions[i] for i in keep], [f.sizes[i] for i in keep]
        )  # fmt: skip
    # a train folder left with no image trains nothing: drop it (its images validate)
    folders[:] = [f for f in folders if f.is_reg or f.images]
    return val_folders


def parse_folder_name(name: str) -> tuple[int, str] | None:
    """'20_usu bear' -> (20, 'usu bear'); kohya splits on '_' and rejoins the rest."""
    tokens = name.split("_")
    try:
        repeats = int(tokens[0])
    except ValueError:
        return None
    return repeats, "_".join(tokens[1:])


def _list_folders(root: Path, option: str, is_reg: bool, warnings: list[str]) -> list[_Folder]:
    if not root.exists():
        raise DatasetError(
            f"{option} {root} does not exist: give the folder that holds '<repeats>_<prompt>' folders"
        )
    if not root.is_dir():
        raise DatasetError(
            f"{option} {root} is a file: give the folder that holds '<repeats>_<prompt>' folders"
        )
    example = "1_bear" if is_reg else "20_usu bear"
    entries = sorted(root.iterdir())
    # Hidden folders (.ipynb_checkpoints, .git) are tool litter, not data.
    subdirs = [p for p in entries if p.is_dir() and not p.name.startswith(".")]
    images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    if images and (parse_folder_name(root.name) is not None or not subdirs):
        raise DatasetError(_pointed_at_images(root, option, example, len(images)))
    stray = [p.name for p in entries if p.is_file() and not p.name.startswith(".")]
    if stray:
        shown = ", ".join(stray[:5]) + (", ..." if len(stray) > 5 else "")
        warnings.append(
            f"{root}: {len(stray)} file(s) directly in it are ignored ({shown}); "
            f"images belong in '<repeats>_<prompt>' subfolders, e.g. {root / example}"
        )
    if not subdirs:
        raise DatasetError(
            f"{option} {root} has no subfolders: put the images in a folder named "
            f"'<repeats>_<prompt>' inside it, e.g. {root / example}"
        )
    folders = []
    for d in subdirs:
        parsed = parse_folder_name(d.name)
        if parsed is None:
            raise DatasetError(
                f"{d}: folder names must be <repeats>_<prompt>, e.g. '{example}' "
                f"(rename it to e.g. '10_{d.name}')"
            )
        repeats, prompt = parsed
        if repeats < 1:
            raise DatasetError(f"{d}: repeats must be 1 or more, e.g. '{example}'")
        if repeats > MAX_REPEATS:
            raise DatasetError(
                f"{d}: {repeats} repeats is more than lorakit allows ({MAX_REPEATS}); kohya users use 1 to "
                f"about 100. Rename the folder, e.g. '{example}'"
            )
        folders.append(_Folder(d, repeats, prompt, is_reg))
    return folders


def _pointed_at_images(root: Path, option: str, example: str, n_images: int) -> str:
    """The message for the commonest mistake: the option names the image folder, not its parent."""
    if parse_folder_name(root.name) is not None:
        return (
            f"{option} {root} holds the images itself ({n_images} found): it must be their parent. "
            f"Give the folder that CONTAINS '{root.name}', i.e. {option} = {root.parent}"
        )
    return (
        f"{option} {root} holds the images itself ({n_images} found), with no '<repeats>_<prompt>' folder. "
        f"Move the images into a folder named like '{example}' inside it (e.g. {root / example}) "
        f"and give the folder that CONTAINS '{example}' ({root})"
    )


def _probe(path: Path) -> tuple[int, int] | str:
    """(width, height) of a good image, or why it is bad."""
    try:
        if path.stat().st_size == 0:
            return "empty file (0 bytes)"
        with Image.open(path) as im:
            im.verify()  # checksums/structure; the image is unusable after this
        with Image.open(path) as im:
            im.load()  # full decode: catches truncated files that verify() lets through
            return im.size
    except Exception as e:  # PIL raises many kinds; all mean "cannot train on this"
        return f"{type(e).__name__}: {e}"


def _check_images(folders: list[_Folder], bad_images: str, warnings: list[str]) -> None:
    paths = [p for f in folders for p in f.images]
    # Decoding releases the GIL, so threads help on big folders.
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        results = dict(zip(paths, pool.map(_probe, paths)))
    bad = [(p, r) for p, r in results.items() if isinstance(r, str)]
    if bad and bad_images == "stop":
        lines = "\n".join(f"  {p}: {why}" for p, why in bad)
        raise DatasetError(
            f"{len(bad)} image(s) cannot be read:\n{lines}\n"
            'Fix or delete them, or set bad_images = "skip" to train without them.'
        )
    for p, why in bad:
        warnings.append(f"{p}: skipped, cannot be read ({why})")
    for f in folders:
        f.images = [p for p in f.images if not isinstance(results[p], str)]
        f.sizes = [results[p] for p in f.images]  # type: ignore[misc]


def read_caption(image: Path, ext: str, prompt: str) -> str:
    """kohya's rule: `<stem><ext>` beside the image, first line only; else the folder prompt."""
    path = image.with_name(image.stem + ext)
    if not path.is_file():
        return prompt
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise DatasetError(f"{path}: not UTF-8 text; save the caption file as UTF-8") from None
    if not lines:
        raise DatasetError(
            f"{path}: caption file is empty; write a caption or delete it to use the folder prompt"
        )
    return lines[0].strip()


def _warn_other_caption_extension(folders: list[_Folder], ext: str, warnings: list[str]) -> None:
    images = [p for f in folders for p in f.images]
    other = next((e for e in CAPTION_EXTENSIONS if e != ext.lower()), None)
    if other is None or any(p.with_name(p.stem + ext).is_file() for p in images):
        return
    n_other = sum(p.with_name(p.stem + other).is_file() for p in images)
    if n_other and n_other * 2 >= len(images):
        warnings.append(
            f"no image has a '{ext}' caption file, but {n_other} have '{other}' files, which are ignored; "
            f'set caption_extension = "{other}" to use them'
        )


def balance_reg_repeats(num_train_images: int, reg_repeats: list[int]) -> list[int]:
    """kohya's loop (end of DreamBoothDataset.__init__): the repeats each reg image is used with.

    First pass: images in order with their own repeats until the count reaches N; later passes
    add 1 repeat per image until N. Images never reached get 0 (unused).
    """
    out = [0] * len(reg_repeats)
    if not reg_repeats:
        return out
    n = 0
    first = True
    while n < num_train_images:
        for i, r in enumerate(reg_repeats):
            if first:
                out[i] = r
                n += r
            else:
                out[i] += 1
                n += 1
            if n >= num_train_images:
                break
        first = False
    return out


def _plan(folders: list[_Folder], warnings: list[str]) -> DatasetPlan:
    train = [f for f in folders if not f.is_reg]
    reg = [f for f in folders if f.is_reg]
    num_train = sum(f.repeats * len(f.images) for f in train)
    num_reg = sum(f.repeats * len(f.images) for f in reg)

    samples: list[Sample] = []
    for f in train:
        for img, cap, size in zip(f.images, f.captions, f.sizes):
            samples.extend([Sample(img, cap, False, size)] * f.repeats)

    reg_items = [
        (img, cap, size, f.repeats) for f in reg for img, cap, size in zip(f.images, f.captions, f.sizes)
    ]
    counts = balance_reg_repeats(num_train, [r for *_, r in reg_items])
    for (img, cap, size, _), count in zip(reg_items, counts):
        samples.extend([Sample(img, cap, True, size)] * count)
    unused = counts.count(0)
    if unused:
        warnings.append(
            f"{unused} of {len(reg_items)} regularization images are not used: kohya balances reg samples "
            f"to the {num_train} train samples and always uses the first ones (sorted by folder and name)"
        )

    return DatasetPlan(
        samples=samples,
        num_train_images=num_train,
        num_reg_images=num_reg,
        warnings=warnings,
        dataset_dirs={f.path.name: {"n_repeats": f.repeats, "img_count": len(f.images)} for f in train},
        reg_dataset_dirs={f.path.name: {"n_repeats": f.repeats, "img_count": len(f.images)} for f in reg},
        tag_frequency=_tag_frequency(folders),
    )


def _tag_frequency(folders: Iterable[_Folder]) -> dict[str, dict[str, int]]:
    """kohya's set_tag_frequency: per folder basename, lower-cased tags counted once per image."""
    freq: dict[str, dict[str, int]] = {}
    for f in folders:
        d = freq.setdefault(f.path.name, {})
        for caption in f.captions:
            for tag in caption.split(","):
                tag = tag.strip().lower()
                if tag:
                    d[tag] = d.get(tag, 0) + 1
    return freq
