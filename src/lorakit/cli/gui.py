"""`lorakit gui`: the browser GUI (needs `pip install lorakit[gui]`)."""

from __future__ import annotations

import argparse
import sys

from ..demo import DEMO_MODEL
from ..errors import LoraKitError

WARNING = """
!!! WARNING: --listen without --auth: anyone who can reach this machine on port {port} can use the
!!! GUI, which reads and writes files and runs training as your user. Add --auth user:password.
"""


def cmd_gui(args: argparse.Namespace) -> int:
    import logging
    from pathlib import Path

    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own start-up probes

    try:
        from ..gui import app  # sets Gradio's analytics off before Gradio loads
    except ImportError as e:
        raise LoraKitError(f"the GUI needs Gradio: pip install 'lorakit[gui]' ({e})") from None

    auth = None
    if args.auth:
        user, sep, password = args.auth.partition(":")
        if not sep or not user or not password:
            raise LoraKitError("--auth must be user:password")
        auth = (user, password)
    host = "0.0.0.0" if args.listen else "127.0.0.1"
    if args.listen and not auth:
        print(WARNING.format(port=args.port), file=sys.stderr, flush=True)
    settings = app.Settings(
        model=args.model or str(DEMO_MODEL),  # the shipped demo model: the GUI works out of the box
        lora_dir=Path(args.lora_dir),
        runs_dir=Path(args.runs_dir),
        outputs_dir=Path(args.outputs_dir),
        config_dir=Path(args.config_dir),
        data_dirs=tuple(Path(d) for d in args.data_dir or ()),
        model_dirs=tuple(Path(d) for d in args.model_dir or ()),
    )
    app.launch(settings, host=host, port=args.port, auth=auth)
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "gui",
        allow_abbrev=False,
        help="start the browser GUI (train, watch, generate)",
        description="Start lorakit's browser GUI on http://127.0.0.1:PORT/.",
    )
    p.add_argument("--listen", action="store_true", help="serve on 0.0.0.0 (all interfaces); use with --auth")
    p.add_argument("--port", type=int, default=7860, help="port (default: 7860)")
    p.add_argument("--auth", metavar="USER:PASS", help="require this user name and password")
    p.add_argument(
        "--model",
        default=None,
        help="default base model for training and drawing (default: lorakit's demo model)",
    )
    p.add_argument(
        "--lora_dir",
        default="models/Lora",
        help="LoRA gallery folder; trained LoRAs are saved here by default",
    )
    p.add_argument("--runs_dir", default="runs", help="folder of training jobs (config, progress, log)")
    p.add_argument("--outputs_dir", default="outputs/txt2img-images", help="folder for generated images")
    p.add_argument(
        "--config_dir",
        default=".",
        help="the only folder Save/Load config uses (<name>.toml; default: the working folder)",
    )
    p.add_argument(
        "--data_dir",
        action="append",
        metavar="FOLDER",
        help="a folder of datasets the GUI may read and write captions in, besides the working folder "
        "(repeat for more); training may also write there",
    )
    p.add_argument(
        "--model_dir",
        action="append",
        metavar="FOLDER",
        help="a folder of base models the GUI may load, besides the folder of --model, the LoRA folder "
        "and the dataset folders (repeat for more)",
    )
    p.set_defaults(
        func=cmd_gui,
        known=lambda: [
            "listen", "port", "auth", "model", "lora_dir", "runs_dir", "outputs_dir", "config_dir", "data_dir",
            "model_dir",
        ],
    )  # fmt: skip
