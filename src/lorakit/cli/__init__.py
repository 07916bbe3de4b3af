"""`lorakit` command line: thin fronts over the typed configs and the Python API.

Heavy imports (torch, diffusers) happen inside the commands, so `lorakit --help` is instant.
"""

from __future__ import annotations

import argparse
import difflib
import logging
import sys

from ..errors import LoraKitError, explain_memory_error
from ..threads import apply_threads
from . import caption, convert, draw, gui, merge, tools, train


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="lorakit", description="Train kohya-compatible Stable Diffusion LoRAs, and draw with them.",
        allow_abbrev=False,
    )  # fmt: skip
    sub = parser.add_subparsers(dest="command", required=True)
    train.add_parsers(sub)
    draw.add_parsers(sub)
    gui.add_parsers(sub)
    caption.add_parsers(sub)
    tools.add_parsers(sub)
    convert.add_parsers(sub)
    merge.add_parsers(sub)
    for command in sub.choices.values():
        command.add_argument(
            "--threads",
            default=None,
            metavar="N",
            help="CPU threads for torch: a number, or auto (default: one per core that is not busy, "
            "from the load average; also LORAKIT_THREADS)",
        )
    return parser


def unknown_flag_message(flag: str, known: list[str]) -> str:
    name = flag[2:].split("=")[0]
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return f"command line: unknown option {name!r}.{hint} `--help` lists every option."


def main(argv: list[str] | None = None) -> int:
    args, unknown = build_parser().parse_known_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        for flag in unknown:
            if flag.startswith("--"):
                raise LoraKitError(unknown_flag_message(flag, [*args.known(), "threads"]))
        if unknown:
            raise LoraKitError(f"unexpected arguments: {' '.join(unknown)}")
        try:
            apply_threads(args.threads)
        except ValueError as e:
            raise LoraKitError(str(e)) from None
        return args.func(args)
    except LoraKitError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # `lorakit inspect x | head`: the reader has what it wanted
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    except (MemoryError, OSError, RuntimeError) as e:  # out of RAM, page file or GPU memory: say what to do
        advice = explain_memory_error(e, doing=f"running `lorakit {args.command}`")
        if advice is None:
            raise
        print(f"error: {advice}\n({type(e).__name__}: {e})", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
