"""Small helpers shared by the tabs: settings, user-facing errors, thumbnails."""

from __future__ import annotations

import functools
import logging
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from ..errors import ConfigError, LoraKitError

log = logging.getLogger("lorakit")


@dataclass
class Settings:
    """What `lorakit gui` was started with."""

    model: str = ""  # default base model for training and drawing
    lora_dir: Path = Path("models/Lora")  # the LoRA gallery; Train saves here by default
    runs_dir: Path = Path("runs")  # one folder per training job (lorakit.train.job)
    outputs_dir: Path = Path("outputs/txt2img-images")  # generated images
    config_dir: Path = Path(".")  # Save/Load config reads and writes <config_dir>/<name>.toml only
    data_dirs: tuple[Path, ...] = ()  # dataset folders allowed besides the working folder
    model_dirs: tuple[Path, ...] = ()  # folders of base models allowed besides the defaults (model_roots)

    def data_roots(self) -> list[Path]:
        """Where the GUI may read datasets and write captions and reg images."""
        return [Path.cwd(), *self.data_dirs]

    def output_roots(self) -> list[Path]:
        """Where training started from the GUI may write (LoRAs, samples, states, logs)."""
        return [*self.data_roots(), self.lora_dir]

    def data_dir(self, path: str, what: str) -> Path:
        """A dataset folder the user typed, resolved, if it lies in data_roots (else ConfigError)."""
        from .guard import inside

        return inside(
            path, self.data_roots(), what, "start `lorakit gui --data_dir FOLDER` to allow another one"
        )

    def model_choices(self) -> list[str]:
        """Base models to pick from: the default, lorakit's two demo models (SD1.x and SDXL family) and
        the .safetensors/.ckpt files and diffusers folders directly in the --model_dir folders."""
        from ..demo import DEMO_MODEL, DEMO_SDXL_MODEL

        found = [self.model, str(DEMO_MODEL), str(DEMO_SDXL_MODEL)]
        for folder in self.model_dirs:
            if Path(folder).is_dir():
                for p in sorted(Path(folder).iterdir()):
                    if (p.is_file() and p.suffix.lower() in MODEL_SUFFIXES) or (
                        p / "model_index.json"
                    ).is_file():
                        found.append(str(p))
        return list(dict.fromkeys(f for f in found if f))

    def model_roots(self) -> list[Path]:
        """Where the GUI may read base models and LoRA weights: --model_dir folders, the default
        model's folder, the shipped demo model's (lorakit's own assets, so that it can always be
        picked), the LoRA folder and the data roots."""
        from ..demo import DEMO_MODEL

        default = [Path(self.model).parent] if self.model else []
        return [*self.model_dirs, *default, DEMO_MODEL.parent, self.lora_dir, *self.data_roots()]

    def model_path(self, text: str, what: str = "base model") -> Path:
        """A model the user typed, resolved, if it lies in model_roots and is a .safetensors/.ckpt file
        or a diffusers folder (else ConfigError): a request never reads, nor probes, any other file."""
        from .guard import inside

        if not (text or "").strip():
            raise ConfigError(f"{what}: give the model file (.safetensors/.ckpt) or diffusers folder")
        path = inside(
            text, self.model_roots(), what, "start `lorakit gui --model_dir FOLDER` to allow another one"
        )
        if path.is_file() and path.suffix.lower() in MODEL_SUFFIXES:
            return path
        if path.is_dir() and (path / "model_index.json").is_file():
            return path
        raise ConfigError(
            f"{what} {text}: no model there; give a .safetensors or .ckpt file, or a diffusers folder "
            "(with model_index.json)"
        )

    def model_folder(self, text: str, what: str) -> Path:
        """A model folder the user typed (a tagger's, a captioning model's), resolved, if it is a folder
        in model_roots (else ConfigError)."""
        from .guard import inside

        if not (text or "").strip():
            raise ConfigError(f"{what}: give the folder")
        path = inside(
            text, self.model_roots(), what, "start `lorakit gui --model_dir FOLDER` to allow another one"
        )
        if not path.is_dir():
            raise ConfigError(f"{what} {text}: no such folder")
        return path

    def known_model(self, text: str) -> str:
        """model_path as text, or "" when it is refused (for the size notes shown while typing)."""
        try:
            return str(self.model_path(text)) if (text or "").strip() else ""
        except ConfigError:
            return ""


MODEL_SUFFIXES = (".safetensors", ".ckpt")


def user_errors(fn):
    """Show a LoraKitError as a red toast with its message (never a traceback)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except LoraKitError as e:
            raise gr.Error(str(e), print_exception=False) from None

    return wrapper


def thumbnail(path: Path, size: int = 256):
    """A small RGB copy of an image, or None when it cannot be read."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.thumbnail((size, size))
            return im.convert("RGB")
    except Exception:
        return None


def placeholder(text: str, size: int = 192):
    """A plain card for a LoRA without a preview image."""
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("RGB", (size, size), (52, 58, 74))
    d = ImageDraw.Draw(img)
    font = ImageFont.load_default(size=size // 8)
    words, lines = text.replace("_", " ").replace("-", " ").split(), [""]
    for w in words:
        if len(lines[-1]) + len(w) > 9:
            lines.append("")
        lines[-1] = (lines[-1] + " " + w).strip()
    step = size // 6
    y = size // 2 - step * len(lines[:5]) // 2
    for line in lines[:5]:
        d.text((size // 12, y), line, fill=(230, 232, 240), font=font)
        y += step
    return img


def is_state_file(path: Path) -> bool:
    """A training state's network file (`<name>-state/network.safetensors`) is not a LoRA to draw with."""
    return (path.parent / "train_state.json").is_file()


def model_defaults_of(model: str):
    """The base model's defaults (lorakit.models.defaults), or None when `model` is no file or folder."""
    from ..models.defaults import model_defaults

    path = Path(model or "")
    # a file, or a diffusers folder (SD's unet/, or any pipeline's model_index.json, which names the
    # family): not any folder met while the path is being typed
    folder = (path / "unet" / "config.json").is_file() or (path / "model_index.json").is_file()
    if not model or not (path.is_file() or folder):
        return None
    return model_defaults(path)


def size_note(model: str, size: tuple[int, int] | None = None, what: str = "") -> str:
    """One line under a model field: the model's native size and where it comes from; a warning when
    `size` is far from it."""
    from ..models.defaults import resolution_warning

    d = model_defaults_of(model)
    if d is None:
        return ""
    text = f"Base model: native size **{d.size_text}** ({d.source}){what}."
    warning = resolution_warning(size, d) if size else None
    return text + (f"\n\n⚠ {warning}." if warning else "")
