"""Defaults that suit Windows: gloo where torch has no NCCL, bitsandbytes' install hint, advice that
names only options that exist."""

from __future__ import annotations

import re

import pytest
import torch

from lorakit import errors
from lorakit.config import field_index
from lorakit.train import trainer
from lorakit.train.optim import missing_package_message


@pytest.mark.parametrize(
    ("local_rank", "cuda", "nccl", "backend"),
    [
        ("0", True, False, "gloo"),  # torchrun / accelerate launch on Windows with CUDA
        ("1", True, True, None),  # Linux with CUDA: accelerate's NCCL
        ("0", False, False, None),  # CPU: accelerate's gloo
        (None, True, False, None),  # one process: no process group at all
    ],
)
def test_gloo_where_cuda_has_no_nccl(monkeypatch, local_rank, cuda, nccl, backend):
    if local_rank is None:
        monkeypatch.delenv("LOCAL_RANK", raising=False)
    else:
        monkeypatch.setenv("LOCAL_RANK", local_rank)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.distributed, "is_nccl_available", lambda: nccl)
    assert trainer.collective_backend() == backend


def test_the_trainer_hands_the_backend_to_accelerate(train_config, monkeypatch):
    import accelerate

    handed = []

    class Recording(accelerate.Accelerator):
        def __init__(self, *args, kwargs_handlers=None, **kwargs):
            handed.append(kwargs_handlers)
            super().__init__(*args, **kwargs)  # this test is one process: no process group to make

    monkeypatch.setattr(accelerate, "Accelerator", Recording)
    monkeypatch.setattr(trainer, "collective_backend", lambda: "gloo")
    trainer.build_trainer(train_config())
    monkeypatch.setattr(trainer, "collective_backend", lambda: None)
    trainer.build_trainer(train_config())
    assert [h[0].backend for h in handed[:1]] == ["gloo"] and handed[1] is None


def test_bitsandbytes_hint_works_in_every_shell():
    msg = missing_package_message("AdamW8bit", "bitsandbytes")
    assert "pip install bitsandbytes (0.43 or newer has Windows wheels" in msg
    assert "'lorakit[optim]'" not in msg and 'pip install "lorakit[optim]"' in msg  # cmd.exe keeps ' quotes
    assert "pip install lion_pytorch," in missing_package_message("Lion", "lion_pytorch")


def test_memory_advice_names_only_real_options():
    options = set(field_index())
    for advice in (errors.PAGING_FILE_ADVICE, errors.RAM_ADVICE, errors.GPU_ADVICE):
        named = re.findall(r"(\w+) = ", advice)
        assert named, advice
        assert set(named) <= options, set(named) - options  # each can be set as written
