"""`lorakit resize` and `lorakit extract`: kohya's resize_lora.py and extract_lora_from_models.py."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import ModelError

log = logging.getLogger("lorakit")

PRECISIONS = ("float", "fp16", "bf16")


def cmd_resize(args: argparse.Namespace) -> int:
    from ..network.file import size_text
    from ..network.resize import module_lines, resize_lora_file, resize_summary

    result = resize_lora_file(
        args.model, args.save_to, args.new_rank, args.new_conv_rank, args.dynamic_method, args.dynamic_param,
        save_precision=args.save_precision, device=args.device, overwrite=args.overwrite,
    )  # fmt: skip
    if args.verbose:
        print("\n".join(module_lines(result.stats)))
    print(resize_summary(result.stats))
    print(
        f"{Path(args.model).name}: {size_text(result.size_before)} -> {result.path.name}: "
        f"{size_text(result.size)} ({result.precision})"
    )
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from ..network.extract import extract_lora_file, extract_summary
    from ..network.file import check_save_to

    out = check_save_to(args.save_to, args.overwrite)
    for flag, path in (("--model_org", args.model_org), ("--model_tuned", args.model_tuned)):
        if not Path(path).exists():
            raise ModelError(f"{flag} {path} does not exist")
    path, tensors = extract_lora_file(
        args.model_org, args.model_tuned, out, args.dim, args.conv_dim, args.clamp_quantile, args.min_diff,
        args.save_precision, args.load_precision, args.device, True if args.v_parameterization else None,
    )  # fmt: skip
    print(extract_summary(path, tensors, args.dim))
    return 0


def add_parsers(sub) -> None:
    r = sub.add_parser(
        "resize", allow_abbrev=False,
        help="resize a LoRA to a lower rank by SVD (kohya's resize_lora.py)",
    )  # fmt: skip
    r.add_argument("--model", required=True, help="the LoRA to resize (.safetensors)")
    r.add_argument("--save_to", required=True, help="where to write the resized LoRA (.safetensors)")
    r.add_argument(
        "--new_rank",
        type=int,
        default=4,
        help="new rank; with --dynamic_method the highest rank kept (default 4)",
    )
    r.add_argument(
        "--new_conv_rank", type=int, default=None, help="new rank of 3x3 conv modules (default: --new_rank)"
    )
    r.add_argument(
        "--dynamic_method", choices=("sv_ratio", "sv_fro", "sv_cumulative"), default=None,
        help="choose each module's rank from its singular values: sv_ratio keeps those above the largest / "
        "param; sv_fro the fewest that keep param (0-1) of the Frobenius norm; sv_cumulative of their sum",
    )  # fmt: skip
    r.add_argument("--dynamic_param", type=float, default=None, help="the dynamic method's parameter")
    r.add_argument(
        "--save_precision",
        choices=PRECISIONS,
        default=None,
        help="precision of the saved LoRA (default: the input's)",
    )
    r.add_argument("--device", default=None, help="device for the SVD: cpu (default), cuda")
    r.add_argument("--verbose", action="store_true", help="print each module's retained norms")
    r.add_argument("--overwrite", action="store_true", help="replace --save_to if it exists")
    r.set_defaults(func=cmd_resize, known=lambda: _known(r))

    e = sub.add_parser(
        "extract", allow_abbrev=False,
        help="extract a LoRA from a fine-tuned model and its original (kohya's extract_lora_from_models.py)",
    )  # fmt: skip
    e.add_argument("--model_org", required=True, help="the original base model (SD1.x / SDXL)")
    e.add_argument("--model_tuned", required=True, help="the fine-tuned model; the LoRA is tuned - original")
    e.add_argument("--save_to", required=True, help="where to write the LoRA (.safetensors)")
    e.add_argument("--dim", type=int, default=4, help="rank of the LoRA (default 4)")
    e.add_argument(
        "--conv_dim", type=int, default=None, help="rank for 3x3 convs (LoCon); default: no 3x3 conv modules"
    )
    e.add_argument(
        "--clamp_quantile", type=float, default=0.99,
        help="clamp the factors to this quantile of their values (default 0.99; 1 = no clamp)",
    )  # fmt: skip
    e.add_argument(
        "--min_diff", type=float, default=0.01,
        help="leave the text encoders out when none of their weights moved more than this (default 0.01)",
    )  # fmt: skip
    e.add_argument(
        "--save_precision",
        choices=PRECISIONS,
        default="float",
        help="precision of the saved LoRA (default float)",
    )
    e.add_argument(
        "--load_precision", choices=PRECISIONS, default="float",
        help="precision the two models are loaded in (fp16/bf16 halve the memory; default float)",
    )  # fmt: skip
    e.add_argument("--device", default=None, help="device for the SVD: cpu (default), cuda")
    e.add_argument(
        "--v_parameterization", action="store_true",
        help="mark the LoRA as v-prediction (default: what the original model says)",
    )  # fmt: skip
    e.add_argument("--overwrite", action="store_true", help="replace --save_to if it exists")
    e.set_defaults(func=cmd_extract, known=lambda: _known(e))


def _known(p: argparse.ArgumentParser) -> list[str]:
    return [s[2:] for a in p._actions for s in a.option_strings if s.startswith("--")]
