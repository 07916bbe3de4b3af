"""The training loop's guarantees: what it loads, when it stops, what it never writes."""

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.train.trainer import build_trainer


def test_network_weights_load_unrounded_under_bf16(train_config, tmp_path):
    """The file's fp32 values reach the fp32 LoRA exactly, not rounded through the bf16 base."""
    shapes = build_trainer(train_config()).network.kohya_state_dict()
    g = torch.Generator().manual_seed(0)
    # 1 + u * 2^-10 needs more than bf16's 8 (and fp16's 11) mantissa bits
    weights = {
        k: (v if k.endswith(".alpha") else 1 + torch.rand(v.shape, generator=g) * 2**-10)
        for k, v in shapes.items()
    }
    assert any((w.bfloat16().float() != w).any() for w in weights.values())
    file = tmp_path / "start.safetensors"
    save_file(weights, str(file))
    tr = build_trainer(train_config(mixed_precision="bf16", network_weights=str(file)))
    loaded = tr.network.kohya_state_dict()
    assert loaded.keys() == weights.keys()
    for k, w in weights.items():
        assert loaded[k].dtype == torch.float32, k
        assert torch.equal(loaded[k], w), k
