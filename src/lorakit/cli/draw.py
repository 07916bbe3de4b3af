"""`lorakit generate`, `lorakit reg-images` and `lorakit inspect`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging

from ..errors import ConfigError

log = logging.getLogger("lorakit")

GENERATION_HELP = {
    "prompt": "prompt, A1111 syntax: (emphasis:1.2), [less], <lora:name:0.8>, BREAK",
    "negative_prompt": "negative prompt",
    "steps": "sampling steps",
    "cfg_scale": "classifier-free guidance scale",
    "width": "image width (multiple of 8; default: the base model's native size: 512 SD1.x, 1024 SDXL)",
    "height": "image height (multiple of 8; default: the base model's native size: 512 SD1.x, 1024 SDXL)",
    "seed": "seed; -1 = random (printed and stored in the PNG)",
    "batch_count": "how many batches to draw",
    "batch_size": "images per batch",
    "sampler": "A1111 sampler name: 'Euler a', 'DPM++ 2M Karras', 'DDIM', 'UniPC' ...",
    "schedule_type": "schedule type (A1111 >= 1.9): Automatic, Karras, Uniform",
    "clip_skip": "CLIP skip (1 = last layer, 2 = skip one, as A1111; SDXL keeps its penultimate layers)",
    "cfg_rescale": "CFG rescale phi, 0 to 1 (reForge/Forge's 'Rescale CFG'; ~0.7 for v-prediction bases)",
    "rng": "where a seed's noise is drawn, as A1111's 'Random number generator source': gpu (A1111's "
    "default; the CPU on a machine without a GPU) or cpu (A1111's 'RNG: CPU', the same image on any device)",
}


def add_generation_flags(p: argparse.ArgumentParser, skip: tuple[str, ...] = ()) -> None:
    from ..generate.params import RNG_SOURCES, GenerationParams  # torch-free, so --help stays instant

    for f in dataclasses.fields(GenerationParams):
        if f.name in skip:
            continue
        kind = {"int": int, "float": float}.get(str(f.type), str)
        help_text = GENERATION_HELP[f.name]
        if "default" not in help_text:  # width/height name theirs: the model's
            help_text += f" (default: {f.default})"
        if f.name == "rng":
            p.add_argument("--rng", type=str.lower, choices=RNG_SOURCES, default=None, help=help_text)
            continue
        p.add_argument(f"--{f.name}", type=kind, default=None, help=help_text)


def add_model_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", required=True, help="base model: SD1.x or SDXL .safetensors/.ckpt, or a diffusers folder"
    )
    p.add_argument(
        "--lora_dir", default="models/Lora", help="folder searched (recursively) for <lora:NAME> files"
    )
    p.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when available)")
    p.add_argument(
        "--channels_last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the UNet's weights in channels_last (NHWC) memory format (default: on for CUDA)",
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="torch.compile the UNet (faster steps; the first image of each size waits for the compile)",
    )
    p.add_argument(
        "--compile_mode",
        choices=("default", "reduce-overhead", "max-autotune"),
        default=None,
        help="torch.compile's mode (implies --compile); reduce-overhead replays each step as a CUDA graph",
    )


def params_from_args(args: argparse.Namespace, base=None):
    from ..generate.params import GenerationParams

    p = base or GenerationParams()
    given = {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(GenerationParams)
        if getattr(args, f.name, None) is not None
    }
    return dataclasses.replace(p, **given)


def size_from_model(args: argparse.Namespace, params, keep_size: bool = False):
    """--width/--height not given: the base model's native size (64 for the demo model, 512 for SD1.x),
    with a line saying so; a warning when the size is far from it. keep_size: the size is the PNG's."""
    from pathlib import Path

    from ..models.defaults import model_defaults, resolution_warning

    if not Path(args.model).exists():
        return params  # Generator.from_path says what is wrong with it
    d = model_defaults(args.model)
    if not keep_size and (args.width is None or args.height is None):
        params.width = args.width or d.resolution[0]
        params.height = args.height or d.resolution[1]
        log.info("size %dx%d, the base model's (%s)", params.width, params.height, d.source)
    warning = resolution_warning((params.width, params.height), d)
    if warning:
        log.warning("size %s", warning)
    return params


def _generator(args: argparse.Namespace):
    from ..generate.pipeline import Generator

    return Generator.from_path(
        args.model,
        args.lora_dir,
        device=args.device,
        channels_last=args.channels_last,
        compile=args.compile or args.compile_mode is not None,
        compile_mode=None if args.compile_mode == "default" else args.compile_mode,
    )


def cmd_generate(args: argparse.Namespace) -> int:
    from ..generate.pnginfo import parse_parameters, read_png_parameters
    from ..generate.txt2img import check_request, params_from_png, run_txt2img

    base = params_from_png(args.from_png) if args.from_png else None
    params = params_from_args(args, base)
    if not params.prompt and not args.from_png:
        raise ConfigError("--prompt is empty: say what to draw (or give --from_png IMAGE)")
    params = size_from_model(args, params, keep_size=bool(args.from_png))
    check_request(params, args.lora_dir)
    gen = _generator(args)
    if args.from_png:
        wanted = parse_parameters(read_png_parameters(args.from_png))[2].get("Model hash")
        if wanted and gen.model_hash() and not gen.model_hash().startswith(wanted):
            log.warning(
                "%s was drawn with model hash %s; this model's is %s",
                args.from_png,
                wanted,
                gen.model_hash()[:10],
            )
    if params.seed == -1:
        import random

        params.seed = random.randint(0, 2**32 - 1)
        print(f"seed: {params.seed}")
    for item in run_txt2img(gen, params, args.outdir, show_progress=True):
        print(item.path)
    return 0


def cmd_reg_images(args: argparse.Namespace) -> int:
    from ..generate.reg_images import class_prompt_from_folder, make_reg_images, reg_folder

    class_prompt = args.class_prompt or (
        class_prompt_from_folder(args.from_train_folder) if args.from_train_folder else None
    )
    if not class_prompt:
        raise ConfigError("give --class_prompt (e.g. bear) or --from_train_folder 'train/20_usu bear'")
    params = size_from_model(args, params_from_args(args))
    params.check()
    gen = _generator(args)
    folder = reg_folder(args.out, class_prompt)
    print(f"drawing {args.count} images of {class_prompt!r} into {folder}")
    make_reg_images(gen, class_prompt, args.count, args.out, params, show_progress=True)
    print(f"regularization images in {folder} (use --reg_data_dir {folder.parent})")
    return 0


def cmd_inspect(args: argparse.Namespace) -> int:
    from ..network.inspect import format_table, inspect_lora

    info = inspect_lora(args.file)
    print(json.dumps(info, indent=1) if args.json else format_table(info))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from ..doctor import format_report, run_checks

    rows = run_checks(args.output_dir)
    print(format_report(rows))
    return 1 if any(not r.ok for r in rows) else 0


def add_parsers(sub) -> None:
    d = sub.add_parser(
        "doctor", allow_abbrev=False, help="check this machine for training, with the fix for each problem"
    )
    d.add_argument("--output_dir", default="output", help="the folder a run will write to (checked for room)")
    d.set_defaults(func=cmd_doctor, known=lambda: ["output_dir"])

    g = sub.add_parser("generate", allow_abbrev=False, help="draw images, A1111 prompt syntax and LoRAs")
    add_model_flags(g)
    add_generation_flags(g)
    g.add_argument("--outdir", default="outputs/txt2img-images", help="folder for the PNGs (with PNG info)")
    g.add_argument(
        "--from_png", "--from-png", metavar="IMAGE", help="redraw an image from the parameters in its PNG"
    )
    g.set_defaults(func=cmd_generate, known=lambda: _known(g))

    r = sub.add_parser(
        "reg-images", allow_abbrev=False, help="draw regularization images of the class prompt"
    )
    add_model_flags(r)
    r.add_argument("--class_prompt", "--class-prompt", help="the class prompt alone, e.g. 'bear'")
    r.add_argument(
        "--from_train_folder", help="read the class word from a folder such as 'train/20_usu bear'"
    )
    r.add_argument("--count", type=int, default=100, help="number of images (about 5x your instance images)")
    r.add_argument(
        "--out", default="reg", help="folder: reg/ gets a '1_<class>' subfolder; or name it '1_bear'"
    )
    add_generation_flags(r, skip=("prompt", "batch_count"))
    r.set_defaults(func=cmd_reg_images, known=lambda: _known(r))

    i = sub.add_parser("inspect", allow_abbrev=False, help="show what a LoRA file is and how it was trained")
    i.add_argument("file", help="a LoRA .safetensors")
    i.add_argument("--json", action="store_true", help="print JSON")
    i.set_defaults(func=cmd_inspect, known=lambda: ["json"])


def _known(p: argparse.ArgumentParser) -> list[str]:
    return [s[2:] for a in p._actions for s in a.option_strings if s.startswith("--")]
