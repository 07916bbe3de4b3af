"""A1111 sampler names -> diffusers schedulers on SD1's training schedule.

A1111 >= 1.9 writes the schedule apart ("Sampler: DPM++ 2M, Schedule type: Karras"); older
versions fold it into the name ("DPM++ 2M Karras"). Both spellings are accepted.
"""

from __future__ import annotations

import difflib

from ..errors import ConfigError

# SD1.x's noise schedule (the same one kohya trains with).
SD_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
}

# name -> (diffusers class name, extra config)
SAMPLERS: dict[str, tuple[str, dict]] = {
    "Euler a": ("EulerAncestralDiscreteScheduler", {}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "LMS": ("LMSDiscreteScheduler", {}),
    "Heun": ("HeunDiscreteScheduler", {}),
    "DPM2": ("KDPM2DiscreteScheduler", {}),
    "DPM2 a": ("KDPM2AncestralDiscreteScheduler", {}),
    "DPM++ 2M": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DPM++ 2M SDE": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "DPM++ SDE": ("DPMSolverSDEScheduler", {}),
    "DPM++ 2S a": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "DDIM": ("DDIMScheduler", {"set_alpha_to_one": False, "clip_sample": False}),
    "PLMS": ("PNDMScheduler", {"skip_prk_steps": True}),
    "UniPC": ("UniPCMultistepScheduler", {}),
}
SCHEDULE_TYPES = ("Automatic", "Karras", "Uniform")
KARRAS_OK = {
    "LMS",
    "Heun",
    "DPM2",
    "DPM2 a",
    "DPM++ 2M",
    "DPM++ 2M SDE",
    "DPM++ SDE",
    "DPM++ 2S a",
    "Euler",
    "UniPC",
}
# kohya's sample_prompts names (--ss), lower case
KOHYA_NAMES = {
    "ddim": "DDIM",
    "pndm": "PLMS",
    "lms": "LMS",
    "k_lms": "LMS",
    "euler": "Euler",
    "k_euler": "Euler",
    "euler_a": "Euler a",
    "k_euler_a": "Euler a",
    "heun": "Heun",
    "k_heun": "Heun",
    "dpm_2": "DPM2",
    "k_dpm_2": "DPM2",
    "dpm_2_a": "DPM2 a",
    "k_dpm_2_a": "DPM2 a",
    "dpmsolver": "DPM++ 2M",
    "dpmsolver++": "DPM++ 2M",
    "dpmsingle": "DPM++ 2S a",
}


def all_names() -> list[str]:
    """Every sampler name accepted, as A1111's dropdown lists them."""
    return list(SAMPLERS) + [f"{n} Karras" for n in SAMPLERS if n in KARRAS_OK]


def split_name(name: str, schedule_type: str | None = None) -> tuple[str, str]:
    """'DPM++ 2M Karras' -> ('DPM++ 2M', 'Karras'); kohya's 'euler_a' -> ('Euler a', 'Automatic')."""
    name = name.strip()
    schedule = schedule_type or "Automatic"
    if name.lower() in KOHYA_NAMES:
        return KOHYA_NAMES[name.lower()], schedule
    if name.endswith(" Karras"):
        name, schedule = name[: -len(" Karras")], "Karras"
    if name not in SAMPLERS:
        close = difflib.get_close_matches(name, all_names(), n=3, cutoff=0.5)
        hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
        raise ConfigError(f"sampler {name!r} is unknown.{hint} Known: {', '.join(all_names())}")
    if schedule not in SCHEDULE_TYPES:
        raise ConfigError(f"schedule type {schedule!r} is unknown; use one of {', '.join(SCHEDULE_TYPES)}")
    if schedule == "Karras" and name not in KARRAS_OK:
        raise ConfigError(f"sampler {name!r} has no Karras schedule")
    return name, schedule


def make_scheduler(name: str, schedule_type: str | None = None, prediction_type: str = "epsilon"):
    """A fresh diffusers scheduler for an A1111 sampler name."""
    import diffusers

    base, schedule = split_name(name, schedule_type)
    cls_name, extra = SAMPLERS[base]
    config = {**SD_SCHEDULE, **extra, "prediction_type": prediction_type}
    if schedule == "Karras":
        config["use_karras_sigmas"] = True
    config["steps_offset"] = 1  # as in SD1.5's own scheduler config (diffusers warns otherwise)
    return getattr(diffusers, cls_name).from_config(config)


def display_name(name: str, schedule_type: str | None = None) -> tuple[str, str | None]:
    """(Sampler, Schedule type) as A1111 >= 1.9 writes them into PNG info."""
    base, schedule = split_name(name, schedule_type)
    return base, (schedule if schedule != "Automatic" else None)
