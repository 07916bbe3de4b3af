"""Issue 12.4/12.6 on the trainer's side: latents cached in VAE batches equal those encoded one by
one (kohya's vae_batch_size), and the model the trainer loads is already in its dtypes."""

from __future__ import annotations

import pytest
import torch


def _cached(make, **kw):
    from lorakit.train.trainer import build_trainer

    cfg = make(cache_latents=True, seed=3, **kw)
    trainer = build_trainer(cfg)
    latents = trainer.dataset._latents
    trainer.output_lock and trainer.output_lock.release()
    return trainer, latents


def test_vae_batches_give_the_latents_of_one_by_one_encoding(train_config):
    _, one = _cached(train_config, vae_batch_size=1)
    calls = []
    from lorakit.train import trainer as trainer_module

    encode = trainer_module.Trainer._encode_pixels

    def counting(self, pixels, generator=None):
        calls.append(len(pixels))
        return encode(self, pixels, generator)

    trainer_module.Trainer._encode_pixels = counting
    try:
        _, four = _cached(train_config, vae_batch_size=4)
    finally:
        trainer_module.Trainer._encode_pixels = encode
    assert max(calls) == 4 and len(calls) < len(one)  # batched for real
    assert set(one) == set(four) and len(one) == 4
    for path in one:  # same posterior draws per image: only the conv's summation order differs
        torch.testing.assert_close(four[path].latents, one[path].latents, rtol=1e-4, atol=1e-5)


def test_vae_batch_size_must_be_positive(train_config):
    from lorakit.errors import ConfigError

    with pytest.raises(ConfigError, match="vae_batch_size must be at least 1"):
        train_config(vae_batch_size=0).validate()


def test_the_trainer_loads_the_base_in_its_compute_dtypes(train_config):
    trainer, _ = _cached(train_config, mixed_precision="bf16")
    assert _frozen_dtypes(trainer.base.unet) == {torch.bfloat16}
    assert _frozen_dtypes(trainer.base.text_encoder) == {torch.bfloat16}
    assert _frozen_dtypes(trainer.base.vae) == {torch.bfloat16}  # bf16: no fp32 VAE rule
    assert {p.dtype for p in trainer.network.parameters()} == {torch.float32}  # the LoRA in the UNet
    trainer16, _ = _cached(train_config, mixed_precision="fp16")
    assert _frozen_dtypes(trainer16.base.vae) == {torch.float32}  # SD's VAE overflows in fp16
    assert _frozen_dtypes(trainer16.base.unet) == {torch.float16}


def _frozen_dtypes(model) -> set:
    return {p.dtype for p in model.parameters() if not p.requires_grad}


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
def test_the_memory_estimate_is_logged_once_before_training_for_every_base(
    suffix, train_config, tiny_base, tmp_path, monkeypatch, caplog
):
    """A .safetensors or folder tells its family from the header (logged before the load); a .ckpt's
    family is known once it is loaded, and is logged then."""
    import logging

    from lorakit.models.checkpoint import read_state_dict
    from lorakit.train import memory_estimate

    base = tiny_base
    if suffix == ".ckpt":
        sd, metadata = read_state_dict(tiny_base)
        base = tmp_path / "tiny.ckpt"
        torch.save({"state_dict": sd, **metadata}, base)
    monkeypatch.setattr(memory_estimate, "FULL_SIZE_BYTES", 0)  # the tiny base counts as full-size
    with caplog.at_level(logging.INFO):
        _cached(train_config, pretrained_model_name_or_path=str(base))
    assert caplog.text.count("GPU memory estimate: about") == 1
