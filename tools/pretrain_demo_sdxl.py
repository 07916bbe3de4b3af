"""Pretrain lorakit's SDXL-family demo base model on the drawn world (the SD1 demo's sibling).

An SDXL-shaped model at demo size: two CLIP text encoders with the real vocabulary (TE2 with a
projection, padded with id 0 as lorakit's SDXL tokenizers are), the pooled vector and the 6 x 256
size conditioning, SGM key names; UNet levels 32/64 with 2 resnets each and cross-attention in both
(transformer depth 1 then 2, as SDXL deepens its lower levels). It reuses the SD1 demo's pieces:
  - the VAE and its scaling_factor, taken from the shipped lorakit-demo-sd1.safetensors (same config),
  - the metric (metric.safetensors) to judge it,
  - tools/pretrain_demo.py's world pictures, world encoding (stage 3) and warmup+cosine schedule.
Stages (cached in --work, so a rerun resumes; the diffusion stage also saves its state every
--save-minutes and continues from it):
  3. latents    encode the world (never the usu bear) with the SD1 demo's VAE
  4. diffusion  TE1 + TE2 + UNet from scratch through the SDXL family's encode/predict, epsilon with
                kohya's schedule, 10% empty captions (for CFG), size ids (64, 64, 0, 0, 64, 64)
  5. write      src/lorakit/demo/assets/lorakit-demo-sdxl.safetensors (save_sgm_checkpoint, fp16)
  6. measure    load it back, draw 8 seeds per class with lorakit.demo.sampling.ddim_draw
                (DDIM 20 steps, CFG 6, "a <class>") and judge them with the metric

    python tools/pretrain_demo_sdxl.py                 # about 25 min on a shared 2-core CPU
    python tools/pretrain_demo_sdxl.py --measure-only  # re-measure the shipped file
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))  # tools/: the SD1 build's pieces
import pretrain_demo as sd1_build  # noqa: E402
from pretrain_demo import log  # noqa: E402

from lorakit.demo import DEMO_SDXL_MODEL  # noqa: E402
from lorakit.demo.world import CLASSES, INSTANCE_PROMPT  # noqa: E402
from lorakit.models.tiny import tiny_sdxl_arch  # noqa: E402

SIZE_IDS = (64, 64, 0, 0, 64, 64)  # (orig h, w, crop top, left, target h, w): every world picture
METADATA = {"modelspec.resolution": "64x64", "lorakit.recommended_learning_rate": "1e-3"}


def demo_sdxl_arch(vae_config: dict) -> dict:
    """The demo model's configs: tiny_sdxl_arch's layout at demo widths, the SD1 demo's VAE.

    Size: the two 49408-token embeddings dominate (49408 x (24 + 40) = 3.2M parameters, 6.3 MB in
    fp16), so the encoders are narrow (context 24 + 40 = 64, as the SD1 demo's); the UNet gets ~2.3M."""
    arch = tiny_sdxl_arch()
    arch["text_encoder"].update(hidden_size=24, intermediate_size=96, num_attention_heads=4)
    arch["text_encoder_2"].update(
        hidden_size=40, intermediate_size=160, num_attention_heads=4, projection_dim=40
    )
    te1, te2 = arch["text_encoder"], arch["text_encoder_2"]
    arch["unet"].update(
        block_out_channels=[32, 64],
        attention_head_dim=[1, 2],  # diffusers' name; these are head counts (32 channels per head)
        layers_per_block=2,
        transformer_layers_per_block=[1, 2],
        down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
        up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        cross_attention_dim=te1["hidden_size"] + te2["hidden_size"],
        projection_class_embeddings_input_dim=te2["projection_dim"] + 6 * 256,
    )
    arch["vae"] = dict(vae_config)
    return arch


def sdxl_base(unet, vae, te1, te2, arch, source: Path):
    """A lorakit BaseModel of family sdxl around freshly built parts (what load_base_model returns)."""
    from lorakit.models.families.detect import Family
    from lorakit.models.families.sdxl import sdxl_tokenizers
    from lorakit.models.loader import BaseModel

    return BaseModel(
        unet,
        vae,
        (te1, te2),
        sdxl_tokenizers(),
        source=source,
        arch=arch,
        kind="single_file",
        family=Family("sdxl", "SDXL base"),
    )


# --------------------------------------------------------------------------- 4. diffusion


def train_diffusion(base, data, args, work: Path) -> None:
    """Train base.unet and both text encoders in place (cached / resumable in `work`)."""
    from lorakit.atomic import atomic_path
    from lorakit.models.schedule import sd_alphas_cumprod

    out, partial = work / "diffusion.pt", work / "diffusion_partial.pt"
    models = {"unet": base.unet, "te1": base.text_encoder_1, "te2": base.text_encoder_2}
    if out.exists():
        for name, sd in torch.load(out).items():
            models[name].load_state_dict(sd)
        log("diffusion: cached")
        return
    spec = base.spec
    acp = sd_alphas_cumprod()  # kohya's DDPM scaled_linear 0.00085..0.012, 1000 steps
    scale = base.vae.config.scaling_factor
    params = [p for m in models.values() for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(args.seed + 4)
    start, elapsed, ema = 0, 0.0, None
    if partial.exists():  # continue an interrupted run where its last save left it
        state = torch.load(partial, weights_only=False)
        for name in models:
            models[name].load_state_dict(state[name])
        opt.load_state_dict(state["opt"])
        g.set_state(state["rng"])
        start, elapsed, ema = state["step"], state["elapsed"], state["ema"]
        log(f"diffusion: resuming at step {start} ({elapsed:.0f}s done)")
    total = args.steps
    budget = args.diff_minutes * 60
    t0 = time.time() - elapsed
    lr_at = sd1_build.warmup_cosine(total, max(1, min(50, total // 10)), budget, t0)
    captions, n = data["captions"], len(data["captions"])
    size_ids = torch.tensor([SIZE_IDS] * args.batch, dtype=torch.float32)
    for m in models.values():
        m.train()
    last_save = time.time()

    def save_state(step_done: int):
        state = {name: m.state_dict() for name, m in models.items()}
        state.update(
            opt=opt.state_dict(), rng=g.get_state(), step=step_done, elapsed=time.time() - t0, ema=ema
        )
        with atomic_path(partial) as tmp:  # a run killed while saving keeps the previous state
            torch.save(state, tmp)

    step = start - 1
    for step in range(start, total):
        for group in opt.param_groups:
            group["lr"] = args.lr * lr_at(step)
        idx = torch.randint(0, n, (args.batch,), generator=g)
        z = (data["mean"][idx] + data["std"][idx] * torch.randn(data["mean"][idx].shape, generator=g)) * scale
        drop = torch.rand(len(idx), generator=g) < 0.1
        caps = ["" if d else captions[i] for i, d in zip(idx.tolist(), drop.tolist())]
        noise = torch.randn(z.shape, generator=g)
        t = torch.randint(0, 1000, (len(idx),), generator=g)
        a = acp[t].view(-1, 1, 1, 1)
        zt = a.sqrt() * z + (1 - a).sqrt() * noise
        cond = spec.encode(base, caps, None, None)  # context [B, 77, 64], pooled [B, 40]
        loss = F.mse_loss(spec.predict(base, zt, t, cond, size_ids), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.98 * ema + 0.02 * loss.item()
        if step % 100 == 0 or step == total - 1:
            lr = opt.param_groups[0]["lr"]
            log(f"diffusion step {step}/{total} loss {ema:.4f} lr {lr:.2e} ({time.time() - t0:.0f}s)")
        if time.time() - t0 > budget:
            log(f"diffusion: time budget reached after {step + 1} steps")
            break
        if time.time() - last_save > args.save_minutes * 60:
            save_state(step + 1)
            last_save = time.time()
    for m in models.values():
        m.eval()
    log(f"diffusion: {step + 1} steps of batch {args.batch} in {time.time() - t0:.0f}s")
    torch.save({name: m.state_dict() for name, m in models.items()}, out)
    partial.unlink(missing_ok=True)


# --------------------------------------------------------------------------- 6. measure


def measure(path: Path, steps: int = 20, cfg_scale: float = 6.0, seeds=range(8)) -> dict:
    """Class accuracy per class and the usu bear's instance score, judged by the demo metric."""
    from lorakit.demo import metric as M
    from lorakit.demo.sampling import ddim_draw
    from lorakit.models.loader import load_base_model

    base = load_base_model(path, dtype=torch.float32)
    assert base.family.key == "sdxl", base.family
    seeds = list(seeds)
    hits = {}
    for c in CLASSES:
        imgs = ddim_draw(base, f"a {c}", seeds, steps=steps, cfg_scale=cfg_scale)
        hits[c] = sum(p == c for p in M.classify(imgs))
    usu = ddim_draw(base, INSTANCE_PROMPT, seeds, steps=steps, cfg_scale=cfg_scale)
    result = {
        "hits": hits,
        "accuracy": sum(hits.values()) / (len(CLASSES) * len(seeds)),
        "usu_instance_score": sum(M.instance_score(usu)) / len(seeds),
        "usu_drawn_as": M.classify(usu),
    }
    log(f"measure ({steps} DDIM steps, CFG {cfg_scale}, seeds {seeds[0]}-{seeds[-1]}): {json.dumps(result)}")
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="1 is robust on a shared 2-core CPU")
    p.add_argument("--work", default="/tmp/lorakit-demo-pretrain-sdxl")
    p.add_argument("--out", default=str(DEMO_SDXL_MODEL))
    p.add_argument("--diff-images", type=int, default=12000)
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--diff-minutes", type=float, default=20.0, help="stop the diffusion stage after this")
    p.add_argument("--save-minutes", type=float, default=4.0, help="save the diffusion state this often")
    p.add_argument("--measure-only", action="store_true", help="only measure the file at --out")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    out = Path(args.out)
    if args.measure_only:
        measure(out)
        return 0
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    from lorakit.demo import load_demo_model
    from lorakit.models.families.sdxl import build_sdxl, save_sgm_checkpoint
    from lorakit.models.tokenizer import load_tokenizer

    sd1 = load_demo_model()  # its VAE (trained by tools/pretrain_demo.py) and scaling_factor
    vae = sd1.vae.eval()
    arch = demo_sdxl_arch(sd1.arch["vae"])
    log(f"vae from {sd1.source.name}: scaling_factor {arch['vae']['scaling_factor']}")
    data = sd1_build.encode_world(vae, load_tokenizer(), args, work)

    torch.manual_seed(args.seed + 4)
    unet, _, te1, te2 = build_sdxl(arch)
    base = sdxl_base(unet, vae, te1, te2, arch, out)
    counts = {
        k: sum(p.numel() for p in m.parameters())
        for k, m in zip(("unet", "vae", "te1", "te2"), (unet, vae, te1, te2))
    }
    log(f"parameters {counts}")
    train_diffusion(base, data, args, work)

    save_sgm_checkpoint(out, unet, vae, te1, te2, arch=arch, dtype=torch.float16, metadata=METADATA)
    mins = (time.time() - t_start) / 60
    log(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB) in {mins:.1f} min")
    measure(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
