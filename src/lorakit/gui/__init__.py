"""lorakit's browser GUI (Gradio): widgets that fill the typed configs and call the Python API.

Gradio is an optional dependency (`pip install lorakit[gui]`). Importing this package turns
Gradio's analytics and version check off before Gradio itself is imported: the GUI never phones home.
"""

from __future__ import annotations

import os

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_SSR_MODE", "False")

__all__ = ["build_app", "launch"]


def build_app(*args, **kwargs):
    from .app import build_app

    return build_app(*args, **kwargs)


def launch(*args, **kwargs):
    from .app import launch

    return launch(*args, **kwargs)
