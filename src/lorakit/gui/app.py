"""The Gradio app: five tabs over lorakit's Python API, served on 127.0.0.1 unless told otherwise."""

from __future__ import annotations

import sys
from pathlib import Path

import gradio as gr

from . import dataset_tab, generate_tab, lora_tab, tools_tab, train_tab
from .common import Settings

__all__ = ["Settings", "build_app", "launch"]

CSS = """
.lk-status { padding: 10px 12px; border: 1px solid var(--border-color-primary); border-radius: 8px; }
.lk-state { display: inline-block; padding: 1px 8px; border-radius: 10px; font-weight: 600;
            color: white; background: #64748b; text-transform: uppercase; font-size: 0.8em; }
.lk-running { background: #2563eb; } .lk-done { background: #16a34a; }
.lk-stopped { background: #d97706; } .lk-error { background: #dc2626; }
.lk-nums { margin-top: 6px; font-variant-numeric: tabular-nums; }
.lk-bar { height: 10px; margin: 8px 0 4px; background: var(--background-fill-secondary);
          border-radius: 5px; overflow: hidden; }
.lk-bar > div { height: 100%; background: #2563eb; transition: width 0.4s; }
.lk-msg { font-size: 0.9em; opacity: 0.85; white-space: pre-wrap; }
.lk-lora code { word-break: break-all; }
.lk-problem h3 { color: #dc2626; }
.lk-pre { white-space: pre-wrap; font-size: 0.9em; }
.lk-notice { padding: 6px 10px; border-radius: 8px; border: 1px solid var(--border-color-primary); }
.lk-notice-running { border-color: #2563eb; } .lk-notice-error { border-color: #dc2626; }
/* Train tab checkboxes keep room for their label and help: a full row wraps instead of squeezing them */
.lk-check { min-width: 170px !important; }
/* sample labels in full (which step, which prompt), wrapped over the picture */
#train-samples .caption-label { white-space: normal; overflow-wrap: anywhere; text-overflow: clip;
                                max-width: none; left: var(--block-label-margin); }
"""

INTRO = """\
# lorakit
Train a kohya-compatible Stable Diffusion 1.x or SDXL LoRA, watch it learn, and draw with it.
**1 · Dataset**: point at your image folders and check them. **2 · Train**: set up and press Train —
progress, loss and samples show up live, and training goes on if you close the page.
**3 · Generate**: click your LoRA's card to use it. **Tools**: merge, resize, extract and convert LoRAs.
"""


def theme() -> gr.themes.Theme:
    # System fonts only: the default theme would fetch web fonts from a CDN, which breaks offline use.
    return gr.themes.Default(
        font=["ui-sans-serif", "system-ui", "sans-serif"], font_mono=["ui-monospace", "monospace"]
    )


def build_app(settings: Settings | None = None) -> gr.Blocks:
    settings = settings or Settings()
    with gr.Blocks(title="lorakit", analytics_enabled=False) as demo:
        gr.Markdown(INTRO, elem_id="lk-intro")
        notice = gr.HTML(elem_id="lk-job-notice")  # the latest run, whatever tab is open
        with gr.Tabs(elem_id="lk-tabs"):
            with gr.Tab("1 · Dataset", id="dataset", elem_id="tab-dataset"):
                ds = dataset_tab.build(settings)
            with gr.Tab("2 · Train", id="train", elem_id="tab-train") as train_tab_item:
                tr = train_tab.build(settings, notice=notice)
            with gr.Tab("3 · Generate", id="generate", elem_id="tab-generate") as gen_tab:
                gen = generate_tab.build(settings)
            with gr.Tab("LoRA info", id="lora", elem_id="tab-lora") as info_tab:
                info = lora_tab.build(settings)
            with gr.Tab("Tools", id="tools", elem_id="tab-tools") as tools_tab_item:
                tools = tools_tab.build(settings)

        # The Dataset tab's folders are the Train tab's folders.
        fields = tr["fields"]
        ds["train_dir"].input(lambda v: v, ds["train_dir"], fields["train_data_dir"])
        ds["reg_dir"].change(lambda v: v, ds["reg_dir"], fields["reg_data_dir"])
        ds["caption_ext"].input(lambda v: v, ds["caption_ext"], fields["caption_extension"])
        # The step math and the size check use the Train tab's resolution, batch size and epochs.
        mirrored = [n for n in ds["step_inputs"] if n in fields]
        for name in mirrored:
            fields[name].change(lambda v: v, fields[name], ds["step_inputs"][name], show_progress="hidden")
        if mirrored:  # and start from the Train tab's values, not the widgets' own defaults
            demo.load(
                lambda *v: v if len(v) > 1 else v[0],
                [fields[n] for n in mirrored],
                [ds["step_inputs"][n] for n in mirrored],
                show_progress="hidden",
            )
        gen_tab.select(*gen["refresh"])
        info_tab.select(*info["refresh"])
        tools_tab_item.select(*tools["refresh"])
        for event in tools["done"]:  # a new LoRA or checkpoint shows in the other tabs' lists too
            event.success(*gen["refresh"], show_progress="hidden")
            event.success(*info["refresh"], show_progress="hidden")

        # The log box shows its newest line once its tab is shown (it may have filled while hidden).
        train_tab_item.select(None, None, None, js=tr["follow_log_js"])
        # A page (re)opened during a run stays on the tab it opens on; the notice above says where to look.
        demo.load(*tr["on_load"]).then(*tr["record_model"]).then(*tr["memory"])
        demo.load(*gen["refresh"])
    return demo


def launch(
    settings: Settings | None = None,
    host: str = "127.0.0.1",
    port: int = 7860,
    auth: tuple[str, str] | None = None,
    block: bool = True,
) -> gr.Blocks:
    from starlette.middleware import Middleware

    from .guard import LOOPBACK_HOSTS, LoginLimiter, RequestGuard

    settings = settings or Settings()
    for d in (settings.lora_dir, settings.runs_dir, settings.outputs_dir):
        Path(d).mkdir(parents=True, exist_ok=True)
    demo = build_app(settings)
    demo.queue(default_concurrency_limit=1)
    # On a loopback address only pages of this server may talk to it (no DNS rebinding); under
    # --listen the Host is whatever name the machine is reached by, and --auth guards it.
    check_host = host in (*LOOPBACK_HOSTS, "::1")
    guard = Middleware(RequestGuard, check_host=check_host, limiter=LoginLimiter() if auth else None)
    demo.launch(
        app_kwargs={"middleware": [guard]},
        server_name=host,
        server_port=port,
        auth=auth,
        share=False,
        inbrowser=False,
        prevent_thread_lock=True,
        quiet=True,
        show_error=True,
        ssr_mode=False,
        footer_links=["settings"],
        theme=theme(),
        css=CSS,
    )
    shown = "127.0.0.1" if host in ("127.0.0.1", "localhost") else host
    print(f"lorakit GUI: http://{shown}:{demo.server_port}/", flush=True)
    sys.stdout.flush()
    if block:
        try:
            demo.block_thread()
        except KeyboardInterrupt:
            pass
        finally:
            demo.close()
    return demo
