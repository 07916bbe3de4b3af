"""Optimizers (kohya's names) and learning-rate schedules (diffusers' get_scheduler)."""

from __future__ import annotations

import ast
import math

import torch

from ..config import TrainingConfig
from ..errors import ConfigError

SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial")


def parse_kwargs(items: list[str], field: str) -> dict:
    """['weight_decay=0.1', 'betas=(0.9,0.99)'] -> dict, values as Python literals (like kohya)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise ConfigError(f"{field}: {item!r} is not key=value")
        k, v = (s.strip() for s in item.split("=", 1))
        try:
            out[k] = ast.literal_eval(v)
        except (ValueError, SyntaxError):
            out[k] = v
    return out


def part_learning_rates(cfg: TrainingConfig, family) -> dict[str, float]:
    """Text-encoder part -> lr: SD1's one encoder at text_encoder_lr; SDXL's CLIP-L at text_encoder_lr,
    bigG at text_encoder_lr2 (kohya's second text_encoder_lr value), else the first."""
    rates = (cfg.text_encoder_learning_rate, cfg.text_encoder_2_learning_rate)
    return {part: rates[min(i, 1)] for i, part in enumerate(family.text_encoder_parts)}


def lora_param_groups(network, rates: dict[str, float]) -> list[dict]:
    """One optimizer group per trained part (U-Net first, then the text encoders), each at its own lr
    (kohya's prepare_optimizer_params); a part at lr 0, or without LoRA modules, gets no group."""
    groups = []
    for part, lr in rates.items():
        params = network.parameters(part=part)
        if params and lr > 0:
            groups.append({"params": params, "lr": lr})
    return groups


def missing_package_message(optimizer_type: str, package: str | None) -> str:
    # double quotes: the one quoting that bash, PowerShell and cmd.exe all read the same
    every = 'pip install "lorakit[optim]"'
    if not package:
        return f"optimizer_type {optimizer_type!r} needs a package that is missing: {every}"
    hint = " (0.43 or newer has Windows wheels: no build needed)" if package == "bitsandbytes" else ""
    return (
        f"optimizer_type {optimizer_type!r} needs the package {package!r}: pip install {package}{hint}, "
        f"or every optimizer at once: {every}"
    )


def build_optimizer(cfg: TrainingConfig, param_groups: list[dict]) -> tuple[torch.optim.Optimizer, str]:
    """(optimizer, kohya-style description for ss_optimizer)."""
    kwargs = parse_kwargs(cfg.optimizer_args, "optimizer_args")
    name = cfg.optimizer_type.lower()
    try:
        if name == "adamw":
            cls = torch.optim.AdamW
        elif name == "adamw8bit":
            import bitsandbytes as bnb

            cls = bnb.optim.AdamW8bit
        elif name == "adafactor":  # kohya's: transformers' Adafactor, lr given (relative_step off)
            from transformers.optimization import Adafactor as cls

            kwargs.setdefault("relative_step", False)
            kwargs.setdefault("scale_parameter", False)
            kwargs.setdefault("warmup_init", False)
        elif name == "lion":
            from lion_pytorch import Lion as cls
        elif name == "prodigy":
            from prodigyopt import Prodigy as cls
        else:
            raise ConfigError(
                f"optimizer_type {cfg.optimizer_type!r} is unknown; use AdamW, AdamW8bit, Adafactor, Lion or Prodigy"
            )
    except ImportError as e:
        raise ConfigError(missing_package_message(cfg.optimizer_type, e.name)) from None
    args = ",".join(f"{k}={v}" for k, v in kwargs.items())  # ss_optimizer: what the user chose
    if cls is torch.optim.AdamW and "fused" not in kwargs and "foreach" not in kwargs:
        kwargs.update(
            adamw_speed_flags(param_groups, fp16=cfg.mixed_precision == "fp16", graph=cfg.cuda_graph)
        )
    if cls is torch.optim.AdamW and cfg.cuda_graph:
        kwargs["capturable"] = True  # its step count and lr live on the device, where a graph reads them
    try:
        opt = cls(param_groups, lr=cfg.learning_rate, **kwargs)
    except TypeError as e:
        raise ConfigError(f"optimizer_args {cfg.optimizer_args}: {e}") from None
    return opt, f"{cls.__module__}.{cls.__name__}({args})"


def adamw_speed_flags(param_groups: list[dict], fp16: bool = False, graph: bool = False) -> dict[str, bool]:
    """AdamW over all LoRA tensors at once: `fused` (one kernel for the whole update) where every tensor
    is on a CUDA device, else `foreach` (a few multi-tensor ops, not several per tensor; on the CPU
    the same numbers as the per-tensor loop). Not fused under fp16: the grad scaler hands a fused
    AdamW the overflow flag and it skips the step itself, so accelerate would not see the skip and the
    LR scheduler would step anyway. A recorded step (cuda_graph) is fused on any device: the tests'
    CPU stand-in for a graph then runs the update a GPU records."""
    if graph:
        return {"fused": True}
    devices = {p.device.type for g in param_groups for p in g["params"]}
    return {"fused": True} if devices == {"cuda"} and not fp16 else {"foreach": True}


def warmup_steps(cfg: TrainingConfig, total_steps: int) -> int:
    w = cfg.lr_warmup_steps
    return int(w * total_steps) if 0 < w < 1 else int(w)


def build_lr_scheduler(cfg: TrainingConfig, optimizer, total_steps: int):
    from diffusers.optimization import get_scheduler

    if cfg.lr_scheduler not in SCHEDULERS:
        raise ConfigError(f"lr_scheduler {cfg.lr_scheduler!r} is unknown; use one of {', '.join(SCHEDULERS)}")
    warmup = warmup_steps(cfg, total_steps)
    if cfg.lr_scheduler == "constant" and warmup > 0:
        raise ConfigError("lr_scheduler 'constant' takes no lr_warmup_steps: use constant_with_warmup")
    kwargs = {}
    if cfg.lr_scheduler == "cosine_with_restarts":
        kwargs["num_cycles"] = cfg.lr_scheduler_num_cycles
    if cfg.lr_scheduler == "polynomial":
        kwargs["power"] = cfg.lr_scheduler_power
    return get_scheduler(
        cfg.lr_scheduler, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps, **kwargs
    )


def steps_and_epochs(cfg: TrainingConfig, batches_per_epoch: int) -> tuple[int, int, int]:
    """(optimizer steps per epoch, total steps, epochs); max_train_epochs wins over max_train_steps."""
    per_epoch = max(1, math.ceil(batches_per_epoch / cfg.gradient_accumulation_steps))
    if cfg.max_train_epochs:
        total = cfg.max_train_epochs * per_epoch
    else:
        total = cfg.max_train_steps
    return per_epoch, total, math.ceil(total / per_epoch)


SPEED_FLAGS = ("fused", "foreach", "capturable")


def speed_flags(optimizer) -> list[dict]:
    """Each group's fused/foreach/capturable settings (this run's choice)."""
    return [{k: g[k] for k in SPEED_FLAGS if k in g} for g in optimizer.param_groups]


def restore_speed_flags(optimizer, flags: list[dict]) -> None:
    """After load_state_dict, which takes the saved run's settings: this run's again, each AdamW step
    count moved where they want it (on the parameter's device when fused or capturable, else on the
    CPU), so a state saved with cuda_graph resumes without it and the other way round."""
    for group, chosen in zip(optimizer.param_groups, flags):
        group.update(chosen)
        if not isinstance(optimizer, torch.optim.AdamW):  # others keep their step counts their way
            continue
        on_device = group.get("fused") or group.get("capturable")
        for p in group["params"]:
            step = optimizer.state.get(p, {}).get("step")
            if torch.is_tensor(step):
                device = p.device if on_device else torch.device("cpu")
                optimizer.state[p]["step"] = step.to(device=device, dtype=torch.float32)
