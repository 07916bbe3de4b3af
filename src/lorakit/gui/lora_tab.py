"""LoRA tab: what a LoRA file is and how it was trained (its kohya metadata)."""

from __future__ import annotations

import gradio as gr

from ..generate.loras import list_loras
from .common import Settings, is_state_file, user_errors


def lora_files(settings: Settings) -> list[str]:
    return [str(lf.path) for lf in list_loras(settings.lora_dir) if not is_state_file(lf.path)]


def build(settings: Settings) -> dict:
    with gr.Row():
        path = gr.Dropdown(
            lora_files(settings),
            label="LoRA file (pick one, or type a path)",
            allow_custom_value=True,
            scale=4,
            elem_id="lora-path",
        )
        refresh = gr.Button("Refresh", scale=0)
        inspect = gr.Button("Inspect", variant="primary", scale=1, elem_id="lora-inspect")
    with gr.Row(equal_height=False):
        table = gr.Code(label="Summary", language=None, lines=18, elem_id="lora-table")
        meta = gr.JSON(label="As JSON (lorakit inspect --json)")

    @user_errors
    def do_inspect(p):
        from ..network.inspect import format_table, inspect_lora

        info = inspect_lora(settings.lora_path(p))  # only a LoRA in the GUI's folders is read
        return format_table(info), info

    inspect.click(do_inspect, [path], [table, meta], api_name="lora_inspect")
    path.select(do_inspect, [path], [table, meta])
    do_refresh = (lambda: gr.update(choices=lora_files(settings)), None, [path])
    refresh.click(*do_refresh)
    return {"refresh": do_refresh}
