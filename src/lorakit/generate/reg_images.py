"""Regularization images: the base model draws the class prompt alone (`bear`), into `reg/1_bear`.

Image i always uses seed + i, so a run that stopped half way and is started again draws the
missing images exactly as an uninterrupted run would have.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from ..errors import ConfigError, DatasetError
from .params import GenerationParams
from .pipeline import Generator

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


def _is_readable(path: Path) -> bool:
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.verify()
        return True
    except Exception:
        return False


def make_reg_images(
    generator: Generator,
    class_prompt: str,
    count: int,
    out: str | Path,
    params: GenerationParams | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> list[Path]:
    """Draw `count` images of `class_prompt`; existing good files are kept (resume)."""
    from .pnginfo import save_png_with_parameters

    if not class_prompt.strip():
        raise ConfigError("the class prompt is empty: give the class word, e.g. --class-prompt bear")
    if count < 1:
        raise ConfigError("--count must be at least 1")
    params = params or GenerationParams()
    seed = params.seed if params.seed != -1 else 0  # fixed, so that resuming continues the same series
    folder = reg_folder(out, class_prompt)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [image_path(folder, class_prompt, i) for i in range(count)]
    missing = [i for i, p in enumerate(paths) if not (p.is_file() and _is_readable(p))]
    if len(missing) < count:
        log.info(
            "%d of %d images already in %s; drawing the other %d",
            count - len(missing),
            count,
            folder,
            len(missing),
        )
    done = count - len(missing)
    for i in missing:  # one image per seed, so which images are missing never changes the others
        p = replace(params, prompt=class_prompt, seed=seed + i, batch_size=1, batch_count=1)
        item = generator.generate(p)[0]
        save_png_with_parameters(item.image, paths[i], item.infotext)
        done += 1
        if on_progress:
            on_progress(done, count)
    return paths
