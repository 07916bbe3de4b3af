"""Train tab: the kohya_ss layout (Source model / Folders / Training parameters) filling TrainConfig,
and a live view of the background job (lorakit.train.job): progress, it/s, ETA, loss, samples, log.
"""

from __future__ import annotations

import functools
import html
import re
import typing
from pathlib import Path

import gradio as gr

from ..config import TrainConfig, base_type, field_index, resolution_of
from ..errors import ConfigError, LoraKitError
from ..presets import list_presets, load_preset
from ..train.job import Job, latest_job, start_job
from .base_model import (
    AUTO_FIELDS,
    auto_defaults,
    changes_note,
    check_trainable,
    family_line,
    refusal,
    switch_defaults,
)
from .common import Settings, model_defaults_of, size_note, thumbnail, user_errors
from .guard import config_file, inside

LABELS = {
    "pretrained_model_name_or_path": "Pretrained model (SD1.x or SDXL .safetensors/.ckpt, or diffusers folder)",
    "v_parameterization": "v-parameterization",
    "zero_terminal_snr": "Zero terminal SNR",
    "vae": "VAE (optional; e.g. the SDXL fp16-fix VAE)",
    "no_half_vae": "No half VAE",
    "cache_text_encoder_outputs": "Cache text encoder outputs",
    "text_encoder_lr2": "Text encoder 2 (bigG) learning rate",
    "enable_bucket": "Enable buckets",
    "min_bucket_reso": "Minimum bucket resolution",
    "max_bucket_reso": "Maximum bucket resolution",
    "clip_skip": "Clip skip",
    "train_data_dir": "Image folder",
    "reg_data_dir": "Regularisation folder",
    "conditioning_data_dir": "Mask folder (conditioning_data_dir, for masked loss)",
    "output_dir": "Output folder",
    "output_name": "Output name",
    "logging_dir": "Logging folder (TensorBoard)",
    "train_batch_size": "Train batch size",
    "max_train_epochs": "Epochs",
    "max_train_steps": "Max train steps",
    "network_dim": "Network rank (dimension)",
    "network_alpha": "Network alpha",
    "learning_rate": "Learning rate",
    "unet_lr": "U-Net learning rate",
    "text_encoder_lr": "Text encoder learning rate",
    "mixed_precision": "Mixed precision",
    "resolution": "Max resolution",
    "optimizer_type": "Optimizer",
    "lr_scheduler": "LR scheduler",
    "seed": "Seed",
    "save_every_n_epochs": "Save every N epochs",
    "sample_every_n_epochs": "Sample every N epochs",
    "sample_every_n_steps": "Sample every N steps",
    "sample_at_first": "Sample before training",
    "sample_sampler": "Sample sampler",
    "progress_every_n_steps": "Report loss every N steps",
}
WIDE = {"pretrained_model_name_or_path", "train_data_dir", "reg_data_dir", "output_dir", "logging_dir", "vae"}
GROUPS = {
    "Source model": ["pretrained_model_name_or_path", "v_parameterization", "zero_terminal_snr", "clip_skip"],
    "Folders": ["train_data_dir", "reg_data_dir", "output_dir", "output_name", "logging_dir"],
    "Training parameters": [
        "train_batch_size", "max_train_epochs", "max_train_steps", "network_dim", "network_alpha",
        "learning_rate", "unet_lr", "text_encoder_lr", "mixed_precision", "resolution",
        "enable_bucket", "min_bucket_reso", "max_bucket_reso",
        "optimizer_type", "lr_scheduler", "seed", "save_every_n_epochs", "progress_every_n_steps",
    ],
    # kohya_ss GUI's "SDXL Specific Parameters"; opens by itself when an SDXL base is picked
    "SDXL": ["vae", "no_half_vae", "cache_text_encoder_outputs", "text_encoder_lr2"],
    "Samples while training": ["sample_every_n_epochs", "sample_every_n_steps", "sample_at_first", "sample_sampler"],
    # the validation loss, plotted beside the training loss: is it still learning, or overfitting?
    "Validation loss": ["validation_split", "validation_data_dir", "validate_every_n_steps", "validate_every_n_epochs"],
}  # fmt: skip
CHOICES = {
    "optimizer_type": ["AdamW", "AdamW8bit", "Adafactor", "Lion", "Prodigy"],
    "lr_scheduler": [
        "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
    ],
    "sample_sampler": ["ddim", "euler_a", "euler", "dpmsolver++", "k_dpm_2", "lms", "heun", "pndm"],
}  # fmt: skip
# Set by the GUI itself: save_state is always on (Stop -> Resume), resume is the Resume button,
# the sample prompts are the text box, network_args is folded into its typed fields (conv_dim, algo, ...).
HIDDEN = {"save_state", "resume", "sample_prompts", "network_args", "save_model_as"}


# Presets are TOML files shipped in lorakit/presets (the same `lorakit train --preset NAME` reads):
# the menu lists their names, the note under it their description.
def preset_note_of(name: str | None) -> str:
    """The note under the preset menu: the preset's own description."""
    return f"**{name}**: {list_presets()[name]}" if name in list_presets() else ""


def make_field(name: str, f, value):
    """One widget per option, chosen by its type; the help text is the hint under it."""
    tp, optional = base_type(f.type)
    kw = {"label": LABELS.get(name, name), "info": f.metadata["help"], "elem_id": f"cfg-{name}"}
    if name in WIDE:
        kw.update(scale=2, min_width=320)
    if tp is bool:  # .lk-check (app.CSS): wide enough for its label
        return gr.Checkbox(value=bool(value), elem_classes=["lk-check"], **kw)
    if typing.get_origin(tp) is typing.Literal:
        return gr.Dropdown(list(typing.get_args(tp)), value=value, **kw)
    if name in CHOICES:
        return gr.Dropdown(CHOICES[name], value=value, allow_custom_value=True, **kw)
    if tp in (int, float) and not optional:
        return gr.Number(value=value, precision=0 if tp is int else None, **kw)
    return gr.Textbox(value=to_text(value), **kw)  # strings, lists, and optional numbers (empty = unset)


def to_text(value) -> str:
    if value is None:
        return ""
    if isinstance(value, list):
        return " ".join(value)
    return str(value)


def widget_value(name: str, value):
    """A config value as its widget shows it."""
    _, f = field_index()[name]
    tp, optional = base_type(f.type)
    if tp is bool or typing.get_origin(tp) is typing.Literal or name in CHOICES:
        return value
    if tp in (int, float) and not optional:
        return value
    return to_text(value)


def config_from_widgets(names: list[str], values: list) -> TrainConfig:
    flat = {}
    for name, value in zip(names, values):
        if isinstance(value, str):
            value = value.strip()
        flat[name] = value
    return TrainConfig.from_dict(flat, source="Train tab")


def read_text(path: str | None) -> str:
    if path and Path(path).is_file():
        return Path(path).read_text(encoding="utf-8")
    return ""


def check_folders(cfg: TrainConfig, settings: Settings) -> None:
    """The dataset folders lie in the data roots and the outputs in the output roots (see Settings)."""
    d, o = cfg.dataset, cfg.output
    settings.model_path(cfg.model.pretrained_model_name_or_path, "pretrained_model_name_or_path")
    for what, value in (("network_weights", cfg.network.network_weights), ("vae", cfg.model.vae)):
        if value:  # loaded as weights only, but still never a file outside the model roots
            settings.model_path(value, what)
    data_dirs = (("train_data_dir", d.train_data_dir), ("reg_data_dir", d.reg_data_dir))
    more = (
        ("validation_data_dir", d.validation_data_dir),
        ("conditioning_data_dir", d.conditioning_data_dir),
    )
    for what, value in (*data_dirs, *more):
        if value:
            settings.data_dir(value, what)
    hint = "start `lorakit gui --data_dir FOLDER` to allow another one, or use the LoRA folder"
    for what, value in (("output_dir", o.output_dir), ("logging_dir", o.logging_dir)):
        if value:
            inside(value, settings.output_roots(), what, hint)
    if any(c in o.output_name for c in "/\\") or o.output_name in ("", ".", ".."):
        raise ConfigError(f"output_name {o.output_name!r}: a file name without a folder, e.g. 'my-lora'")


# --- the job view ---------------------------------------------------------------------


def _duration(s: float) -> str:
    s = int(max(s, 0))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def status_html(job: Job | None) -> str:
    if job is None:
        return "<div class='lk-status'><b>No training yet.</b> Fill in the settings and press <b>Train</b>.</div>"
    st = job.status()
    rows = job.progress(with_previous=True)
    last = rows[-1] if rows else None
    state = st["state"]
    pct = 100.0 * last["step"] / max(last["total_steps"], 1) if last else 0.0
    if state == "done":
        pct = 100.0
    parts = [f"<span class='lk-state lk-{state}'>{state}</span> <b>{html.escape(job.name)}</b>"]
    if last:
        loss = f"{last['loss']:.4f}" if last.get("loss") is not None else "–"
        val = last.get("validation_loss")
        val = f" · validation loss <b class='lk-val'>{val:.4f}</b>" if val is not None else ""
        parts.append(
            f"<div class='lk-nums'>step <b class='lk-step'>{last['step']}/{last['total_steps']}</b> · "
            f"epoch {last['epoch']}/{last['total_epochs']} · {last['its']:.2f} it/s · "
            f"ETA {_duration(last['eta_s']) if state == 'running' else '–'} · loss {loss}{val} · "
            f"lr {last['lr']:.2e}</div>"
        )
    parts.append(f"<div class='lk-bar'><div style='width:{pct:.1f}%'></div></div>")
    parts.append(f"<div class='lk-msg'>{html.escape(st.get('message') or '')}</div>")
    if st.get("lora_path"):
        parts.append(f"<div class='lk-lora'>LoRA: <code>{html.escape(st['lora_path'])}</code></div>")
    return "<div class='lk-status'>" + "".join(parts) + "</div>"


def loss_frame(job: Job | None):
    """The run's loss curve in long form (step, loss, series = "training" | "validation"): the
    training loss of every report, and each new validation loss at the step it was measured (later
    reports carry the last one again)."""
    import pandas as pd

    rows = job.progress(with_previous=True) if job else []
    pts = [(r["step"], r["loss"], "training") for r in rows if r.get("loss") is not None]
    last_val = None
    for r in rows:
        val = r.get("validation_loss")
        if val is not None and val != last_val:
            pts.append((r["step"], val, "validation"))
        last_val = val
    return pd.DataFrame(
        {
            "step": pd.Series([p[0] for p in pts], dtype="int64"),
            "loss": pd.Series([p[1] for p in pts], dtype="float64"),
            "series": pd.Series([p[2] for p in pts], dtype="object"),
        }
    )


def model_note(model: str, resolution: str, changes: str = "") -> str:
    """The base model's family, native size and learning rate (picking it fills in the fields that
    follow it, see base_model.py), what it just changed, and a warning when the resolution is far
    from the native size."""
    d = model_defaults_of(model)
    if d is None:
        return ""
    if refusal(d.family):
        return family_line(d)
    try:
        size = resolution_of(resolution)
    except ConfigError:
        size = None
    lr = f", learning rate **{d.learning_rate:g}** ({d.learning_rate_source})"
    parts = [family_line(d), size_note(model, size, lr)]
    if changes:
        parts.insert(1, changes)
    return "\n\n".join(parts)


def sample_label(path: Path) -> str:
    """'step 40 · <prompt>' for kohya's <name>_000040_00_<time>.png (epochs: 'epoch 2 · ...')."""
    from ..generate.pnginfo import parse_parameters, read_png_parameters

    m = re.search(r"_(e?)(\d{6})_(\d{2})_\d{14}$", path.stem)
    when = (f"epoch {int(m.group(2))}" if m.group(1) else f"step {int(m.group(2))}") if m else path.stem
    try:
        prompt = parse_parameters(read_png_parameters(path) or "")[0]
    except Exception:  # a sample being written, or without PNG info: its time is still worth showing
        prompt = ""
    return f"{when} · {prompt}" if prompt else when


STATE_MESSAGES = {
    "running": "Training **{name}**. You may close this page: training goes on, and the page shows it again.",
    "done": "✓ **{name}** finished.",
    "stopped": "■ **{name}** stopped: **Resume** continues it.",
    "error": "✗ **{name}** stopped with an error: see the status and the log.",
}

# Keeps the log box at its newest line unless the user scrolled up to read (Gradio's own autoscroll
# loses the end when the box filled while its tab was hidden).
FOLLOW_LOG_JS = """() => { setTimeout(() => {
  const ta = document.querySelector('#train-log textarea');
  if (!ta) return;
  if (!ta.dataset.lkFollow) {
    ta.dataset.lkFollow = '1';
    ta.addEventListener('scroll', () => {
      if (ta.clientHeight) ta.dataset.lkPinned = ta.scrollTop + ta.clientHeight >= ta.scrollHeight - 24 ? '1' : '0';
    });
  }
  if (ta.dataset.lkPinned !== '0') ta.scrollTop = ta.scrollHeight;
}, 60); }"""


def job_notice(job: Job | None) -> str:
    """The line above the tabs about the latest run: the page never switches tabs by itself."""
    if job is None:
        return ""
    st = job.status()
    rows = job.progress()
    step = (
        f" — step {rows[-1]['step']}/{rows[-1]['total_steps']}" if rows and st["state"] == "running" else ""
    )
    what = "is training" if st["state"] == "running" else f"ended: {st['state']}"
    return (
        f"<div class='lk-notice lk-notice-{st['state']}'>● Run <b>{html.escape(job.name)}</b> {what}{step}"
        " · see the <b>2 · Train</b> tab</div>"
    )


# --- the memory estimate (lorakit.train.memory_estimate) ------------------------------------

# the options the estimate reads: a change to any of them redraws it
MEMORY_FIELDS = (
    "pretrained_model_name_or_path", "resolution", "train_batch_size", "network_dim", "conv_dim",
    "network_train_unet_only", "network_train_text_encoder_only", "unet_lr", "text_encoder_lr",
    "text_encoder_lr2", "gradient_checkpointing", "cache_text_encoder_outputs", "cache_latents",
    "cache_latents_to_disk", "optimizer_type", "mixed_precision", "vae_batch_size", "no_half_vae", "vae",
    "cache_text_encoder_outputs_to_disk", "network_alpha", "conv_alpha",  # (the last two: the scale note)
)  # fmt: skip
CARD_SIZES = (4, 6, 8, 10, 12, 16, 20, 24, 32, 40, 48, 80, 96, 141)
DETECTED = "the detected GPU"


@functools.lru_cache(maxsize=1)
def detected_gpu_gib() -> float | None:
    """The first CUDA device's memory in GiB, or None without one (or without torch's CUDA); asked once."""
    try:
        import torch

        if torch.cuda.is_available():
            return torch.cuda.get_device_properties(0).total_memory / 2**30
    except Exception:  # a broken driver must not break the page: the user picks a card instead
        return None
    return None


def card_choices() -> list[str]:
    gpu = detected_gpu_gib()
    first = f"{DETECTED} ({gpu:.0f} GB)" if gpu else f"{DETECTED} (none found)"
    return [first, *(f"{n} GB" for n in CARD_SIZES)]


def card_gib(choice: str | None) -> float | None:
    if not choice or choice.startswith(DETECTED):
        return detected_gpu_gib()
    return float(choice.split()[0])


def estimate_family(model: str) -> tuple[str, str]:
    """(estimate family, words for the note): SDXL for an SDXL-family base, else SD1.5 (the
    estimate's models are the full-size ones: a small model such as the demo needs far less)."""
    d = model_defaults_of(model)
    family = getattr(getattr(d, "family", None), "key", None)
    if family == "sdxl":
        return "sdxl", "SDXL"
    path = Path(model or "")
    if path.is_file() and path.stat().st_size < 1_000_000_000:
        return "sd1", "a full-size SD1.5 model (this base is much smaller: it needs far less)"
    return "sd1", "SD1.5" if family in ("sd1", None) else f"SD1.5 (the nearest to {d.family.name})"


def memory_note(cfg: TrainConfig, model: str, card: str | None) -> str:
    """'GPU memory: about N GB' for the settings, and a warning when it exceeds the card."""
    from ..train.memory_estimate import estimate_for_config

    family, words = estimate_family(model)
    est = estimate_for_config(cfg, family)
    size = card_gib(card)
    text = (
        f"**GPU memory: about {est.device_gib:.1f} GB** for {words} at these settings "
        f"({est.peak_gib:.1f} GB allocated at the peak: weights {est.weights_gib:.1f}, LoRA + optimizer "
        f"{est.lora_gib:.2f}, activations {est.activations_gib:.1f}). An estimate, fitted to runs "
        "measured on an H200."
    )
    if size and est.device_gib > size:
        text += (
            f"\n\n⚠ More than the {size:.0f} GB card: turn on gradient checkpointing, cache text encoder "
            "outputs (with U-Net only), AdamW8bit, or lower the batch size or resolution."
        )
    elif size:
        text += f" Fits the {size:.0f} GB card."
    return text + "\n\n" + scale_note(cfg)


def scale_note(cfg: TrainConfig) -> str:
    """The LoRA's effective scale, alpha / dim (kohya's rule: the learning rate acts through it)."""
    n = cfg.network
    text = f"LoRA scale alpha / dim = {n.network_alpha:g} / {n.network_dim} = {n.network_alpha / n.network_dim:.3g}"
    if n.conv_dim:
        default = n.network_alpha if n.network_module == "lycoris.kohya" else 1.0  # as each trains
        conv_alpha = n.conv_alpha if n.conv_alpha is not None else default
        text += f"; 3x3 convs {conv_alpha:g} / {n.conv_dim} = {conv_alpha / n.conv_dim:.3g}"
    return text + " (a smaller scale needs a larger learning rate for the same change)."


def build(settings: Settings, notice: gr.components.Component | None = None) -> dict:
    index = field_index()
    defaults = TrainConfig().flat()
    defaults.update(
        pretrained_model_name_or_path=settings.model,
        output_dir=str(settings.lora_dir),
        output_name="my-lora",
        sample_every_n_epochs=1,
    )
    model_d = model_defaults_of(settings.model)
    if model_d is not None and refusal(model_d.family):
        model_d = None  # a model lorakit refuses sets nothing; the note says why
    # the demo model trains at 64 px with 1e-3, SD1.5 at 512 with 1e-4, SDXL at 1024 with 2048 buckets
    start_auto = auto_defaults(model_d, defaults["mixed_precision"])
    defaults.update(start_auto)
    groups = {}
    fields: dict[str, gr.components.Component] = {}
    with gr.Row(equal_height=False):
        with gr.Column(scale=3):
            with gr.Row():
                preset = gr.Dropdown(
                    list(list_presets()),
                    label="Preset (base family, card memory, goal)",
                    info="the files `lorakit train --list_presets` shows; picking one shows what it is for",
                    value=None,
                    scale=3,
                    elem_id="train-preset",
                )
                apply_preset = gr.Button("Apply preset", scale=1)
            preset_note = gr.Markdown(elem_id="train-preset-note")
            with gr.Row():
                config_path = gr.Textbox(
                    label="Config name (TOML, the same `lorakit train --config` reads)",
                    info=f"saved as {Path(settings.config_dir).absolute() / '<name>.toml'}",
                    value="lorakit-train",
                    scale=3,
                    elem_id="train-config-path",
                )
                save_cfg = gr.Button("Save config", scale=1, elem_id="train-save-config")
                load_cfg = gr.Button("Load config", scale=1, elem_id="train-load-config")
            is_sdxl = model_d is not None and getattr(model_d.family, "key", None) == "sdxl"
            for group, names in GROUPS.items():
                slug = re.sub(r"\W+", "-", group.lower())
                with gr.Accordion(
                    group, open=group != "SDXL" or is_sdxl, elem_id=f"train-group-{slug}"
                ) as acc:
                    groups[group] = acc
                    if group == "Samples while training":
                        sample_text = gr.Textbox(
                            label="Sample prompts (one per line; kohya options --n --w --h --s --l --d)",
                            lines=3,
                            placeholder="usu bear, in the snow --n blurry --s 20 --d 1",
                            elem_id="cfg-sample_prompts",
                        )
                    with gr.Row():
                        for name in names:
                            fields[name] = make_field(name, index[name][1], defaults[name])
                    if group == "Source model":
                        note = gr.Markdown(
                            model_note(settings.model, defaults["resolution"]), elem_id="cfg-model-note"
                        )
                        changes_md = gr.Markdown(elem_id="cfg-model-changes")
            with gr.Accordion("Advanced", open=False, elem_id="train-advanced"):
                shown = {n for names in GROUPS.values() for n in names} | HIDDEN
                rest = [n for n in index if n not in shown]
                for i in range(0, len(rest), 3):
                    with gr.Row():
                        for name in rest[i : i + 3]:
                            fields[name] = make_field(name, index[name][1], defaults[name])
                gr.Markdown(
                    "`save_state` is always on in the GUI, so that **Stop** keeps a state that "
                    "**Resume** continues from."
                )
        with gr.Column(scale=2):
            with gr.Row():
                train_btn = gr.Button("Train", variant="primary", elem_id="train-start")
                stop_btn = gr.Button("Stop", variant="stop", elem_id="train-stop")
                resume_btn = gr.Button("Resume", elem_id="train-resume")
            action_msg = gr.Markdown(elem_id="train-action")
            memory_md = gr.Markdown(elem_id="train-memory")
            card = gr.Dropdown(
                card_choices(),
                value=card_choices()[0],
                label="GPU memory to compare the estimate with",
                elem_id="train-card",
            )
            status = gr.HTML(status_html(None), elem_id="train-status")
            loss_plot = gr.LinePlot(
                x="step", y="loss", color="series", title="Loss (training and validation)", height=220,
                elem_id="train-loss", label="Loss",
            )  # fmt: skip
            samples = gr.Gallery(
                label="Latest samples",
                columns=2,
                height=360,
                allow_preview=True,
                fit_columns=False,
                elem_id="train-samples",
            )
            log_box = gr.Textbox(
                label="Log", lines=12, max_lines=12, autoscroll=True, interactive=False, elem_id="train-log"
            )
    names = list(fields)
    widgets = [fields[n] for n in names]
    seen = gr.State({})

    # --- the base model's defaults: a model the user picks moves the AUTO_FIELDS (resolution, learning
    # rate, buckets, no_half_vae, v-pred/ztsnr) that still hold the last model's defaults (`applied`);
    # values the user typed, loaded (config, run) or took from a preset stay, and the note says so
    model_box, resolution = fields["pretrained_model_name_or_path"], fields["resolution"]
    mixed_precision = fields["mixed_precision"]
    auto_widgets = [fields[n] for n in AUTO_FIELDS]
    applied = gr.State(start_auto)  # the model-dependent defaults now in the fields (base_model.py)

    # The notes read only a model inside the model roots (Settings.model_path), never any host file.
    def pick_model(model, last, precision, *current):
        """A new model (or mixed precision) moves the fields that still hold the last defaults."""
        readable = settings.known_model(model)
        d = model_defaults_of(readable)
        res = current[AUTO_FIELDS.index("resolution")]
        if d is None or refusal(d.family):  # nothing to go by, or a model lorakit refuses: change nothing
            return [gr.skip()] * len(AUTO_FIELDS) + [model_note(readable, res), "", last, gr.skip()]
        switch = switch_defaults(last or {}, auto_defaults(d, precision), dict(zip(AUTO_FIELDS, current)))
        values = [switch.updates.get(n, gr.skip()) for n in AUTO_FIELDS]
        res = switch.updates.get("resolution", res)
        sdxl = gr.update(open=True) if d.family is not None and d.family.key == "sdxl" else gr.skip()
        return [*values, model_note(readable, res), changes_note(switch, d), switch.applied, sdxl]

    def resolution_changed(model, res):
        return model_note(settings.known_model(model), res)

    pick = (
        pick_model,
        [model_box, applied, mixed_precision, *auto_widgets],
        [*auto_widgets, note, changes_md, applied, groups["SDXL"]],
    )
    for event in (model_box.blur, model_box.submit):  # left or Enter: typed, pasted or dropped alike
        event(*pick, show_progress="hidden")
    mixed_precision.input(*pick, show_progress="hidden")  # fp16 <-> bf16 moves No half VAE on SDXL
    resolution.change(resolution_changed, [model_box, resolution], [note], show_progress="hidden")

    def record(model, precision):
        """A loaded config's or run's values are the user's: the defaults in force are those of its model."""
        d = model_defaults_of(settings.known_model(model))
        return auto_defaults(None if d is None or refusal(d.family) else d, precision)

    record_model = (record, [model_box, mixed_precision], [applied])

    def show_memory(card_choice, *values):
        try:
            cfg = config_from_widgets(names, list(values))
            return memory_note(
                cfg, settings.known_model(cfg.model.pretrained_model_name_or_path), card_choice
            )
        except (ConfigError, ValueError) as e:  # half-typed settings: say what is wrong
            return f"GPU memory: no estimate for these settings ({e})."

    memory = (show_memory, [card, *widgets], [memory_md])
    for name in MEMORY_FIELDS:
        fields[name].change(*memory, show_progress="hidden")
    card.change(*memory, show_progress="hidden")
    log_box.change(None, None, None, js=FOLLOW_LOG_JS)

    # --- config in and out ------------------------------------------------------------
    def fill_from(cfg: TrainConfig, prompts: str):
        flat = cfg.flat()
        return [widget_value(n, flat[n]) for n in names] + [prompts]

    @user_errors
    def do_preset(name, *values):
        if not name:
            raise gr.Error("Pick a preset first.")
        cfg = config_from_widgets(names, list(values[:-1]))
        cfg.update(load_preset(name), source=f"preset {name!r}")
        return fill_from(cfg, values[-1])

    apply_preset.click(do_preset, [preset, *widgets, sample_text], [*widgets, sample_text]).then(
        *record_model
    )
    preset.change(preset_note_of, [preset], [preset_note], show_progress="hidden")

    # Only <config_dir>/<name>.toml (and its .sample_prompts.txt): the client names a config, not a path.
    @user_errors
    def do_save(name, *values):
        path = config_file(settings.config_dir, name)
        cfg = config_from_widgets(names, list(values[:-1]))
        path.parent.mkdir(parents=True, exist_ok=True)
        if values[-1].strip():
            prompts = path.with_suffix(".sample_prompts.txt")
            prompts.write_text(values[-1].strip() + "\n", encoding="utf-8")
            cfg.sample.sample_prompts = str(prompts)
        path.write_text(cfg.to_toml(), encoding="utf-8")
        return f"Saved {path} — `lorakit train --config {path}` runs the same training."

    save_cfg.click(do_save, [config_path, *widgets, sample_text], [action_msg], api_name="save_config")

    @user_errors
    def do_load(name):
        path = config_file(settings.config_dir, name)
        if not path.is_file():
            raise gr.Error(f"{path} does not exist: save a config under that name first.")
        cfg = TrainConfig.from_toml(path)
        return [*fill_from(cfg, read_text(cfg.sample.sample_prompts)), f"Loaded {path}"]

    load_cfg.click(do_load, [config_path], [*widgets, sample_text, action_msg], api_name="load_config").then(
        *record_model
    )

    # --- the job ----------------------------------------------------------------------
    @user_errors
    def do_train(*values):
        cfg = config_from_widgets(names, list(values[:-1]))
        check_folders(cfg, settings)
        model = cfg.model.pretrained_model_name_or_path
        check_trainable(model, model_defaults_of(settings.known_model(model)), values[-1])
        job = start_job(cfg, settings.runs_dir, sample_prompts_text=values[-1])
        return (
            f"Started **{job.name}**. You may close this page: training goes on, and the page shows it again."
        )

    train_btn.click(do_train, [*widgets, sample_text], [action_msg], api_name="train")

    def do_stop():
        job = latest_job(settings.runs_dir)
        if job is None or not job.is_running():
            return "Nothing is training."
        job.stop()
        return "Stopping: the trainer saves its state, then exits…"

    stop_btn.click(do_stop, None, [action_msg])

    @user_errors
    def do_resume():
        job = latest_job(settings.runs_dir)
        if job is None:
            raise gr.Error("There is no run to resume.")
        if job.state == "done":
            raise gr.Error(f"{job.name} has finished; there is nothing to resume.")
        new = job.resume(settings.runs_dir)
        return f"Resumed {job.name} as **{new.name}**, from `{new.config().output.resume}`."

    resume_btn.click(do_resume, None, [action_msg], api_name="resume")

    def refresh(seen):
        job = latest_job(settings.runs_dir)
        seen = dict(seen or {})
        out = [status_html(job)]
        frame = loss_frame(job)
        key = (job.name if job else None, len(frame))
        out.append(frame if seen.get("loss") != key else gr.skip())
        seen["loss"] = key
        sample_paths = job.samples()[-8:] if job else []
        key = [str(p) for p in sample_paths]
        if seen.get("samples") != key:
            out.append([(thumbnail(p, 512), sample_label(p)) for p in reversed(sample_paths)])
        else:
            out.append(gr.skip())
        seen["samples"] = key
        text = job.log_text() if job else ""
        out.append(text if seen.get("log") != text else gr.skip())
        seen["log"] = text
        running = bool(job and job.is_running())
        out += [gr.update(interactive=not running), gr.update(interactive=running)]
        out.append(gr.update(interactive=bool(job and job.state in ("stopped", "error"))))
        # the message under the buttons follows the run: "training goes on" never outlives it
        key, prev = ((job.name, job.state) if job else None), seen.get("state")
        # a run that just started keeps the message of the button that started it (Train, Resume)
        started_here = key and key[1] == "running" and "state" in seen and (prev is None or prev[0] != key[0])
        if key and key != prev and not started_here:
            out.append(STATE_MESSAGES.get(job.state, "**{name}**: " + job.state).format(name=job.name))
        else:
            out.append(gr.skip())
        seen["state"] = key
        if notice is not None:
            text = job_notice(job)
            out.append(text if seen.get("notice") != text else gr.skip())
            seen["notice"] = text
        return [*out, seen]

    refresh_outputs = [status, loss_plot, samples, log_box, train_btn, stop_btn, resume_btn, action_msg]
    refresh_outputs += [notice, seen] if notice is not None else [seen]
    timer = gr.Timer(1.0)
    timer.tick(refresh, [seen], refresh_outputs, show_progress="hidden")

    def on_load(seen):
        """A reopened page shows the latest run with the settings it was started with."""
        job = latest_job(settings.runs_dir)
        fill = [gr.skip()] * (len(widgets) + 1)
        if job is not None:
            try:
                cfg = job.config()
                fill = fill_from(cfg, read_text(cfg.sample.sample_prompts))
            except LoraKitError:
                pass
        return [*fill, *refresh({})]

    return {
        "fields": fields,
        "on_load": (on_load, [seen], [*widgets, sample_text, *refresh_outputs]),
        "follow_log_js": FOLLOW_LOG_JS,
        "record_model": record_model,  # after on_load: the loaded run's model is not a new pick
        "memory": memory,  # after on_load: the estimate of the settings the page shows
    }
