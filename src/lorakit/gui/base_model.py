"""What the Train tab's fields take from the base model: its family (SD1.x, SDXL, v-prediction ...)
and the defaults that follow from it, switched only where the user has not changed them.

"Not changed" is judged without watching keystrokes: a field still holds the value that the previous
model's defaults put there (`applied`), so the next model may replace it; any other value is the
user's (typed, loaded from a config, or from a preset) and is kept.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ..config import TrainConfig, resolution_of
from ..errors import ConfigError

# The Train tab's fields that follow the base model, in the order the note names them.
AUTO_FIELDS = (
    "resolution", "learning_rate", "max_bucket_reso", "no_half_vae", "v_parameterization", "zero_terminal_snr",
)  # fmt: skip
TRAINABLE = ("sd1", "sdxl")


def plain_defaults() -> dict:
    """The AUTO_FIELDS of a config with no model: TrainConfig's own (kohya's) defaults."""
    flat = TrainConfig().flat()
    return {name: flat[name] for name in AUTO_FIELDS}


def refusal(family) -> str | None:
    """Why lorakit cannot train on a base of this family (shown before training starts), else None."""
    from ..models.families.detect import unsupported_message

    if family is None or family.key == "unknown":
        return None  # unread or unrecognised: the loader says what is wrong when training starts
    if family.inpainting or family.key == "instruct_pix2pix":
        return (
            f"{family.label}: not supported — its UNet takes extra input channels (mask / image). "
            "lorakit trains text-to-image SD1.x and SDXL bases."
        )
    if family.key not in TRAINABLE or family.edm:
        return unsupported_message(family)
    return None


def auto_defaults(d, mixed_precision: str) -> dict:
    """The AUTO_FIELDS for base-model defaults `d` (lorakit.models.defaults.ModelDefaults, or None when
    there is no readable model) under `mixed_precision`."""
    values = plain_defaults()
    if d is None:
        return values
    family = d.family
    values.update(resolution="{},{}".format(*d.resolution), learning_rate=d.learning_rate)
    if family is not None and family.key == "sdxl":
        values["max_bucket_reso"] = max(2048, values["max_bucket_reso"])  # kohya's 1024 caps SDXL buckets
        values["no_half_vae"] = mixed_precision == "fp16"  # SDXL's own VAE makes NaNs in fp16
    if family is not None:
        values.update(v_parameterization=family.v_pred, zero_terminal_snr=family.zero_terminal_snr)
    return values


def same(name: str, a, b) -> bool:
    """Whether two values of field `name` are equal as the config reads them ('1024' == '1024,1024')."""
    if name == "resolution":
        try:
            return resolution_of(str(a).strip()) == resolution_of(str(b).strip())
        except ConfigError:
            return False
    if isinstance(a, bool) or isinstance(b, bool):
        return bool(a) == bool(b)
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9)
    except (TypeError, ValueError):
        return a == b


@dataclass
class Switch:
    """What picking a model (or a mixed precision) does to the fields."""

    updates: dict = field(default_factory=dict)  # field -> new value (only fields that change)
    kept: dict = field(default_factory=dict)  # field -> the user's value, left where the default moved
    applied: dict = field(default_factory=dict)  # the defaults now in force (the next `old`)


def switch_defaults(old: dict, new: dict, current: dict) -> Switch:
    """Move each field that still holds its `old` default to its `new` one; keep the user's values."""
    out = Switch(applied=dict(new))
    for name, value in new.items():
        now = current.get(name)
        if same(name, now, value):
            continue
        if name not in old or same(name, now, old[name]):
            out.updates[name] = value
        else:
            out.kept[name] = now
    return out


def _on(value) -> str:
    return "on" if value else "off"


def _reason(name: str, value, d) -> str:
    family = d.family
    key = family.key if family is not None else "sd1"
    if name == "resolution":
        return d.source
    if name == "learning_rate":
        return d.learning_rate_source
    if name == "max_bucket_reso":
        return "SDXL images bucket up to 2048" if value >= 2048 else "kohya's default"
    if name == "no_half_vae":
        if value:
            return "SDXL's VAE overflows in fp16; with the fp16-fix VAE in `vae` you may turn it off"
        return "not needed outside fp16" if key == "sdxl" else "kohya's default"
    marker = {"v_parameterization": "v_pred", "zero_terminal_snr": "ztsnr"}[name]
    return f"its `{marker}` marker key" if value else f"no `{marker}` marker key"


def _shown(name: str, value) -> str:
    if isinstance(value, bool):
        return _on(value)
    if name == "learning_rate":
        return f"{float(value):g}"
    return str(value)


def family_line(d) -> str:
    """'Family: **SDXL base (v-prediction)**' (or its refusal, or that it could not be told)."""
    family = d.family if d is not None else None
    if family is None or family.key == "unknown":
        return "Family: not recognised from its keys (checked when training starts)."
    why = refusal(family)
    if why:
        return f"✗ **{why}** Pick an SD1.x or SDXL model to train."
    return f"Family: **{family.label}**."


def changes_note(switch: Switch, d) -> str:
    """The lines saying which fields moved, and why, and which kept the user's value."""
    lines = []
    if switch.updates:
        items = [
            f"{name} **{_shown(name, switch.updates[name])}** ({_reason(name, switch.updates[name], d)})"
            for name in AUTO_FIELDS
            if name in switch.updates
        ]
        lines.append("Set for this model: " + "; ".join(items) + ".")
    if switch.kept:
        items = [
            f"{name} {_shown(name, switch.kept[name])} (its default here: {_shown(name, switch.applied[name])})"
            for name in AUTO_FIELDS
            if name in switch.kept
        ]
        lines.append("Kept as you set them: " + "; ".join(items) + ".")
    return "\n\n".join(lines)


def check_trainable(model_path: str, d, sample_prompts: str) -> None:
    """Before a run starts from the GUI: a base of a family lorakit refuses stops here with the reason
    instead of failing in the job (sample prompts are drawn for every family it trains)."""
    del sample_prompts
    family = d.family if d is not None else None
    why = refusal(family)
    if why:
        raise ConfigError(f"pretrained_model_name_or_path {model_path}: {why}")
