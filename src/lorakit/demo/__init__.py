"""lorakit's demo world: a tiny SD1.x-family model pretrained on procedurally drawn animals.

`lorakit.demo.world` draws the world and the instance character (the "usu bear"),
`lorakit.demo.metric` tells what a (generated) picture shows without any network access,
`lorakit.demo.workflow` runs the whole user story on it (`lorakit quickstart`), and
`DEMO_MODEL` is the shipped base model (an LDM single file, load it with load_base_model) and
`DEMO_SDXL_MODEL` its SDXL-family sibling (an SGM single file, tools/pretrain_demo_sdxl.py).
"""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_MODEL = ASSETS / "lorakit-demo-sd1.safetensors"
DEMO_SDXL_MODEL = ASSETS / "lorakit-demo-sdxl.safetensors"
METRIC_WEIGHTS = ASSETS / "metric.safetensors"


def load_demo_model(dtype=None):
    """The shipped demo base model as a lorakit BaseModel (fp32 unless `dtype`)."""
    import torch

    from lorakit.models.loader import load_base_model

    return load_base_model(DEMO_MODEL, dtype=dtype or torch.float32)


def load_demo_sdxl_model(dtype=None):
    """The shipped SDXL-family demo base model as a lorakit BaseModel (fp32 unless `dtype`)."""
    import torch

    from lorakit.models.loader import load_base_model

    return load_base_model(DEMO_SDXL_MODEL, dtype=dtype or torch.float32)
