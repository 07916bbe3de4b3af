"""Pretrain lorakit's demo base model (a tiny SD1.x-family model) and the demo metric on the drawn world.

Stages (each cached in --work, so a rerun resumes after the last finished stage):
  1. vae     AutoencoderKL, 64x64 RGB -> 8x8x4 latents (SD's 8x), L1 + MSE + a small KL term
  2. metric  a small CNN that tells the world's classes and the usu bear apart, trained on clean,
             blurred and VAE-round-tripped drawings (so it also reads blurry generated pictures)
  3. latents encode the world (never the usu bear) with the VAE
  4. diffusion  CLIPTextModel + UNet2DConditionModel, epsilon prediction with kohya's noise schedule
             (scaled_linear 0.00085..0.012, 1000 steps), 10% empty captions (for CFG)
Writes src/lorakit/demo/assets/lorakit-demo-sd1.safetensors (save_ldm_checkpoint, fp16) and
metric.safetensors.

    python tools/pretrain_demo.py            # about 26 min on a shared 2-core CPU
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from lorakit.demo import DEMO_MODEL, METRIC_WEIGHTS
from lorakit.demo import metric as M
from lorakit.demo import world as W
from lorakit.models.tiny import tiny_arch


def demo_arch() -> dict:
    """The demo model: lorakit's tiny SD1.x-family layout, wider, with cross-attention in both UNet blocks."""
    arch = tiny_arch()
    arch["unet"].update(
        block_out_channels=[64, 128],
        cross_attention_dim=64,
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
    )
    arch["vae"].update(
        block_out_channels=[16, 32, 32, 32]
    )  # scaling_factor: replaced by 1/std of the latents
    arch["text_encoder"].update(hidden_size=64, intermediate_size=256, projection_dim=64)
    return arch


DEMO_ARCH = demo_arch()


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def to_tensor(images) -> torch.Tensor:
    """PIL list -> [B,3,H,W] in [-1, 1]."""
    a = np.stack([np.asarray(im, dtype=np.float32) for im in images])
    return torch.from_numpy(a).permute(0, 3, 1, 2) / 127.5 - 1


def world_images(n: int, seed: int, with_instance: int = 0):
    imgs, caps, labels = [], [], []
    for i in range(n):
        im, cap, sc = W.world_sample(i, seed)
        imgs.append(im)
        caps.append(cap)
        labels.append(sc.animal)
    for i in range(with_instance):
        im, cap, _ = W.instance_sample(i, seed + 7919)
        imgs.append(im)
        caps.append(cap)
        labels.append(W.INSTANCE_CLASS)
    return imgs, caps, labels


# --------------------------------------------------------------------------- 1. VAE


def train_vae(arch, args, work: Path):
    from diffusers import AutoencoderKL

    out = work / "vae.pt"
    vae = AutoencoderKL.from_config(arch["vae"])
    if out.exists():
        vae.load_state_dict(torch.load(out))
        log("vae: cached")
        return vae.eval()
    torch.manual_seed(args.seed)
    imgs, _, _ = world_images(args.vae_images, seed=args.seed + 1)
    x_all = to_tensor(imgs)
    opt = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed)
    vae.train()
    t0 = time.time()
    for step in range(args.vae_steps):
        idx = torch.randint(0, len(x_all), (args.vae_batch,), generator=g)
        ox, oy = (int(v) for v in torch.randint(0, 33, (2,), generator=g))
        x = x_all[idx][:, :, oy : oy + 32, ox : ox + 32]  # random 32x32 crops: 4x cheaper, same convs
        post = vae.encode(x).latent_dist
        z = post.sample(generator=g)
        rec = vae.decode(z).sample
        kl = post.kl().mean() / z[0].numel()
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + args.vae_kl * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.vae_steps - 1:
            log(f"vae step {step} loss {loss.item():.4f} kl {kl.item():.2f} ({time.time() - t0:.0f}s)")
    vae.eval()
    torch.save(vae.state_dict(), out)
    return vae


# --------------------------------------------------------------------------- 2. metric


@torch.no_grad()
def roundtrip(vae, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    out = []
    for i in range(0, len(x), 256):
        post = vae.encode(x[i : i + 256]).latent_dist
        out.append(vae.decode(post.sample(generator=g)).sample.clamp(-1, 1))
    return torch.cat(out)


def train_metric(vae, args, work: Path):
    out = work / "metric.pt"
    net = M.MetricNet()
    if out.exists():
        net.load_state_dict(torch.load(out))
        log("metric: cached")
        return net.eval()
    torch.manual_seed(args.seed + 2)
    g = torch.Generator().manual_seed(args.seed + 2)
    n_inst = args.metric_images // len(M.LABELS)
    imgs, _, labels = world_images(args.metric_images, seed=args.seed + 2, with_instance=n_inst)
    x = to_tensor(imgs)
    y = torch.tensor([M.LABELS.index(lab) for lab in labels])
    xr = roundtrip(vae, x, g)  # blurry versions, as the VAE decodes them
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    net.train()
    t0 = time.time()
    for step in range(args.metric_steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        use_rt = torch.rand(len(idx), generator=g) < 0.5
        xb = torch.where(use_rt[:, None, None, None], xr[idx], x[idx])
        xb = M.augment(xb, g)
        loss = F.cross_entropy(net(xb), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == args.metric_steps - 1:
            log(f"metric step {step} loss {loss.item():.4f} ({time.time() - t0:.0f}s)")
    net.eval()
    torch.save(net.state_dict(), out)
    return net


# --------------------------------------------------------------------------- 3/4. diffusion


@torch.no_grad()
def encode_world(vae, tokenizer, args, work: Path):
    out = work / "latents.pt"
    if out.exists():
        log("latents: cached")
        return torch.load(out)
    t0 = time.time()
    imgs, caps, _ = world_images(args.diff_images, seed=args.seed + 3)
    mean, std = [], []
    for i in range(0, len(imgs), 256):
        d = vae.encode(to_tensor(imgs[i : i + 256])).latent_dist
        mean.append(d.mean)
        std.append(d.std)
    ids = tokenizer(caps, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids
    empty = tokenizer([""], padding="max_length", max_length=77, return_tensors="pt").input_ids
    data = {"mean": torch.cat(mean), "std": torch.cat(std), "ids": ids, "empty": empty, "captions": caps}
    torch.save(data, out)
    log(f"latents: {len(imgs)} images encoded in {time.time() - t0:.0f}s")
    return data


def warmup_cosine(total: int, warm: int, budget_s: float, t0: float):
    """LambdaLR factor: linear warmup, then a cosine (down to 5%) over `total` steps or the time budget
    (seconds since `t0`), whichever ends first."""

    def lr_at(s):
        progress = min(1.0, max(s / total, (time.time() - t0) / budget_s))
        return min(1.0, (s + 1) / warm) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    return lr_at


def train_diffusion(arch, data, args, work: Path):
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from lorakit.train.noise import noise_scheduler

    out = work / "diffusion.pt"
    torch.manual_seed(args.seed + 4)
    unet = UNet2DConditionModel.from_config(arch["unet"])
    te = CLIPTextModel(CLIPTextConfig.from_dict(arch["text_encoder"]))
    if out.exists():
        sd = torch.load(out)
        unet.load_state_dict(sd["unet"])
        te.load_state_dict(sd["te"])
        log("diffusion: cached")
        return unet.eval(), te.eval()
    sched = noise_scheduler()
    acp = sched.alphas_cumprod.float()
    scale = arch["vae"]["scaling_factor"]
    params = list(unet.parameters()) + list(te.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    total = args.steps
    warm = max(1, min(50, total // 10))

    t0 = time.time()
    budget = args.diff_minutes * 60
    lrs = torch.optim.lr_scheduler.LambdaLR(opt, warmup_cosine(total, warm, budget, t0))
    g = torch.Generator().manual_seed(args.seed + 4)
    n = len(data["ids"])
    unet.train()
    te.train()
    ema = None
    deadline = t0 + budget
    for step in range(total):
        idx = torch.randint(0, n, (args.batch,), generator=g)
        z = (data["mean"][idx] + data["std"][idx] * torch.randn(data["mean"][idx].shape, generator=g)) * scale
        ids = data["ids"][idx].clone()
        drop = torch.rand(len(idx), generator=g) < 0.1
        ids[drop] = data["empty"][0]
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, 1000, (len(idx),), generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z + (1 - a).sqrt() * noise
        cond = te(ids)[0]
        pred = unet(zt, t, cond).sample
        loss = F.mse_loss(pred, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        lrs.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 100 == 0 or step == total - 1:
            log(
                f"diffusion step {step}/{total} loss {ema:.4f} lr {lrs.get_last_lr()[0]:.2e} ({time.time() - t0:.0f}s)"
            )
        if time.time() > deadline:
            log(f"diffusion: time budget reached after {step + 1} steps")
            break
    unet.eval()
    te.eval()
    log(f"diffusion: {step + 1} steps of batch {args.batch} in {time.time() - t0:.0f}s")
    torch.save({"unet": unet.state_dict(), "te": te.state_dict()}, out)
    return unet, te


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="1 is robust on a shared 2-core CPU")
    p.add_argument("--work", default="/tmp/lorakit-demo-pretrain")
    p.add_argument("--out", default=str(DEMO_MODEL))
    p.add_argument("--metric-out", default=str(METRIC_WEIGHTS))
    p.add_argument("--vae-images", type=int, default=4000)
    p.add_argument("--vae-steps", type=int, default=3000)
    p.add_argument("--vae-batch", type=int, default=32)
    p.add_argument("--vae-lr", type=float, default=1e-3)
    p.add_argument("--vae-kl", type=float, default=1e-4)
    p.add_argument("--metric-images", type=int, default=3000)
    p.add_argument("--metric-steps", type=int, default=400)
    p.add_argument("--diff-images", type=int, default=12000)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--diff-minutes", type=float, default=15.0, help="stop the diffusion stage after this")
    p.add_argument("--stop-after", choices=["vae", "metric", "latents", "diffusion"], default=None)
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    arch = json.loads(json.dumps(DEMO_ARCH))

    vae = train_vae(arch, args, work)
    if args.stop_after == "vae":
        return 0
    net = train_metric(vae, args, work)
    M.save_metric(net, args.metric_out)
    if args.stop_after == "metric":
        return 0

    from lorakit.models.tokenizer import load_tokenizer

    data = encode_world(vae, load_tokenizer(), args, work)
    arch["vae"]["scaling_factor"] = round(float(1.0 / data["mean"].std()), 5)
    log(f"vae scaling_factor {arch['vae']['scaling_factor']}")
    if args.stop_after == "latents":
        return 0
    unet, te = train_diffusion(arch, data, args, work)

    from lorakit.models.loader import build_from_arch, save_ldm_checkpoint

    _, vae2, _ = build_from_arch(arch)  # the config with the measured scaling factor
    vae2.load_state_dict(vae.state_dict())
    # what lorakit.models.defaults reads: the 64 px it was trained at, and a LoRA rate that moves it
    meta = {"modelspec.resolution": "64x64", "lorakit.recommended_learning_rate": "1e-3"}
    save_ldm_checkpoint(args.out, unet, vae2, te, arch, dtype=torch.float16, metadata=meta)
    mins = (time.time() - t_start) / 60
    log(f"wrote {args.out} ({Path(args.out).stat().st_size / 1e6:.1f} MB) in {mins:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
