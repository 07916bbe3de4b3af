"""`lorakit merge`: kohya's merge_lora.py / sdxl_merge_lora.py. With --sd_model the LoRAs are baked
into the base checkpoint (network/bake.py); without it they are merged into one LoRA (network/combine.py)."""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

from ..errors import ConfigError

log = logging.getLogger("lorakit")

PRECISIONS = ("float", "fp16", "bf16")


def cmd_merge(args: argparse.Namespace) -> int:
    save_to = Path(args.save_to).expanduser()
    if args.sd_model:
        for flag in ("concat", "new_rank", "new_conv_rank"):
            if getattr(args, flag) not in (None, False):
                raise ConfigError(
                    f"--{flag} is for merging LoRAs into one LoRA (without --sd_model); a LoRA baked "
                    "into a checkpoint has no rank"
                )
        from ..network.bake import bake_loras, size_text

        result = bake_loras(
            args.sd_model,
            args.models,
            args.ratios,
            save_to,
            save_precision=args.save_precision,
            precision=args.precision,
            no_metadata=args.no_metadata,
            overwrite=args.overwrite,
        )
        print(
            f"{result.path}: {result.modules} modules merged, {size_text(result.size)}, {result.seconds:.1f} s"
        )
        return 0
    return _merge_into_lora(args, save_to)


def _merge_into_lora(args: argparse.Namespace, save_to: Path) -> int:
    from ..network.bake import model_title, ratios_for
    from ..network.combine import merge_loras
    from ..network.file import read_lora_file, save_lora_file

    if save_to.suffix.lower() != ".safetensors":
        raise ConfigError(f"--save_to {save_to}: a LoRA is written as .safetensors; name it *.safetensors")
    if save_to.exists() and not args.overwrite:
        raise ConfigError(f"--save_to {save_to} already exists; pass --overwrite to replace it")
    if args.precision != "float":
        log.warning(
            "--precision %s: LoRAs are merged in float32 (kohya's recommended default)", args.precision
        )
    started = time.monotonic()
    ratios = ratios_for(args.models, args.ratios)
    paths = [Path(p).expanduser() for p in args.models]
    loras = [read_lora_file(p) for p in paths]
    if any(p.resolve() == save_to.resolve() for p in paths if save_to.exists()):
        raise ConfigError(
            f"--save_to {save_to} is one of the --models: write the merged LoRA under another name"
        )
    tensors, metadata = merge_loras(loras, ratios, args.concat, args.new_rank, args.new_conv_rank)
    if args.no_metadata:  # kohya keeps its minimum ss_* keys, drops the model spec
        metadata = {k: v for k, v in metadata.items() if not k.startswith("modelspec.")}
    else:
        metadata = {
            **metadata,
            "modelspec.title": save_to.stem,
            "modelspec.merged_from": ", ".join(model_title(p, md) for p, (_, md) in zip(paths, loras)),
        }
    save_lora_file(save_to, tensors, metadata, precision=args.save_precision or "float")
    size = save_to.stat().st_size
    names = {k.split(".", 1)[0] for k in tensors}
    print(f"{save_to}: {len(names)} modules, {size / 1e6:.1f} MB, {time.monotonic() - started:.1f} s")
    return 0


def add_parsers(sub) -> None:
    m = sub.add_parser(
        "merge",
        allow_abbrev=False,
        help="bake LoRAs into a checkpoint (--sd_model), or merge LoRAs into one LoRA (kohya merge_lora.py)",
    )
    m.add_argument(
        "--sd_model",
        help="base model to bake the LoRAs into: SD1.x/SDXL .safetensors/.ckpt (written as .safetensors with "
        "the same keys) or a diffusers folder (written as a diffusers folder); omit to merge LoRAs into one LoRA",
    )
    m.add_argument("--models", nargs="+", required=True, metavar="LORA", help="LoRA .safetensors files")
    m.add_argument(
        "--ratios", nargs="+", type=float, metavar="R", help="one ratio per model (default: 1.0 each)"
    )
    m.add_argument(
        "--save_to", required=True, help="output: a .safetensors file (a folder for a diffusers base)"
    )
    m.add_argument(
        "--save_precision",
        choices=PRECISIONS,
        default=None,
        help="cast the saved weights (default: a checkpoint keeps each tensor's dtype; a LoRA is saved as float)",
    )
    m.add_argument(
        "--precision",
        choices=PRECISIONS,
        default="float",
        help="arithmetic precision of the merge (default float, as kohya recommends)",
    )
    m.add_argument(
        "--concat", action="store_true", help="LoRA+LoRA: concatenate the ranks (exact; rank = sum)"
    )
    m.add_argument("--new_rank", type=int, default=None, help="LoRA+LoRA: re-factor to this rank by SVD")
    m.add_argument(
        "--new_conv_rank", type=int, default=None, help="LoRA+LoRA: rank of 3x3 convs (default: new_rank)"
    )
    m.add_argument(
        "--no_metadata", action="store_true", help="do not add model spec metadata (title, merged_from)"
    )
    m.add_argument("--overwrite", action="store_true", help="replace --save_to if it exists")
    m.set_defaults(func=cmd_merge, known=lambda: _known(m))


def _known(p: argparse.ArgumentParser) -> list[str]:
    return [s[2:] for a in p._actions for s in a.option_strings if s.startswith("--")]
