"""`lorakit convert`: rename a LoRA's keys for another tool (kohya <-> diffusers/PEFT <-> ComfyUI)."""

from __future__ import annotations

import argparse

HELP_TO = (
    "kohya: A1111/Forge/kohya names (input of any dialect), with one alpha and an out_proj in each text "
    "encoder, as diffusers needs to load the file; "
    "peft: diffusers' load_lora_weights format, alpha kept in lora_adapter_metadata; "
    "comfy: the names ComfyUI's own LoRA save node writes"
)


def cmd_convert(args: argparse.Namespace) -> int:
    from ..network.convert import convert_file

    out = convert_file(
        args.model, args.save_to, args.to, overwrite=args.overwrite, precision=args.save_precision
    )
    print(f"wrote {out} ({args.to} names)")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "convert",
        allow_abbrev=False,
        help="rename a LoRA's keys: kohya <-> diffusers/PEFT <-> ComfyUI (SD1.x, SDXL)",
        description="Read a LoRA (kohya, diffusers/PEFT, ComfyUI or ai-toolkit names) and write it with "
        "another tool's key names. What the LoRA does is not changed; metadata is kept. For SD1.x and SDXL "
        "LoRAs made on the standard base architectures.",
    )
    p.add_argument("--model", required=True, help="the LoRA .safetensors to read")
    p.add_argument("--save_to", required=True, help="the .safetensors to write")
    p.add_argument("--to", required=True, choices=("kohya", "peft", "comfy"), help=HELP_TO)
    p.add_argument("--overwrite", action="store_true", help="replace --save_to if it exists")
    p.add_argument(
        "--save_precision",
        choices=("fp16", "bf16", "float"),
        default=None,
        help="dtype of the written tensors (default: the input file's)",
    )
    p.set_defaults(func=cmd_convert, known=lambda: ["model", "save_to", "to", "overwrite", "save_precision"])
