"""A small DDIM sampler on the family seam (encode + predict, CFG), for checking demo models.

Independent of lorakit.generate on purpose: the demo build tool and the demo tests judge a model
with it before (and without) any pipeline. Epsilon prediction, kohya's/SD's noise schedule,
diffusers' DDIM "leading" timesteps (steps_offset 1, final alpha = alpha_bar(0)), eta 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from lorakit.models.schedule import sd_alphas_cumprod


def ddim_timesteps(steps: int) -> list[int]:
    """diffusers DDIMScheduler's timesteps for `steps` (spacing "leading", steps_offset 1): 951, 901, ... 1."""
    ratio = 1000 // steps
    return [i * ratio + 1 for i in range(steps)][::-1]


def ddim_step(x: torch.Tensor, eps: torch.Tensor, ts: Sequence[int], i: int) -> torch.Tensor:
    """One DDIM step (eta 0) from ts[i] to ts[i + 1], the last one to alpha_bar(0)."""
    acp = sd_alphas_cumprod()
    a = acp[ts[i]]
    a_prev = acp[ts[i + 1]] if i + 1 < len(ts) else acp[0]
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    return a_prev.sqrt() * x0 + (1 - a_prev).sqrt() * eps


@torch.no_grad()
def ddim_draw(
    base,
    prompt: str,
    seeds: Sequence[int],
    steps: int = 20,
    cfg_scale: float = 6.0,
    size: int = 64,
    negative: str = "",
) -> torch.Tensor:
    """[len(seeds), 3, size, size] pictures in [-1, 1] drawn for `prompt`, one per seed (noise from
    torch.Generator().manual_seed(seed), so a seed draws the same picture in any batch)."""
    spec = base.spec
    n = len(seeds)
    cond = spec.encode(base, [negative, prompt], None, None)  # row 0 unconditional, row 1 the prompt
    both = type(cond)(
        torch.cat([cond.context[:1].expand(n, -1, -1), cond.context[1:].expand(n, -1, -1)]),
        None
        if cond.pooled is None
        else torch.cat([cond.pooled[:1].expand(n, -1), cond.pooled[1:].expand(n, -1)]),
    )
    size_ids = torch.tensor([[size, size, 0, 0, size, size]] * (2 * n), dtype=torch.float32)
    f = 2 ** (len(base.vae.config.block_out_channels) - 1)
    shape = (4, size // f, size // f)
    x = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(int(s))) for s in seeds])
    ts = ddim_timesteps(steps)
    for i, t in enumerate(ts):
        eps_u, eps_c = spec.predict(base, torch.cat([x, x]), torch.full((2 * n,), t), both, size_ids).chunk(2)
        x = ddim_step(x, eps_u + cfg_scale * (eps_c - eps_u), ts, i)
    vae = base.vae
    return vae.decode(x.to(vae.dtype) / vae.config.scaling_factor).sample.float().clamp(-1, 1)
