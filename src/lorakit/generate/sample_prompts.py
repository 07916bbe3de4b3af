"""kohya's `sample_prompts` file and the sample images drawn while training.

One prompt per line, `#` comments; options after ` --`: `--n` negative prompt, `--w`/`--h`
size, `--s` steps, `--l` CFG scale, `--d` seed, `--ss` sampler (kohya or A1111 names).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from ..errors import ConfigError
from .params import GenerationParams, ParamError

_FIELD_OF = {"w": "width", "h": "height", "l": "cfg_scale", "d": "seed"}  # options check() may refuse


def parse_line(line: str, defaults: GenerationParams, where: str) -> GenerationParams:
    parts = line.split(" --")
    p = GenerationParams(**{**defaults.__dict__, "prompt": parts[0].strip()})
    given = {}  # field -> its option as written ("--w 100000"), for the messages of check()
    for part in parts[1:]:
        key, _, value = part.strip().partition(" ")
        value = value.strip()
        try:
            if key == "n":
                p.negative_prompt = value
            elif key == "w":
                p.width = max(64, int(value) // 8 * 8)  # kohya floors to /8, at least 64
            elif key == "h":
                p.height = max(64, int(value) // 8 * 8)
            elif key == "s":
                p.steps = min(max(int(value), 1), 1000)  # kohya's clamp
            elif key == "l":
                p.cfg_scale = float(value)
            elif key == "d":
                p.seed = int(value)
            elif key == "ss":
                _check_sampler(value, where)
                p.sampler = value
            else:
                raise ConfigError(f"{where}: unknown option --{key} (use --n --w --h --s --l --d --ss)")
        except ValueError:
            raise ConfigError(f"{where}: --{key} {value!r} is not a number") from None
        if key in _FIELD_OF:
            given[_FIELD_OF[key]] = f"--{key} {value}"
    try:
        p.check("sample images")
    except ParamError as e:  # named by the option that set it, else by its field (a default)
        said = f"{given[e.field]}: {e.reason}" if e.field in given else str(e)
        raise ConfigError(f"{where}: {said}") from None
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None
    return p


def _check_sampler(name: str, where: str) -> None:
    """An unknown --ss name fails while the file is read, not when the first samples are drawn."""
    from .samplers import split_name

    try:
        split_name(name)
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def read_sample_prompts(path: str | Path, defaults: GenerationParams) -> list[GenerationParams]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"sample_prompts: {path} does not exist")
    out = []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            out.append(parse_line(line, defaults, f"{path}:{i}"))
    if not out:
        raise ConfigError(f"sample_prompts: {path} has no prompts (one per line)")
    return out


def sample_name(output_name: str, index: int, epoch: int | None = None, step: int | None = None) -> str:
    """kohya's names: <name>_e000002_00_<time>.png after epochs, <name>_000100_00_<time>.png after steps."""
    tag = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    return f"{output_name}_{tag}_{index:02d}_{time.strftime('%Y%m%d%H%M%S')}.png"


def draw_samples(
    generator, prompts: list[GenerationParams], folder: Path, output_name: str, **when
) -> list[Path]:
    from ..errors import GenerationError
    from .pnginfo import save_png_with_parameters

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, p in enumerate(prompts):
        try:
            item = generator.generate(p)[0]
        except GenerationError as e:  # a NaN sample is reported, not saved, and does not stop training
            logging.getLogger("lorakit").warning("sample %d (%r) not saved: %s", i, p.prompt, e)
            continue
        path = folder / sample_name(output_name, i, **when)
        save_png_with_parameters(item.image, path, item.infotext)
        paths.append(path)
    return paths
