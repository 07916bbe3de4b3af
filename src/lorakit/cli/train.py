"""`lorakit train` and `lorakit quickstart`: flags generated from the typed config."""

from __future__ import annotations

import argparse
import dataclasses
import os
import typing

from ..config import SECTIONS, TrainConfig, base_type, field_index, load_toml_flat


def add_config_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per config option, named as in kohya; each defaults to 'not given'."""
    index = field_index()
    groups = {s: parser.add_argument_group(f"{s} options") for s in SECTIONS}
    for name, (section, f) in index.items():
        tp, _ = base_type(f.type)
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        help_text = f.metadata["help"]
        if "default" not in help_text:  # some helps name their default already ("default: learning_rate")
            help_text += f" (default: {default})"
        if tp is bool and name.startswith("no_"):  # `--no_metadata`, never `--no-no_metadata`
            groups[section].add_argument(
                f"--{name}", action="store_const", const=True, default=None, help=help_text
            )
        elif tp is bool:
            groups[section].add_argument(
                f"--{name}", action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        elif name == "text_encoder_lr":  # kohya: one value, or one per SDXL text encoder
            groups[section].add_argument(f"--{name}", nargs="+", default=None, metavar="LR", help=help_text)
        elif typing.get_origin(tp) is list:
            groups[section].add_argument(f"--{name}", nargs="*", default=None, metavar="K=V", help=help_text)
        else:
            choices = typing.get_args(tp) if typing.get_origin(tp) is typing.Literal else None
            groups[section].add_argument(
                f"--{name}",
                default=None,
                choices=choices,
                metavar=name.upper() if not choices else None,
                help=help_text,
            )


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    """The preset first, then --config, then flags: each later one wins."""
    from ..presets import load_preset

    cfg = TrainConfig()
    if getattr(args, "preset", None):  # its values count as given: model defaults leave them alone
        cfg.update(load_preset(args.preset), source=f"preset {args.preset!r}")
    if args.config:
        cfg.update(load_toml_flat(args.config), source=str(args.config))
    given = {k: v for k, v in vars(args).items() if k in field_index() and v is not None}
    cfg.update(given, source="command line")
    return cfg


def print_presets() -> None:
    import textwrap

    from ..presets import list_presets

    for name, description in list_presets().items():
        print(name)
        print(textwrap.indent(textwrap.fill(description, 96), "    "))
    print("\nUse one with `lorakit train --preset NAME ...`; --config and flags given with it win.")


def cmd_train(args: argparse.Namespace) -> int:
    if args.list_presets:
        print_presets()
        return 0
    from ..models.defaults import apply_model_defaults
    from ..train.trainer import train

    cfg = config_from_args(args)
    apply_model_defaults(cfg)  # resolution / learning_rate not given: the base model's
    if args.dump_config:
        print(cfg.to_toml())
        return 0
    path = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun / accelerate launch: once
        print(f"LoRA saved: {path}")
    return 0


def cmd_quickstart(args: argparse.Namespace) -> int:
    from ..demo.workflow import run_demo

    run_demo(args.workdir, steps=args.steps, sdxl=args.sdxl)
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "train",
        allow_abbrev=False,
        help="train a LoRA",
        description="Train a LoRA. Options come from --preset, then --config (TOML, kohya option names), "
        "then flags; each later one wins.",
    )
    p.add_argument(
        "--preset",
        metavar="NAME",
        help="start from a shipped preset (base family x card memory x goal, e.g. sdxl-12gb-character); "
        "--list_presets shows them",
    )
    p.add_argument(
        "--list_presets", action="store_true", help="print the shipped presets and what they are for"
    )
    p.add_argument("--config", metavar="FILE.toml", help="TOML file with any of the options below")
    p.add_argument("--dump_config", action="store_true", help="print the resulting config as TOML and exit")
    add_config_flags(p)
    p.set_defaults(func=cmd_train, known=lambda: list(field_index()))

    q = sub.add_parser(
        "quickstart",
        allow_abbrev=False,
        help="the whole workflow on the shipped demo model: instance images, reg images, LoRA, before/after grid",
    )
    q.add_argument("--workdir", default="lorakit-quickstart", help="folder for the dataset, LoRA and grid")
    q.add_argument("--steps", type=int, default=None, help="training steps (default 200)")
    q.add_argument("--sdxl", action="store_true", help="the same story on the SDXL-family demo model")
    q.set_defaults(func=cmd_quickstart, known=lambda: ["workdir", "steps", "sdxl"])
