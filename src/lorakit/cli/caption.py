"""`lorakit caption`: write caption files with a tagger or captioning model from a local folder."""

from __future__ import annotations

import argparse

THRESH_HELP = "confidence a tag needs (default: 0.35, kohya's)"


def cmd_caption(args: argparse.Namespace) -> int:
    from ..caption.natural import TextOptions
    from ..caption.run import caption_extension_of, caption_folder, load_captioner, summary_lines
    from ..caption.wd14 import TagOptions

    ext = caption_extension_of(args.caption_extension)  # refused before any model loads
    separator = args.caption_separator
    split_on = separator.strip() or ","
    undesired = {t.strip() for t in (args.undesired_tags or "").split(split_on) if t.strip()}
    first = [t.strip() for t in (args.always_first_tags or "").split(split_on) if t.strip()]
    tag_opts = TagOptions(
        general_threshold=args.thresh if args.general_threshold is None else args.general_threshold,
        character_threshold=args.thresh if args.character_threshold is None else args.character_threshold,
        undesired_tags=frozenset(undesired),
        remove_underscore=args.remove_underscore,
        use_rating_tags=args.use_rating_tags,
        character_tags_first=args.character_tags_first,
    )
    text_opts = TextOptions(
        max_length=args.max_length, min_length=args.min_length, num_beams=args.num_beams, prompt=args.prompt
    )
    captioner = load_captioner(args.model_dir, tag_opts, text_opts, args.device)
    print(f"captioning {args.train_data_dir} with {args.model_dir} ({captioner.provider})", flush=True)
    report = caption_folder(
        args.train_data_dir,
        captioner,
        caption_extension=ext,
        overwrite=args.overwrite,
        always_first_tags=first,
        caption_separator=separator,
        recursive=args.recursive,
        batch_size=args.batch_size,
        on_progress=lambda done, total: print(f"  {done}/{total}", end="\r", flush=True),
    )
    print("\n".join(summary_lines(report, ext, len(first))))
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "caption",
        allow_abbrev=False,
        help="write caption files with a WD14 tagger or a BLIP/GIT model from a local folder",
        description="Write <image>.txt beside each image with your own model folder (nothing is downloaded): "
        "a WD14 tagger (model.onnx + selected_tags.csv, needs onnxruntime: pip install 'lorakit[caption]') "
        "or a transformers image-to-text model (BLIP, GIT) saved with save_pretrained. Existing captions "
        "are kept unless --overwrite.",
    )
    p.add_argument(
        "train_data_dir", help="the image folder: flat, or a kohya folder of <repeats>_<prompt> folders"
    )
    p.add_argument(
        "--model_dir",
        required=True,
        help="the tagger folder (model.onnx + selected_tags.csv, e.g. SmilingWolf/wd-vit-tagger-v3's files) "
        "or a transformers captioning model folder",
    )
    p.add_argument("--caption_extension", default=".txt", help="caption file extension (default: .txt)")
    p.add_argument(
        "--overwrite", action="store_true", help="replace existing caption files (default: skip them)"
    )
    p.add_argument("--recursive", action="store_true", help="also caption images in subfolders")
    p.add_argument("--batch_size", type=int, default=1, help="images per model call (default: 1)")
    p.add_argument(
        "--always_first_tags",
        default=None,
        help="tags (a trigger word) that start every caption, comma-separated, e.g. 'usu bear'; added "
        "when the model did not find them. Train with keep_tokens = their count",
    )
    p.add_argument("--caption_separator", default=", ", help="between tags (default: ', ')")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    g = p.add_argument_group("WD14 tagger")
    g.add_argument("--thresh", type=float, default=0.35, help=THRESH_HELP)
    g.add_argument(
        "--general_threshold", type=float, default=None, help="for general tags (default: --thresh)"
    )
    g.add_argument(
        "--character_threshold",
        type=float,
        default=None,
        help="for character tags (default: --thresh; above 1 leaves them out)",
    )
    g.add_argument("--undesired_tags", default="", help="tags never written, comma-separated")
    g.add_argument("--remove_underscore", action="store_true", help="long_hair -> long hair")
    g.add_argument("--use_rating_tags", action="store_true", help="start with the likeliest rating tag")
    g.add_argument("--character_tags_first", action="store_true", help="character tags before general ones")
    t = p.add_argument_group("BLIP / GIT / transformers image-to-text")
    t.add_argument("--max_length", type=int, default=75, help="longest caption in tokens (default: 75)")
    t.add_argument("--min_length", type=int, default=5, help="shortest caption in tokens (default: 5)")
    t.add_argument("--num_beams", type=int, default=1, help="beam search width (default: 1, greedy)")
    t.add_argument("--prompt", default="", help="text the caption starts from, e.g. 'a photo of'")
    p.set_defaults(
        func=cmd_caption,
        known=lambda: [
            "model_dir", "caption_extension", "overwrite", "recursive", "batch_size", "always_first_tags",
            "caption_separator", "device", "thresh", "general_threshold", "character_threshold", "undesired_tags",
            "remove_underscore", "use_rating_tags", "character_tags_first", "max_length", "min_length",
            "num_beams", "prompt",
        ],
    )  # fmt: skip
