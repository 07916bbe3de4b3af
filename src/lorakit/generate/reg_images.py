"""Regularization images: the base model draws the class prompt alone (`bear`), into `reg/1_bear`.

Image i always uses seed + i, so a run that stopped half way and is started again draws the
missing images exactly as an uninterrupted run would have. An image drawn with other settings
(another model, size, sampler...) is redrawn, never kept.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..errors import ConfigError, DatasetError
from .params import MAX_SEED, GenerationParams
from .pipeline import Generator
from .progress import DrawProgress

log = logging.getLogger("lorakit")


def class_prompt_from_folder(folder: str | Path) -> str:
    """'train/20_usu bear' -> 'bear': the folder prompt without its first word, the instance token."""
    from ..dataset.folders import parse_folder_name

    parsed = parse_folder_name(Path(folder).name)
    if parsed is None:
        raise DatasetError(f"{folder}: not a '<repeats>_<prompt>' folder such as '20_usu bear'")
    words = parsed[1].split()
    if len(words) < 2:
        raise DatasetError(
            f"{folder}: the prompt {parsed[1]!r} has no class word after the instance token "
            "(expected e.g. '20_usu bear'); give --class-prompt instead"
        )
    return " ".join(words[1:])


def reg_folder(out: str | Path, class_prompt: str) -> Path:
    """`out` itself when it is named like `1_bear`, else `out/1_<class prompt>`."""
    from ..dataset.folders import parse_folder_name

    out = Path(out)
    return out if parse_folder_name(out.name) else out / f"1_{class_prompt}"


def image_path(folder: Path, class_prompt: str, index: int) -> Path:
    stem = "_".join(class_prompt.split()) or "reg"
    return folder / f"{stem}_{index:05d}.png"


def _settings(infotext: str | None) -> dict[str, str] | None:
    """What decides the picture, from an A1111 infotext: prompt, negative prompt and every parameter
    but the program version."""
    from .pnginfo import parse_parameters

    if not infotext:
        return None
    prompt, negative, params = parse_parameters(infotext)
    params.pop("Version", None)
    return {"Prompt": prompt, "Negative prompt": negative, **params}


def _existing_settings(path: Path) -> dict[str, str] | None:
    """The settings an existing image was drawn with; None if it is missing, broken or unlabelled."""
    from PIL import Image

    from .pnginfo import read_png_parameters

    if not path.is_file():
        return None
    try:
        with Image.open(path) as im:
            im.verify()
        return _settings(read_png_parameters(path))
    except Exception:
        return None


def _difference(old: dict[str, str], new: dict[str, str]) -> str:
    keys = [k for k in dict.fromkeys([*new, *old]) if old.get(k) != new.get(k)]
    return ", ".join(f"{k} {old.get(k, '-')} -> {new.get(k, '-')}" for k in keys[:3])


def make_reg_images(
    generator: Generator,
    class_prompt: str,
    count: int,
    out: str | Path,
    params: GenerationParams | None = None,
    on_progress: Callable[[int, int], None] | None = None,
    show_progress: bool = False,
) -> list[Path]:
    """Draw `count` images of `class_prompt`; existing good files are kept (resume)."""
    from .pnginfo import save_png_with_parameters

    if not class_prompt.strip():
        raise ConfigError("the class prompt is empty: give the class word, e.g. --class-prompt bear")
    if count < 1:
        raise ConfigError("--count must be at least 1")
    params = params or GenerationParams()
    seed = params.seed if params.seed != -1 else 0  # fixed, so that resuming continues the same series
    if seed + count - 1 > MAX_SEED:  # image i draws with seed + i: the last one must be a seed too
        raise ConfigError(
            f"seed {seed} with --count {count}: the last image's seed {seed + count - 1} is above "
            f"{MAX_SEED}; choose a seed of at most {MAX_SEED - count + 1}"
        )
    folder = reg_folder(out, class_prompt)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [image_path(folder, class_prompt, i) for i in range(count)]
    per_image = [
        replace(params, prompt=class_prompt, seed=seed + i, batch_size=1, batch_count=1) for i in range(count)
    ]
    # an image is kept only if it was drawn with exactly these settings (model, prompt, size, sampler,
    # steps, CFG, seed...): a resumed run then equals an uninterrupted one
    missing, changed = [], []
    for i, path in enumerate(paths):
        old = _existing_settings(path)
        new = _settings(generator.infotext(per_image[i], seed + i, [], 0))
        if old != new:
            missing.append(i)
            if old is not None:
                changed.append((path, _difference(old, new)))
    if changed:
        log.warning(
            "redrawing %d image(s) in %s made with other settings (first: %s: %s)",
            len(changed),
            folder,
            changed[0][0].name,
            changed[0][1],
        )
    if len(missing) < count:
        log.info(
            "%d of %d images already in %s with these settings; drawing the other %d",
            count - len(missing),
            count,
            folder,
            len(missing),
        )
    done = count - len(missing)
    bar = (
        DrawProgress(len(missing), params.steps, "regularization image")
        if show_progress and missing
        else None
    )
    for n, i in enumerate(
        missing
    ):  # one image per seed, so which images are missing never changes the others
        on_step = (lambda _b, d, t, n=n: bar.step(n, d, t)) if bar else None
        item = generator.generate(per_image[i], on_step=on_step)[0]
        save_png_with_parameters(item.image, paths[i], item.infotext)
        done += 1
        if on_progress:
            on_progress(done, count)
    if bar:
        bar.close()
    return paths
