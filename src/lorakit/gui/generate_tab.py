"""Generate tab: A1111's txt2img fields, and a LoRA gallery whose cards add `<lora:name:1>` to the prompt."""

from __future__ import annotations

import threading
from pathlib import Path

import gradio as gr

from ..generate.loras import for_family, list_loras
from ..generate.params import MAX_SIDE, GenerationParams
from ..generate.samplers import all_names
from .common import Settings, is_state_file, model_defaults_of, placeholder, size_note, thumbnail, user_errors

SET_FROM = ": Width and Height are set from it"
_GENERATORS: dict[tuple[str, str], object] = {}
_LOCK = threading.Lock()


def generator(model: str, lora_dir: str):
    """One loaded base model at a time, kept between requests."""
    from ..generate.pipeline import Generator

    key = (str(Path(model).absolute()), str(lora_dir))
    with _LOCK:
        if key not in _GENERATORS:
            _GENERATORS.clear()
            _GENERATORS[key] = Generator.from_path(model, lora_dir)
        return _GENERATORS[key]


def preview_of(path: Path):
    """A1111's card picture: <name>.png / <name>.preview.png beside the file, else its latest sample."""
    for cand in (path.with_suffix(".png"), path.with_name(path.stem + ".preview.png")):
        if cand.is_file() and (im := thumbnail(cand, 256)) is not None:
            return im
    samples = sorted((path.parent / "sample").glob(f"{path.stem}_*.png"), key=lambda p: p.stat().st_mtime)
    if samples and (im := thumbnail(samples[-1], 256)) is not None:
        return im
    return placeholder(path.stem)


def lora_cards(lora_dir: Path, family: str | None = None) -> tuple[list, list[str]]:
    """Cards of the LoRAs for base-model family `family` (None: every LoRA)."""
    loras = for_family([lf for lf in list_loras(lora_dir) if not is_state_file(lf.path)], family)
    return [(preview_of(lf.path), lf.name) for lf in loras], [lf.name for lf in loras]


def family_of_model(model: str | None) -> str | None:
    """The family key of a base model ("sd1", "sdxl"), None when it cannot be read."""
    d = model_defaults_of(model) if model else None
    return d.family.key if d is not None and d.family is not None else None


def add_lora_tag(prompt: str, name: str) -> str:
    tag = f"<lora:{name}:1>"
    if tag in prompt:
        return prompt
    return f"{prompt.rstrip()} {tag}".strip() if prompt.strip() else tag


def build(settings: Settings) -> dict:
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            model = gr.Dropdown(
                settings.model_choices(),
                value=settings.model,
                allow_custom_value=True,
                label="Base model (pick one, or type a path)",
                elem_id="gen-model",
            )
            prompt = gr.Textbox(
                label="Prompt",
                lines=3,
                placeholder="usu bear, in the snow <lora:my-lora:0.8>",
                elem_id="gen-prompt",
            )
            negative = gr.Textbox(label="Negative prompt", lines=2, elem_id="gen-negative")
            with gr.Row():
                sampler = gr.Dropdown(
                    all_names(), value="DPM++ 2M", label="Sampling method", elem_id="gen-sampler"
                )
                steps = gr.Slider(1, 150, value=20, step=1, label="Sampling steps", elem_id="gen-steps")
            model_d = model_defaults_of(settings.model)
            w, h = model_d.resolution if model_d else (512, 512)  # the model's native size
            with gr.Row():
                width = gr.Slider(64, MAX_SIDE, value=w, step=8, label="Width", elem_id="gen-width")
                height = gr.Slider(64, MAX_SIDE, value=h, step=8, label="Height", elem_id="gen-height")
            size_md = gr.Markdown(size_note(settings.model, what=SET_FROM), elem_id="gen-note")
            with gr.Row():
                cfg = gr.Slider(1, 30, value=7, step=0.5, label="CFG scale", elem_id="gen-cfg")
                rescale = gr.Slider(
                    0, 1, value=0, step=0.05, label="CFG rescale (v-pred bases: 0.7)", elem_id="gen-rescale"
                )
                seed = gr.Number(value=-1, precision=0, label="Seed (-1 = random)", elem_id="gen-seed")
                batch_count = gr.Number(value=1, precision=0, minimum=1, label="Batch count")
                batch_size = gr.Number(value=1, precision=0, minimum=1, label="Batch size")
                rng = gr.Dropdown(
                    ["GPU", "CPU"],
                    value="GPU",
                    label="Random number source",
                    info="as A1111's setting: GPU (its default) or CPU; a seed means the same image",
                    elem_id="gen-rng",
                )
            with gr.Row():
                gr.Markdown(f"**LoRAs** in `{settings.lora_dir}` — click a card to add it to the prompt")
                show_all = gr.Checkbox(
                    False,
                    label="Show LoRAs of other model families",
                    info="by default only those made for the base model's family (SD1.x / SDXL), as A1111",
                    scale=0,
                    elem_id="gen-lora-all",
                )
                refresh = gr.Button("Refresh", size="sm", scale=0, elem_id="gen-lora-refresh")
            cards = gr.Gallery(
                columns=6,
                height=230,
                allow_preview=False,
                show_label=False,
                fit_columns=False,
                elem_id="gen-loras",
            )
        with gr.Column(scale=2):
            go = gr.Button("Generate", variant="primary", elem_id="gen-go")
            images = gr.Gallery(label="Images", columns=2, height=420, elem_id="gen-images")
            info = gr.Textbox(label="Parameters", lines=5, interactive=False, elem_id="gen-info")
    names = gr.State([])
    infos = gr.State([])

    def do_refresh(model_path=None, every=False):
        family = None if every else family_of_model(settings.known_model(model_path or settings.model))
        items, card_names = lora_cards(settings.lora_dir, family)
        return items, card_names

    refresh.click(do_refresh, [model, show_all], [cards, names])
    show_all.change(do_refresh, [model, show_all], [cards, names])

    def pick(prompt_text, card_names, evt: gr.SelectData):
        return add_lora_tag(prompt_text, card_names[evt.index])

    cards.select(pick, [prompt, names], [prompt])

    applied = gr.State(settings.model)  # the model Width and Height were last set from

    # The notes read only a model inside the model roots (Settings.model_path), never any host file.
    def pick_model(model, last):
        readable = settings.known_model(model)
        d = model_defaults_of(readable)
        if d is None or model == last:
            return gr.skip(), gr.skip(), gr.skip(), last
        return d.resolution[0], d.resolution[1], size_note(readable, what=SET_FROM), model

    def size_changed(model, w, h):
        return size_note(settings.known_model(model), (int(w), int(h)) if w and h else None, SET_FROM)

    for event in (model.blur, model.select):  # picked, or typed/pasted and left
        event(pick_model, [model, applied], [width, height, size_md, applied], show_progress="hidden")
        event(do_refresh, [model, show_all], [cards, names], show_progress="hidden")
    for slider in (width, height):
        slider.change(size_changed, [model, width, height], [size_md], show_progress="hidden")

    @user_errors
    def do_generate(model_path, p, n, smp, st, w, h, c, rs, sd, bc, bs, rg="GPU", progress=gr.Progress()):
        from ..generate.txt2img import check_request, run_txt2img

        if not p.strip():
            raise gr.Error("The prompt is empty: say what to draw.")
        if not model_path:
            raise gr.Error("Give the base model.")
        model_path = settings.model_path(model_path)
        params = GenerationParams(
            prompt=p, negative_prompt=n, sampler=smp, steps=int(st), width=int(w), height=int(h),
            cfg_scale=float(c), cfg_rescale=float(rs or 0), seed=int(sd if sd is not None else -1),
            batch_count=int(bc or 1),
            batch_size=int(bs or 1), rng="cpu" if rg == "CPU" else "gpu",
        )  # fmt: skip
        check_request(params, settings.lora_dir)
        progress(0, desc="loading the model")
        gen = generator(str(model_path), str(settings.lora_dir))
        progress(0.1, desc="drawing")
        items = run_txt2img(gen, params, settings.outputs_dir)
        texts = [it.infotext for it in items]
        return [(it.image, f"seed {it.seed}") for it in items], texts[0] if texts else "", texts

    go.click(
        do_generate,
        [
            model,
            prompt,
            negative,
            sampler,
            steps,
            width,
            height,
            cfg,
            rescale,
            seed,
            batch_count,
            batch_size,
            rng,
        ],
        [images, info, infos],
        api_name="generate",
    )

    def show_info(texts, evt: gr.SelectData):
        return texts[evt.index] if texts and evt.index < len(texts) else ""

    images.select(show_info, [infos], [info])

    return {"refresh": (do_refresh, [model, show_all], [cards, names]), "prompt": prompt}
