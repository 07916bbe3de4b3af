"""lorakit's demo world: a tiny SD1.x-family model pretrained on procedurally drawn animals.

`lorakit.demo.world` draws the world and the instance character (the "usu bear"),
`lorakit.demo.metric` tells what a (generated) picture shows without any network access,
`lorakit.demo.workflow` runs the whole user story on it (`lorakit quickstart`), and
`DEMO_MODEL` is the shipped base model (an LDM single file, load it with load_base_model).
"""

from pathlib import Path

ASSETS = Path(__file__).resolve().parent / "assets"
DEMO_MODEL = ASSETS / "lorakit-demo-sd1.safetensors"
METRIC_WEIGHTS = ASSETS / "metric.safetensors"


def load_demo_model(dtype=None):
    """The shipped demo base model as a lorakit BaseModel (fp32 unless `dtype`)."""
    import torch

    from lorakit.models.loader import load_base_model

    return load_base_model(DEMO_MODEL, dtype=dtype or torch.float32)
