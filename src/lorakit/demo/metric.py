"""What does a picture show? A learning metric for the demo that needs no network.

A small CNN (about 150k parameters), trained by tools/pretrain_demo.py on the drawn world, tells
the world's classes (bear, cat, rabbit, bird, frog) and the instance character ("usu bear": a black
bear with a white crescent) apart. It was trained on clean, blurred, noisy and VAE-round-tripped
drawings, so it also reads the blurry 64x64 pictures the demo model generates.

    classify(images)        -> ["bear", "usu bear", ...]
    class_scores(images, c) -> probability that each picture shows class c
    instance_score(images)  -> how much each looks like the usu bear rather than a plain bear, in [0, 1]
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from lorakit.atomic import atomic_path
from lorakit.demo import METRIC_WEIGHTS
from lorakit.demo.world import CLASSES, INSTANCE_CLASS

LABELS = (*CLASSES, INSTANCE_CLASS)


class MetricNet(nn.Module):
    """RGB in [-1, 1] (read at 32x32: fine enough for the crescent, cheap on a CPU) -> logits over LABELS."""

    def __init__(self, width: int = 24, n_out: int = len(LABELS)):
        super().__init__()
        c = [3, width, width * 2, width * 4, width * 4]
        layers = []
        for i in range(4):
            layers += [nn.Conv2d(c[i], c[i + 1], 3, padding=1), nn.GroupNorm(4, c[i + 1]), nn.SiLU()]
            if i < 3:
                layers += [nn.MaxPool2d(2)]
        self.features = nn.Sequential(*layers)  # 4x4
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.2), nn.Linear(c[-1] * 16, n_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != 32 or x.shape[-2] != 32:
            x = F.interpolate(x, size=(32, 32), mode="bilinear", antialias=True, align_corners=False)
        return self.head(self.features(x))


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random blur, colour jitter and noise on a [B,3,64,64] batch in [-1, 1] (for training the metric)."""
    b = len(x)
    # blur: mix with a box-blurred copy
    k = int(torch.randint(1, 4, (1,), generator=g)) * 2 + 1
    blurred = F.avg_pool2d(F.pad(x, (k // 2,) * 4, mode="replicate"), k, stride=1)
    w = torch.rand(b, 1, 1, 1, generator=g)
    x = w * blurred + (1 - w) * x
    x = x * (1 + 0.15 * (torch.rand(b, 3, 1, 1, generator=g) - 0.5)) + 0.15 * (
        torch.rand(b, 3, 1, 1, generator=g) - 0.5
    )
    x = x + 0.08 * torch.rand(b, 1, 1, 1, generator=g) * torch.randn(x.shape, generator=g)
    # small shifts
    dx, dy = (int(v) for v in torch.randint(-4, 5, (2,), generator=g))
    x = torch.roll(x, shifts=(dy, dx), dims=(2, 3))
    return x.clamp(-1, 1)


def save_metric(net: MetricNet, path: str | Path = METRIC_WEIGHTS) -> Path:
    from safetensors.torch import save_file

    path = Path(path)
    sd = {k: v.detach().to(torch.float16).contiguous() for k, v in net.state_dict().items()}
    with atomic_path(path) as tmp:  # mode follows the umask (safetensors alone writes 0600)
        save_file(sd, str(tmp), metadata={"labels": ",".join(LABELS)})
    return path


@lru_cache(maxsize=2)
def load_metric(path: str | Path = METRIC_WEIGHTS) -> MetricNet:
    from safetensors.torch import load_file

    net = MetricNet()
    net.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return net.eval()


def _to_batch(images) -> torch.Tensor:
    if isinstance(images, torch.Tensor):  # [B,3,H,W] in [-1, 1]
        return images.float()
    a = np.stack([np.asarray(im.convert("RGB").resize((64, 64)), dtype=np.float32) for im in images])
    return torch.from_numpy(a).permute(0, 3, 1, 2) / 127.5 - 1


@torch.no_grad()
def probabilities(images, path: str | Path = METRIC_WEIGHTS) -> torch.Tensor:
    """[B, len(LABELS)] class probabilities for PIL images (any size, resized to 64x64)."""
    net = load_metric(path)
    x = _to_batch(images)
    return torch.cat([F.softmax(net(x[i : i + 256]), dim=-1) for i in range(0, len(x), 256)])


def classify(images, path: str | Path = METRIC_WEIGHTS) -> list[str]:
    """The most likely label of each picture (one of LABELS)."""
    return [LABELS[i] for i in probabilities(images, path).argmax(-1).tolist()]


def class_scores(images, label: str, path: str | Path = METRIC_WEIGHTS) -> list[float]:
    """Probability that each picture shows `label` (a class of the world or "usu bear")."""
    return probabilities(images, path)[:, LABELS.index(label)].tolist()


def instance_score(images, path: str | Path = METRIC_WEIGHTS) -> list[float]:
    """How much each picture looks like the usu bear rather than a plain bear: p(usu) / (p(usu) + p(bear))."""
    p = probabilities(images, path)
    usu, bear = p[:, LABELS.index(INSTANCE_CLASS)], p[:, LABELS.index("bear")]
    return (usu / (usu + bear + 1e-6)).tolist()
