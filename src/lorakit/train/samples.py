"""Sample images while training: kohya's sample_prompts, drawn with the LoRA as it is now."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import TrainConfig, resolution_of


def read_training_sample_prompts(cfg: TrainConfig) -> list:
    """The prompts with kohya's defaults at the training resolution; checked before training starts."""
    from ..generate.params import GenerationParams
    from ..generate.sample_prompts import read_sample_prompts
    from ..generate.samplers import split_name

    sc = cfg.sample
    if not sc.sample_prompts:
        return []
    split_name(sc.sample_sampler)  # an unknown name fails now, not after the first epoch
    w, h = resolution_of(cfg.dataset.resolution)
    defaults = GenerationParams(
        width=w,
        height=h,
        steps=30,
        cfg_scale=7.5,
        sampler=sc.sample_sampler,
        clip_skip=cfg.model.clip_skip or 1,
    )
    return read_sample_prompts(sc.sample_prompts, defaults)


def draw_training_samples(
    base, cfg: TrainConfig, prompts: list, epoch: int | None = None, step: int | None = None
):
    """Draw into output_dir/sample with the training models (LoRA layers active), then back to training."""
    from ..generate.pipeline import Generator
    from ..generate.sample_prompts import draw_samples

    models = (base.unet, *base.text_encoders)
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    # any family (SD1.x, SDXL); the schedule is the base's own (zero terminal SNR if it is marked so)
    gen = Generator.from_base(
        base,
        model_path=Path(cfg.model.pretrained_model_name_or_path),
        prediction_type="v_prediction" if cfg.model.v_parameterization else "epsilon",
    )
    try:
        with torch.no_grad():
            folder = Path(cfg.output.output_dir) / "sample"
            return draw_samples(gen, prompts, folder, cfg.output.output_name, epoch=epoch, step=step)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
