"""Tools tab: merge, resize, extract and convert LoRAs (the `lorakit merge/resize/extract/convert`
library calls), with a progress bar and the new file's card.

What a request may name is fixed by the server: input LoRAs lie in the model roots (the LoRA folder
among them), base models pass Settings.model_path, and an output is a bare name the server turns into
`<LoRA folder>/<name>.safetensors` (a LoRA) or `<checkpoint folder>/<name>.safetensors` (a checkpoint
with LoRAs baked in). An existing file is replaced only when Overwrite is ticked.
"""

from __future__ import annotations

import re
from pathlib import Path

import gradio as gr

from ..errors import ConfigError
from .common import Settings, user_errors
from .guard import output_file
from .lora_tab import lora_files

MERGE_MODES = {
    "Into a checkpoint (bake)": "bake",
    "Into one LoRA: kohya's sum (equal ranks)": "sum",
    "Into one LoRA: concat (exact, ranks add up)": "concat",
    "Into one LoRA: SVD to a new rank": "svd",
}
SAME = "same as the input"
PRECISIONS = ("fp16", "bf16", "float")
DYNAMIC = ("none", "sv_ratio", "sv_fro", "sv_cumulative")
CONVERT_TO = {
    "kohya": "kohya (A1111, Forge, kohya sd-scripts)",
    "peft": "peft (diffusers load_lora_weights)",
    "comfy": "comfy (ComfyUI's own LoRA names)",
}


def output_path(folder: Path, name: str, overwrite: bool) -> Path:
    """The output `<folder>/<name>.safetensors` (guard.output_file), not an existing one unless
    `overwrite`; the folder is made when missing (it is the server's own choice)."""
    path = output_file(folder, name)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder; choose another name")
    if path.exists() and not overwrite:
        raise ConfigError(f"{path} already exists: tick Overwrite to replace it, or choose another name")
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def ratios_of(text: str, count: int) -> list[float] | None:
    """'0.8, 0.5' (commas or spaces) -> [0.8, 0.5]; empty -> None (1.0 each)."""
    parts = [p for p in re.split(r"[,\s]+", (text or "").strip()) if p]
    if not parts:
        return None
    try:
        ratios = [float(p) for p in parts]
    except ValueError:
        raise ConfigError(f"ratios {text!r}: give numbers, one per LoRA, e.g. 0.8, 0.5") from None
    if len(ratios) != count:
        raise ConfigError(f"ratios: {len(ratios)} given for {count} LoRAs; give one per LoRA (or none: 1.0)")
    return ratios


def precision_choice(value: str | None, default: str | None = None) -> str | None:
    if value in (None, "", SAME):
        return default
    if value not in PRECISIONS:
        raise ConfigError(f"save precision {value!r}: choose one of {', '.join(PRECISIONS)}")
    return value


def rank_of(value, what: str, optional: bool = False) -> int | None:
    """A rank field: a whole number >= 1 (0 or empty: None where `optional`)."""
    if optional and value in (None, "", 0):
        return None
    try:
        rank = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}: give a whole number") from None
    if rank != float(value) or rank < 1:
        raise ConfigError(f"{what} {value}: a rank is a whole number of at least 1")
    return rank


def lora_card(path: Path) -> str:
    from ..network.inspect import format_table, inspect_lora

    return format_table(inspect_lora(path))


def written(path: Path, size: int, seconds: float | None = None) -> str:
    from ..network.file import size_text

    took = f", {seconds:.1f} s" if seconds is not None else ""
    return f"**Done.** Wrote `{path}` ({size_text(size)}{took})."


def _bar(progress, desc: str):
    """A (done, total) callback for the library that moves the Gradio bar."""
    return lambda done, total: progress(done / total if total else 0, desc=desc)


def build(settings: Settings) -> dict:
    lora_dir, ckpt_dir = Path(settings.lora_dir).absolute(), settings.checkpoint_dir().absolute()
    gr.Markdown(
        f"New LoRAs are written to `{lora_dir}`, checkpoints with LoRAs baked in to `{ckpt_dir}`, as "
        "**NAME.safetensors** (give the name only). An existing file is kept unless **Overwrite** is ticked.",
        elem_id="tools-intro",
    )
    loras = lora_files(settings)
    models = settings.model_choices()

    def lora_pick(label: str, elem_id: str, multi: bool = False):
        return gr.Dropdown(
            loras, multiselect=multi, allow_custom_value=True, label=label, elem_id=elem_id, scale=4
        )

    def saved_as(folder: Path) -> str:
        return f"saved as {folder / 'NAME.safetensors'}"

    def output_row(prefix: str, label: str, folder: Path = lora_dir):
        with gr.Row():
            name = gr.Textbox(
                label=label, info=saved_as(folder), placeholder="my-lora", elem_id=f"{prefix}-name", scale=3
            )
            overwrite = gr.Checkbox(False, label="Overwrite", elem_id=f"{prefix}-overwrite", scale=0)
            go = gr.Button("Run", variant="primary", elem_id=f"{prefix}-go", scale=1)
        status = gr.Markdown(elem_id=f"{prefix}-status")
        card = gr.Code(label="Result", language=None, lines=14, elem_id=f"{prefix}-card")
        return name, overwrite, go, status, card

    with gr.Tabs():
        with gr.Tab("Merge", id="merge", elem_id="tools-merge"):
            gr.Markdown(
                "Bake LoRAs into a base checkpoint for good (kohya's `merge_lora.py --sd_model`), or merge "
                "them into one LoRA: kohya's sum (equal ranks), concat (exact) or SVD to a new rank."
            )
            m_mode = gr.Radio(
                list(MERGE_MODES), value=next(iter(MERGE_MODES)), label="Merge", elem_id="merge-mode"
            )
            with gr.Row():
                m_loras = lora_pick("LoRAs (in order)", "merge-loras", multi=True)
                m_ratios = gr.Textbox(label="Ratios (one per LoRA; empty: 1.0 each)", placeholder="0.8, 0.5",
                                      elem_id="merge-ratios", scale=2)  # fmt: skip
            with gr.Row():
                m_base = gr.Dropdown(
                    models, value=settings.model or None, allow_custom_value=True,
                    label="Base checkpoint (bake: a single .safetensors/.ckpt file)", elem_id="merge-base", scale=4,
                )  # fmt: skip
                m_rank = gr.Number(
                    8, precision=0, minimum=1, label="SVD: new rank", elem_id="merge-rank", visible=False
                )
                m_conv = gr.Number(0, precision=0, minimum=0, label="SVD: conv rank (0 = new rank)",
                                   elem_id="merge-conv-rank", visible=False)  # fmt: skip
                m_prec = gr.Dropdown(
                    [SAME, *PRECISIONS], value=SAME, label="Save precision", elem_id="merge-precision"
                )
            m_name, m_over, m_go, m_status, m_card = output_row("merge", "Output name", ckpt_dir)

            def mode_fields(mode):  # show the fields the chosen merge uses
                kind = MERGE_MODES.get(mode)
                folder = ckpt_dir if kind == "bake" else lora_dir
                return (
                    gr.update(visible=kind == "bake"), gr.update(visible=kind == "svd"),
                    gr.update(visible=kind == "svd"), gr.update(info=saved_as(folder)),
                )  # fmt: skip

            m_mode.change(mode_fields, [m_mode], [m_base, m_rank, m_conv, m_name], show_progress="hidden")
        with gr.Tab("Resize", id="resize", elem_id="tools-resize"):
            gr.Markdown(
                "Lower a LoRA's rank by SVD (kohya's `resize_lora.py`); strength at a given weight is kept. "
                "A dynamic method picks each module's rank (at most the rank above) from its singular values."
            )
            r_lora = lora_pick("LoRA", "resize-lora")
            with gr.Row():
                r_rank = gr.Number(4, precision=0, minimum=1, label="New rank", elem_id="resize-rank")
                r_conv = gr.Number(
                    0, precision=0, minimum=0, label="Conv rank (0 = new rank)", elem_id="resize-conv-rank"
                )
                r_method = gr.Dropdown(
                    list(DYNAMIC), value="none", label="Dynamic method", elem_id="resize-method"
                )
                r_param = gr.Number(
                    0.9, label="Dynamic parameter (sv_ratio: 2-20; others: 0-1)", elem_id="resize-param"
                )
                r_prec = gr.Dropdown(
                    [SAME, *PRECISIONS], value=SAME, label="Save precision", elem_id="resize-precision"
                )
            r_name, r_over, r_go, r_status, r_card = output_row("resize", "Output name")
            with gr.Accordion("Per module: rank, alpha, retained norms", open=False):
                r_modules = gr.Code(language=None, lines=12, elem_id="resize-modules")
        with gr.Tab("Extract", id="extract", elem_id="tools-extract"):
            gr.Markdown(
                "A LoRA from a fine-tuned model and its original: the difference, by SVD "
                "(kohya's `extract_lora_from_models.py`)."
            )
            with gr.Row():
                e_org = gr.Dropdown(models, value=settings.model or None, allow_custom_value=True,
                                    label="Original model", elem_id="extract-org")  # fmt: skip
                e_tuned = gr.Dropdown(
                    models, allow_custom_value=True, label="Fine-tuned model", elem_id="extract-tuned"
                )
            with gr.Row():
                e_dim = gr.Number(4, precision=0, minimum=1, label="Dim (rank)", elem_id="extract-dim")
                e_conv = gr.Number(
                    0, precision=0, minimum=0, label="Conv dim (0 = no 3x3 convs)", elem_id="extract-conv-dim"
                )
                e_min = gr.Number(0.01, minimum=0, label="min_diff (text encoders left out below it)",
                                  elem_id="extract-min-diff")  # fmt: skip
                e_prec = gr.Dropdown(
                    list(PRECISIONS), value="float", label="Save precision", elem_id="extract-precision"
                )
            e_name, e_over, e_go, e_status, e_card = output_row("extract", "Output name")
        with gr.Tab("Convert", id="convert", elem_id="tools-convert"):
            gr.Markdown(
                "Rename a LoRA's keys for another program; what it does is unchanged, metadata is kept."
            )
            with gr.Row():
                c_lora = lora_pick(
                    "LoRA (kohya, diffusers/PEFT, ComfyUI or ai-toolkit names)", "convert-lora"
                )
                c_to = gr.Radio(
                    [(v, k) for k, v in CONVERT_TO.items()], value="kohya", label="To", elem_id="convert-to"
                )
            c_name, c_over, c_go, c_status, c_card = output_row("convert", "Output name")

    @user_errors
    def do_merge(
        mode, picked, ratios, base, new_rank, conv_rank, precision, name, overwrite, progress=gr.Progress()
    ):
        mode = MERGE_MODES.get(mode)
        if mode is None:
            raise ConfigError("merge: choose what to merge into")
        paths = [settings.lora_path(p, f"LoRA {i + 1}") for i, p in enumerate(picked or [])]
        if not paths:
            raise ConfigError("merge: pick at least one LoRA")
        ratio_list = ratios_of(ratios, len(paths))
        precision = precision_choice(precision)
        if mode == "bake":
            from ..models.loader import model_kind
            from ..network.bake import bake_loras
            from ..network.file import size_text

            base_path = settings.model_path(base)
            if model_kind(base_path) == "diffusers":
                raise ConfigError(
                    f"base model {base}: a diffusers folder; bake into it with `lorakit merge --sd_model` "
                    "(the GUI writes single .safetensors checkpoints)"
                )
            out = output_path(settings.checkpoint_dir(), name, overwrite)
            progress(0, desc="checking the LoRAs against the base")
            r = bake_loras(
                base_path, paths, ratio_list, out, save_precision=precision, overwrite=overwrite,
                progress=_bar(progress, f"writing {out.name}"),
            )  # fmt: skip
            card = (
                f"checkpoint     {r.path}\nsize           {size_text(r.size)}\nLoRAs          "
                + ", ".join(f"{p.name} x{w:g}" for p, w in zip(paths, ratio_list or [1.0] * len(paths)))
                + f"\nmodules        {r.modules} changed\ntensors        {r.tensors} changed\ntime           {r.seconds:.1f} s"
            )
            return written(r.path, r.size, r.seconds) + " Pick it as a base model in Generate.", card
        from ..network.combine import merge_lora_files

        out = output_path(lora_dir, name, overwrite)
        svd = mode == "svd"
        r = merge_lora_files(
            paths, ratio_list, out, concat=mode == "concat",
            new_rank=rank_of(new_rank, "new rank") if svd else None,
            new_conv_rank=rank_of(conv_rank, "conv rank", optional=True) if svd else None,
            save_precision=precision, overwrite=overwrite, progress=_bar(progress, "merging modules"),
        )  # fmt: skip
        progress(1, desc="reading the new file")
        return written(r.path, r.size, r.seconds), lora_card(r.path)

    @user_errors
    def do_resize(
        picked, new_rank, conv_rank, method, param, precision, name, overwrite, progress=gr.Progress()
    ):
        from ..network.file import size_text
        from ..network.resize import module_lines, resize_lora_file, resize_summary

        src = settings.lora_path(picked)
        if method not in DYNAMIC:
            raise ConfigError(f"dynamic method {method!r}: choose one of {', '.join(DYNAMIC)}")
        out = output_path(lora_dir, name, overwrite)
        dynamic = None if method == "none" else method
        r = resize_lora_file(
            src, out, rank_of(new_rank, "new rank"), rank_of(conv_rank, "conv rank", optional=True), dynamic,
            float(param) if dynamic and param is not None else None, save_precision=precision_choice(precision),
            overwrite=overwrite, progress=_bar(progress, "resizing modules"),
        )  # fmt: skip
        status = (
            written(r.path, r.size)
            + f" {src.name}: {size_text(r.size_before)} → {size_text(r.size)} ({r.precision}).\n\n"
            + resize_summary(r.stats)
        )
        return status, lora_card(r.path), "\n".join(module_lines(r.stats))

    @user_errors
    def do_extract(org, tuned, dim, conv_dim, min_diff, precision, name, overwrite, progress=gr.Progress()):
        import time

        from ..network.extract import extract_lora_file, extract_summary

        org_path = settings.model_path(org, "original model")
        tuned_path = settings.model_path(tuned, "fine-tuned model")
        if org_path == tuned_path:
            raise ConfigError("extract: the original and the fine-tuned model are the same file")
        out = output_path(lora_dir, name, overwrite)
        try:
            min_diff = float(min_diff if min_diff is not None else 0.01)
        except ValueError:
            raise ConfigError("min_diff: give a number, e.g. 0.01") from None
        dim = rank_of(dim, "dim")
        started = time.monotonic()
        progress(0.1, desc="loading both models and taking their difference by SVD")
        path, tensors = extract_lora_file(
            org_path, tuned_path, out, dim, rank_of(conv_dim, "conv dim", optional=True),
            min_diff=min_diff, save_precision=precision_choice(precision, "float"),
        )  # fmt: skip
        progress(1, desc="reading the new file")
        status = (
            written(path, path.stat().st_size, time.monotonic() - started)
            + "\n\n"
            + extract_summary(path, tensors, dim)
        )
        return status, lora_card(path)

    @user_errors
    def do_convert(picked, to, name, overwrite, progress=gr.Progress()):
        import time

        from ..network.convert import convert_file

        src = settings.lora_path(picked)
        if to not in CONVERT_TO:
            raise ConfigError(f"convert to {to!r}: choose one of {', '.join(CONVERT_TO)}")
        out = output_path(lora_dir, name, overwrite)
        started = time.monotonic()
        progress(0.2, desc=f"writing {to} names")
        path = convert_file(src, out, to, overwrite=overwrite)
        return written(path, path.stat().st_size, time.monotonic() - started) + f" ({to} names)", lora_card(
            path
        )

    lora_fields = [m_loras, r_lora, c_lora]
    model_fields = [m_base, e_org, e_tuned]

    def refresh():
        loras, models = lora_files(settings), settings.model_choices()
        return [gr.update(choices=loras)] * len(lora_fields) + [gr.update(choices=models)] * len(model_fields)

    m_inputs = [m_mode, m_loras, m_ratios, m_base, m_rank, m_conv, m_prec, m_name, m_over]
    done = [
        m_go.click(do_merge, m_inputs, [m_status, m_card], api_name="tools_merge"),
        r_go.click(
            do_resize,
            [r_lora, r_rank, r_conv, r_method, r_param, r_prec, r_name, r_over],
            [r_status, r_card, r_modules],
            api_name="tools_resize",
        ),  # fmt: skip
        e_go.click(
            do_extract,
            [e_org, e_tuned, e_dim, e_conv, e_min, e_prec, e_name, e_over],
            [e_status, e_card],
            api_name="tools_extract",
        ),  # fmt: skip
        c_go.click(do_convert, [c_lora, c_to, c_name, c_over], [c_status, c_card], api_name="tools_convert"),
    ]
    do_refresh = (refresh, None, lora_fields + model_fields)
    for event in done:  # the new file shows in every list (other tabs: app.py)
        event.success(*do_refresh, show_progress="hidden")
    return {"refresh": do_refresh, "done": done}
