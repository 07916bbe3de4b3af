"""`lorakit resize` and `lorakit extract`: kohya's resize_lora.py and extract_lora_from_models.py."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from ..errors import ModelError

log = logging.getLogger("lorakit")

PRECISIONS = ("float", "fp16", "bf16")


def refuse_overwrite(path: str | Path, overwrite: bool) -> Path:
    """The output path, checked: a .safetensors name, and not an existing file unless --overwrite."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ModelError(
            f"--save_to {path}: lorakit writes LoRAs as .safetensors files; name it *.safetensors"
        )
    if path.is_dir():
        raise ModelError(f"--save_to {path} is a folder; give a file name (*.safetensors)")
    if path.exists() and not overwrite:
        raise ModelError(
            f"{path} already exists; pass --overwrite to replace it, or choose another --save_to"
        )
    if not path.parent.is_dir():
        raise ModelError(f"--save_to {path}: the folder {path.parent} does not exist")
    return path


def size_text(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f} MB" if n_bytes >= 1e5 else f"{n_bytes / 1e3:.1f} kB"


def precision_of(tensors) -> str:
    """The save precision a file's tensors are in (its lora_up / lora_down), for 'same as the input'."""
    import torch

    dtypes = {t.dtype for k, t in tensors.items() if ".lora_" in k}
    for name, dtype in (("float", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        if dtype in dtypes:
            return name
    return "fp16"


def cmd_resize(args: argparse.Namespace) -> int:
    import statistics

    from ..network.file import read_lora_file, save_lora_file
    from ..network.resize import resize_lora

    src = Path(args.model)
    out = refuse_overwrite(args.save_to, args.overwrite)
    if out.resolve() == src.resolve():
        raise ModelError(f"--save_to {out} is the --model file itself; write the resized LoRA to a new file")
    tensors, metadata = read_lora_file(src)
    precision = args.save_precision or precision_of(tensors)
    if args.dynamic_method:
        log.info(
            "resizing %s with %s %g (at most rank %d)", src.name, args.dynamic_method, args.dynamic_param or 0,
            args.new_rank,
        )  # fmt: skip
    new, meta, stats = resize_lora(
        tensors, metadata, args.new_rank, args.new_conv_rank, args.dynamic_method, args.dynamic_param,
        source=str(src), device=args.device,
    )  # fmt: skip
    save_lora_file(out, new, meta, precision)
    if args.verbose:
        width = max(len(s.name) for s in stats)
        for s in stats:
            line = (
                f"{s.name:{width}} | rank {s.old_rank} -> {s.new_rank}, alpha {s.new_alpha:g} | "
                f"sum(S) retained {s.sum_retained:.1%}, fro retained {s.fro_retained:.1%}, "
                f"max(S) ratio {s.max_ratio:0.1f}"
            )
            print(line)
    fro = [s.fro_retained for s in stats]
    ranks = sorted({s.new_rank for s in stats})
    rank_text = (
        str(ranks[0])
        if len(ranks) == 1
        else f"{ranks[0]}-{ranks[-1]} (mean {statistics.mean(s.new_rank for s in stats):.1f})"
    )
    print(
        f"{len(stats)} modules resized to rank {rank_text}; Frobenius norm retained: mean "
        f"{statistics.mean(fro):.2%}, min {min(fro):.2%} (std {statistics.pstdev(fro):.3f})"
    )
    print(
        f"{src.name}: {size_text(src.stat().st_size)} -> {out.name}: {size_text(out.stat().st_size)} ({precision})"
    )
    return 0


def cmd_extract(args: argparse.Namespace) -> int:
    from ..network.extract import extract_lora_file

    out = refuse_overwrite(args.save_to, args.overwrite)
    for flag, path in (("--model_org", args.model_org), ("--model_tuned", args.model_tuned)):
        if not Path(path).exists():
            raise ModelError(f"{flag} {path} does not exist")
    path, tensors = extract_lora_file(
        args.model_org, args.model_tuned, out, args.dim, args.conv_dim, args.clamp_quantile, args.min_diff,
        args.save_precision, args.load_precision, args.device, True if args.v_parameterization else None,
    )  # fmt: skip
    modules = sum(k.endswith(".lora_down.weight") for k in tensors)
    te = sum(k.startswith("lora_te") and k.endswith(".lora_down.weight") for k in tensors)
    print(f"{path}: {modules} modules ({te} text encoder), rank {args.dim}, {size_text(path.stat().st_size)}")
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
