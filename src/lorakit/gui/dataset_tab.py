"""Dataset tab: the kohya folders as training will read them, their problems, captions; reg images."""

from __future__ import annotations

import html
from pathlib import Path

import gradio as gr

from ..config import TrainConfig
from ..dataset.folders import (
    CAPTION_EXTENSIONS,
    IMAGE_EXTENSIONS,
    parse_folder_name,
    read_caption,
    scan_dataset,
)
from ..dataset.sanity import count_batches, sanity_warnings
from ..errors import LoraKitError
from .common import Settings, model_defaults_of, size_note, thumbnail, user_errors

MAX_THUMBS = 60
COLUMNS = ["folder", "kind", "repeats", "prompt", "images", "caption files"]


def _caption_of(image: Path, ext: str, folder_prompt: str) -> tuple[str, str | None]:
    """(caption training uses, None), or ("", why training would stop on it): the dataset's own rule."""
    try:
        return read_caption(image, ext, folder_prompt), None
    except (LoraKitError, OSError) as e:
        return "", str(e)


def _ext(caption_extension: str) -> str:
    ext = (caption_extension or ".caption").strip()
    return ext if ext.startswith(".") else "." + ext


def list_folders(train_dir: str, reg_dir: str, caption_extension: str):
    """Table rows and (image, caption) items of every subfolder, whatever scan_dataset says about them."""
    ext = _ext(caption_extension)
    rows, items = [], []
    for root, kind in ((train_dir, "train"), (reg_dir, "reg")):
        if not root or not Path(root).is_dir():
            continue
        for sub in sorted(Path(root).iterdir()):
            if not sub.is_dir() or sub.name.startswith("."):
                continue
            parsed = parse_folder_name(sub.name)
            repeats, prompt = parsed if parsed else ("✗", "(not <repeats>_<prompt>)")
            images = sorted(p for p in sub.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            n_caps = sum(p.with_name(p.stem + ext).is_file() for p in images)
            rows.append([sub.name, kind, repeats, prompt, len(images), n_caps])
            for p in images:
                caption, error = _caption_of(p, ext, prompt if parsed else "")
                items.append((p, f"✗ {error}" if error else caption))
    return rows, items


# The Train tab's options the step math and the size check need; the Dataset tab mirrors them.
STEP_OPTIONS = ("resolution", "enable_bucket", "train_batch_size", "max_train_epochs", "max_train_steps")


def _number(value, default: int | None) -> int | None:
    """A Number box's value or an optional-number Textbox's text ('' = unset) as an int."""
    if value is None or str(value).strip() == "":
        return default
    try:
        return int(float(value))
    except ValueError:
        return default


def step_config(options: dict) -> TrainConfig:
    """A TrainConfig holding the Train tab's values of STEP_OPTIONS (missing or unset: the defaults)."""
    cfg = TrainConfig()
    d, t = cfg.dataset, cfg.training
    d.resolution = str(options.get("resolution") or d.resolution).strip()
    d.enable_bucket = bool(options.get("enable_bucket", d.enable_bucket))
    d.train_batch_size = max(1, _number(options.get("train_batch_size"), d.train_batch_size) or 1)
    t.max_train_epochs = _number(options.get("max_train_epochs"), t.max_train_epochs) or None
    t.max_train_steps = max(1, _number(options.get("max_train_steps"), t.max_train_steps) or 1)
    return cfg


def _report_lines(plan, options: dict) -> tuple[list[str], list[str]]:
    """(sanity warnings, step math) for the scanned plan under the Train tab's options."""
    from ..train.summary import step_lines

    cfg = step_config(options)
    try:
        warnings = sanity_warnings(plan, cfg.dataset.resolution, cfg.dataset.enable_bucket)
        steps = step_lines(cfg, plan, count_batches(plan, cfg.dataset))
    except LoraKitError as e:  # e.g. a resolution that is not 'W,H': the Train tab refuses it too
        return [], [f"no step math: {e}"]
    return warnings, steps


def check_folders(
    train_dir: str, reg_dir: str, caption_extension: str, bad_images: str, options: dict | None = None
) -> tuple[bool, str]:
    """(ok, HTML) with what training would say: the error that stops it, or warnings, totals and
    the step math; `options` are the Train tab's STEP_OPTIONS (the defaults where missing)."""
    if not train_dir:
        return (
            False,
            "<p>Give the training image folder (the one holding <code>&lt;repeats&gt;_&lt;prompt&gt;</code> folders).</p>",
        )
    try:
        plan = scan_dataset(train_dir, reg_dir or None, _ext(caption_extension), bad_images=bad_images)
    except LoraKitError as e:
        return False, (
            "<div class='lk-problem'><h3>✗ Training would stop here</h3>"
            f"<pre class='lk-pre'>{html.escape(str(e))}</pre></div>"
        )
    out = [
        f"<h3>✓ Ready: {plan.num_train_images} training samples per epoch (images × repeats), "
        f"{plan.num_reg_images} regularization samples</h3>"
    ]
    sanity, steps = _report_lines(plan, options or {})
    warnings = plan.warnings + sanity
    if warnings:
        out.append("<ul>" + "".join(f"<li>⚠ {html.escape(w)}</li>" for w in warnings) + "</ul>")
    out.append(f"<pre class='lk-pre' id='ds-step-math'>{html.escape(chr(10).join(steps))}</pre>")
    return True, "".join(out)


def build(settings: Settings) -> dict:
    with gr.Row():
        train_dir = gr.Textbox(
            label="Training image folder (train_data_dir)",
            info="holds folders named <repeats>_<prompt>, e.g. '20_usu bear'",
            elem_id="ds-train_dir",
            scale=3,
        )
        reg_dir = gr.Textbox(
            label="Regularization folder (reg_data_dir, optional)",
            info="holds folders named <repeats>_<class>, e.g. '1_bear'",
            elem_id="ds-reg_dir",
            scale=3,
        )
        caption_ext = gr.Textbox(value=".caption", label="Caption extension", scale=1, elem_id="ds-ext")
        bad_images = gr.Radio(["stop", "skip"], value="stop", label="Broken images", scale=1)
    with gr.Accordion("Training settings for the step math (kept in step with the Train tab)", open=False):
        with gr.Row():
            step_inputs = {
                "resolution": gr.Textbox(value="512,512", label="Resolution", elem_id="ds-resolution"),
                "enable_bucket": gr.Checkbox(value=False, label="Buckets", elem_id="ds-enable_bucket"),
                "train_batch_size": gr.Number(value=1, precision=0, label="Batch size", elem_id="ds-batch"),
                "max_train_epochs": gr.Textbox(
                    value="", label="Epochs (empty: use max steps)", elem_id="ds-epochs"
                ),
                "max_train_steps": gr.Number(
                    value=1600, precision=0, label="Max train steps", elem_id="ds-max_train_steps"
                ),
            }
    scan = gr.Button("Check dataset", variant="primary", elem_id="ds-scan")
    problems = gr.HTML(elem_id="ds-problems")
    table = gr.Dataframe(headers=COLUMNS, interactive=False, label="Folders", elem_id="ds-table")
    with gr.Row():
        with gr.Column(scale=3):
            gallery = gr.Gallery(
                label=f"Images and the captions training uses (first {MAX_THUMBS}); click one to edit",
                columns=6,
                height=420,
                allow_preview=False,
                elem_id="ds-gallery",
            )
        with gr.Column(scale=2):
            image_path = gr.Textbox(label="Image", interactive=False, elem_id="ds-image")
            caption = gr.Textbox(label="Caption", lines=3, elem_id="ds-caption")
            save_caption = gr.Button("Save caption", elem_id="ds-save-caption")
            caption_status = gr.Markdown()
    # The last scan, kept on the server: a save names an image by its place in this list, so
    # the client never chooses which file is written.
    scanned = gr.State({"images": [], "ext": ".caption"})
    selected = gr.State(None)

    @user_errors
    def do_scan(train, reg, ext, bad, *option_values):
        train = str(settings.data_dir(train, "training image folder")) if train else ""
        reg = str(settings.data_dir(reg, "regularization folder")) if reg else ""
        rows, items = list_folders(train, reg, ext)
        options = dict(zip(STEP_OPTIONS, option_values))
        _, text = check_folders(train, reg, ext, bad, options)
        shown, thumbs = [], []
        for p, c in items[:MAX_THUMBS]:
            im = thumbnail(p)  # a broken image has none; the problems above name it
            if im is not None:
                shown.append(p)
                thumbs.append((im, c or "(no caption)"))
        folders = {"train": train, "reg": reg, "ext_text": ext, "bad": bad, "options": list(option_values)}
        return text, rows, thumbs, {"images": shown, "ext": _ext(ext), "folders": folders}, None

    scan_outputs = [problems, table, gallery, scanned, selected]

    def scan_and_clear(train, reg, ext, bad, *option_values):
        # a new scan empties the caption editor: an image of the previous folders must not stay
        # on screen as if Save would write it (the server forgets it too: selected is None)
        return *do_scan(train, reg, ext, bad, *option_values), "", "", ""

    scan.click(
        scan_and_clear,
        [train_dir, reg_dir, caption_ext, bad_images, *(step_inputs[n] for n in STEP_OPTIONS)],
        [*scan_outputs, image_path, caption, caption_status],
        api_name="scan_dataset",
    )

    def pick(scan, evt: gr.SelectData):
        images = scan["images"]
        if not isinstance(evt.index, int) or not 0 <= evt.index < len(images):
            raise gr.Error("Scan the dataset again: that image is not in the list.")
        path = images[evt.index]
        parsed = parse_folder_name(path.parent.name)
        text, error = _caption_of(path, scan["ext"], parsed[1] if parsed else "")
        return str(path), text, f"✗ {error}" if error else "", evt.index

    gallery.select(pick, [scanned], [image_path, caption, caption_status, selected], api_name="pick_image")

    @user_errors
    def do_save(scan, index, text):
        if index is None or not 0 <= index < len(scan["images"]):
            raise gr.Error("Click an image first.")
        image, cap_ext = scan["images"][index], scan["ext"]
        if cap_ext.lower() not in CAPTION_EXTENSIONS:
            raise gr.Error(
                f"The GUI saves captions only as {' or '.join(CAPTION_EXTENSIONS)} files, not {cap_ext!r}: "
                "set the caption extension and check the dataset again."
            )
        image = settings.data_dir(image, "image")  # still inside, and not swapped for a link since
        target = image.with_name(image.stem + cap_ext)
        if target.resolve().parent != image.parent:
            raise gr.Error(f"{target} links to another folder; edit it outside the GUI.")
        target.write_text(text.strip() + "\n", encoding="utf-8")
        f = scan["folders"]  # the folders the gallery shows, not what the boxes say now
        *shown, new_scan, _ = do_scan(f["train"], f["reg"], f["ext_text"], f["bad"], *f.get("options", []))
        still = new_scan["images"].index(image) if image in new_scan["images"] else None
        return f"Saved {target}", *shown, new_scan, still

    save_caption.click(
        do_save,
        [scanned, selected, caption],
        [caption_status, *scan_outputs],
        api_name="save_caption",
    )

    cap_outputs = build_captioning(
        settings,
        [train_dir, caption_ext],
        lambda *values: scan_and_clear(*values),
        [train_dir, reg_dir, caption_ext, bad_images, *(step_inputs[n] for n in STEP_OPTIONS)],
        [*scan_outputs, image_path, caption, caption_status],
    )

    with gr.Accordion("Make regularization images (the base model draws the class prompt)", open=False):
        with gr.Row():
            reg_model = gr.Textbox(value=settings.model, label="Base model", scale=3, elem_id="reg-model")
            class_prompt = gr.Textbox(
                label="Class prompt", info="e.g. 'bear' for '20_usu bear'", scale=2, elem_id="reg-class"
            )
            guess = gr.Button("From the training folder", scale=1)
        with gr.Row():
            reg_count = gr.Number(value=50, precision=0, minimum=1, label="Images", elem_id="reg-count")
            reg_out = gr.Textbox(
                label="Into folder", info="images go to <folder>/1_<class prompt>", elem_id="reg-out"
            )
            reg_steps = gr.Number(value=20, precision=0, minimum=1, label="Steps", elem_id="reg-steps")
            model_d = model_defaults_of(settings.model)
            reg_size = gr.Number(
                value=model_d.resolution[0] if model_d else 512,
                precision=0,
                minimum=64,
                step=8,
                label="Size (px)",
                info="the base model's native size unless you change it",
                elem_id="reg-size",
            )
        reg_note = gr.Markdown(size_note(settings.model, what=": Size is set from it"), elem_id="reg-note")
        make = gr.Button("Make regularization images", elem_id="reg-make")
        reg_status = gr.Markdown(elem_id="reg-status")
        reg_gallery = gr.Gallery(label="Regularization images", columns=8, height=240, allow_preview=False)

    @user_errors
    def do_guess(train):
        from ..generate.reg_images import class_prompt_from_folder

        if not train:
            raise gr.Error("Give the training folder first.")
        root = settings.data_dir(train, "training image folder")
        subs = [p for p in sorted(root.iterdir()) if p.is_dir()] if root.is_dir() else []
        if not subs:
            raise gr.Error("Give the training folder first.")
        return class_prompt_from_folder(subs[0]), str(Path(train).parent / "reg")

    guess.click(do_guess, [train_dir], [class_prompt, reg_out])

    reg_applied = gr.State(settings.model)  # the model Size was last set from

    # The notes read only a model inside the model roots (Settings.model_path), never any host file.
    def pick_model(model, last):
        readable = settings.known_model(model)
        d = model_defaults_of(readable)
        if d is None or model == last:
            return gr.skip(), gr.skip(), last
        return d.resolution[0], size_note(readable, what=": Size is set from it"), model

    def size_changed(model, size):
        side = int(size or 0)
        return size_note(settings.known_model(model), (side, side) if side else None, ": Size is set from it")

    for event in (reg_model.blur, reg_model.submit):  # left or Enter: typed, pasted or dropped alike
        event(pick_model, [reg_model, reg_applied], [reg_size, reg_note, reg_applied], show_progress="hidden")
    reg_size.change(size_changed, [reg_model, reg_size], [reg_note], show_progress="hidden")

    @user_errors
    def do_make(model, prompt, count, out, steps, size, progress=gr.Progress()):
        from ..generate.params import GenerationParams
        from ..generate.pipeline import Generator
        from ..generate.reg_images import make_reg_images, reg_folder

        if not model:
            raise gr.Error("Give the base model.")
        model_path = settings.model_path(model)
        if not out:
            raise gr.Error("Give the folder for the regularization images.")
        if any(c in (prompt or "") for c in "/\\") or ".." in (prompt or ""):
            raise gr.Error(
                "The class prompt names the folder 1_<class prompt>: leave out '/', '\\' and '..'."
            )
        settings.data_dir(reg_folder(out, prompt or ""), "regularization folder")
        params = GenerationParams(steps=int(steps), width=int(size), height=int(size), seed=0)
        params.check()
        progress(0, desc="loading the model")
        gen = Generator.from_path(model_path)
        made = make_reg_images(
            gen, prompt, int(count), out, params, on_progress=lambda d, n: progress((d, n), desc="drawing")
        )
        folder = reg_folder(out, prompt)
        root = folder.parent
        thumbs = [(thumbnail(p, 128), p.name) for p in made[:48]]
        return f"{len(made)} images in {folder}", thumbs, str(root)

    make.click(
        do_make,
        [reg_model, class_prompt, reg_count, reg_out, reg_steps, reg_size],
        [reg_status, reg_gallery, reg_dir],
        api_name="make_reg_images",
    )
    return {
        "train_dir": train_dir,
        "reg_dir": reg_dir,
        "caption_ext": caption_ext,
        "scan": scan,
        "step_inputs": step_inputs,
        **cap_outputs,
    }


def caption_summary(report, ext: str, top: int = 40) -> str:
    """Markdown: written and skipped counts, broken images, the tag frequencies."""
    lines = [f"**Wrote {len(report.written)} caption file(s)** ({ext})."]
    lines += [f"- {note}" for note in report.notes]
    if report.skipped:
        lines.append(
            f"- Skipped {len(report.skipped)} image(s) that already have a {ext} caption "
            "(tick Overwrite to replace them)."
        )
    lines += [f"- ⚠ skipped broken image {p.name}: {why}" for p, why in report.broken]
    if report.empty:
        lines.append(f"- {len(report.empty)} image(s) got no tag above the threshold: no file written.")
    if report.tag_frequency:
        shown = [f"{n:5d}  {tag}" for tag, n in report.tag_frequency.most_common(top)]
        lines.append("\nTag frequencies:\n\n```\n" + "\n".join(shown) + "\n```")
    return "\n".join(lines)


def build_captioning(settings: Settings, folder_inputs, rescan, rescan_inputs, rescan_outputs) -> dict:
    """The "Caption images" section: a tagger or captioning model folder from the model roots, the
    training folder from the data roots, the caption extension only .caption or .txt."""
    with gr.Accordion("Caption the images with your own tagger or captioning model", open=False):
        with gr.Row():
            model = gr.Textbox(
                label="Tagger or captioning model folder",
                info="a WD14 tagger (model.onnx + selected_tags.csv, e.g. SmilingWolf/wd-vit-tagger-v3's) "
                "or a BLIP/GIT folder saved with save_pretrained, in a --model_dir folder",
                scale=3,
                elem_id="cap-model",
            )
            trigger = gr.Textbox(
                label="Trigger word (first in every caption)",
                info="e.g. 'usu bear'; train with keep_tokens = 1",
                scale=2,
                elem_id="cap-trigger",
            )
        with gr.Row():
            thresh = gr.Slider(0.05, 1.0, value=0.35, step=0.01, label="Tag threshold", elem_id="cap-thresh")
            undesired = gr.Textbox(label="Undesired tags (comma-separated)", elem_id="cap-undesired")
            underscore = gr.Checkbox(value=True, label="long_hair -> long hair", elem_id="cap-underscore")
            overwrite = gr.Checkbox(value=False, label="Overwrite existing captions", elem_id="cap-overwrite")
        run = gr.Button("Caption images", elem_id="cap-run")
        status = gr.Markdown(elem_id="cap-status")

    @user_errors
    def do_caption(train, ext_text, model_text, trigger_text, threshold, undesired_text, no_underscore,
                   replace, progress=gr.Progress()):  # fmt: skip
        from ..caption.natural import TextOptions
        from ..caption.run import caption_folder, find_images, load_captioner
        from ..caption.wd14 import TagOptions

        if not train:
            raise gr.Error("Give the training image folder first.")
        folder = settings.data_dir(train, "training image folder")
        ext = _ext(ext_text)
        if ext.lower() not in CAPTION_EXTENSIONS:
            raise gr.Error(
                f"The GUI writes captions only as {' or '.join(CAPTION_EXTENSIONS)} files, not {ext!r}: "
                "set the caption extension."
            )
        model_dir = settings.model_folder(model_text, "tagger or captioning model folder")
        notes: list[str] = []
        images = []
        for p in find_images(folder):  # a kohya folder's <repeats>_<prompt> subfolders, or the folder itself
            try:  # a link out of the data folders is not followed: nothing is written there
                images.append(settings.data_dir(p, "image"))
            except LoraKitError:
                notes.append(f"left out {p.name}: it links outside the folders this GUI may use")
        threshold = float(threshold if threshold is not None else 0.35)
        tag_opts = TagOptions(
            general_threshold=threshold,
            character_threshold=threshold,
            undesired_tags=frozenset(t.strip() for t in (undesired_text or "").split(",") if t.strip()),
            remove_underscore=bool(no_underscore),
        )
        progress(0, desc="loading the model")
        captioner = load_captioner(model_dir, tag_opts, TextOptions())
        report = caption_folder(
            folder,
            captioner,
            caption_extension=ext,
            overwrite=bool(replace),
            always_first_tags=[t for t in (trigger_text or "").split(",") if t.strip()],
            images=images,
            on_progress=lambda d, n: progress((d, n), desc="captioning"),
        )
        report.notes[:0] = notes
        return caption_summary(report, ext)

    run.click(
        do_caption,
        [*folder_inputs, model, trigger, thresh, undesired, underscore, overwrite],
        [status],
        api_name="caption_images",
    ).success(rescan, rescan_inputs, rescan_outputs)  # the gallery shows the new captions
    return {"caption_model": model, "caption_run": run}
