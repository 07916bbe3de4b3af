"""Device -> host copies of many tensors with one sync: saving a LoRA or a state from the GPU.

`t.cpu()` per tensor waits for the GPU once per tensor (hundreds of waits for a LoRA); here the
tensors of one device and dtype are joined into one flat buffer on the device and copied once.
"""

from __future__ import annotations

from typing import Any

import torch


def tensors_to_cpu(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The same dict (same key order) with every tensor on the CPU, contiguous and owning its memory
    (safetensors refuses tensors that share it). CPU and meta tensors are kept as they are."""
    out: dict[str, torch.Tensor] = {}
    groups: dict[tuple[torch.device, torch.dtype], list[str]] = {}
    for key, t in tensors.items():
        if t.device.type in ("cpu", "meta"):
            out[key] = t if t.is_meta else t.contiguous()
        else:
            groups.setdefault((t.device, t.dtype), []).append(key)
    for keys in groups.values():
        flat = torch.cat([tensors[k].detach().reshape(-1) for k in keys]).cpu()  # the one sync
        parts = flat.split([tensors[k].numel() for k in keys])
        for key, part in zip(keys, parts):
            out[key] = part.view(tensors[key].shape).clone()
    return {key: out[key] for key in tensors}


def nested_to_cpu(obj: Any) -> Any:
    """`obj` (dicts, lists and tuples of tensors and plain values: an optimizer's state_dict) with
    every tensor on the CPU, moved by one `tensors_to_cpu`."""
    found: dict[str, torch.Tensor] = {}

    def collect(x: Any) -> Any:
        if isinstance(x, torch.Tensor):
            key = str(len(found))
            found[key] = x
            return _Slot(key)
        if isinstance(x, dict):
            return {k: collect(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return type(x)(collect(v) for v in x)
        return x

    shape = collect(obj)
    moved = tensors_to_cpu(found)

    def fill(x: Any) -> Any:
        if isinstance(x, _Slot):
            return moved[x.key]
        if isinstance(x, dict):
            return {k: fill(v) for k, v in x.items()}
        if isinstance(x, list | tuple):
            return type(x)(fill(v) for v in x)
        return x

    return fill(shape)


class _Slot:
    __slots__ = ("key",)

    def __init__(self, key: str) -> None:
        self.key = key
