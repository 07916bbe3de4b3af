"""Measure what a short LoRA training on the usu bear does to the demo model (numbers for the next tests).

Draws "usu bear" and "bear" with the base model, trains a LoRA on the instance dataset (without and
with base-drawn regularization bears), merges it, draws again with the same seeds, and prints the
metric's instance scores, the class of the "bear" drawings, and the timings.

    python tools/measure_demo_lora.py --steps 200 --threads 2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

EVAL_PROMPTS = ["usu bear", "bear", "a bear", "a cat"]


def stats(images, prompt_label: str | None = None) -> dict:
    from lorakit.demo import metric as M

    s = M.instance_score(images)
    labels = M.classify(images)
    out = {
        "instance_score_mean": round(float(np.mean(s)), 3),
        "instance_score_median": round(float(np.median(s)), 3),
        "frac_usu": round(labels.count("usu bear") / len(labels), 3),
        "frac_bear": round(labels.count("bear") / len(labels), 3),
        "frac_bear_or_usu": round((labels.count("bear") + labels.count("usu bear")) / len(labels), 3),
    }
    if prompt_label:
        out[f"p_{prompt_label}"] = round(float(np.mean(M.class_scores(images, prompt_label))), 3)
    return out


def pixel_distance(a, b) -> float:
    return float(
        np.mean([np.abs(np.asarray(x, float) - np.asarray(y, float)).mean() / 255 for x, y in zip(a, b)])
    )


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--work", default="/tmp/lorakit-demo-lora")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--dim", type=int, default=8)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--n-reg", type=int, default=32)
    p.add_argument("--n-eval", type=int, default=24)
    p.add_argument("--sample-steps", type=int, default=20)
    p.add_argument("--guidance", type=float, default=6.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--only", choices=["noreg", "reg"], default=None)
    p.add_argument(
        "--extra", default="{}", help="more kohya options as JSON, e.g. '{\"text_encoder_lr\": 3e-3}'"
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from lorakit.config import TrainConfig
    from lorakit.demo import DEMO_MODEL, diffusers_pipeline, draw, load_demo_model
    from lorakit.demo.world import make_instance_dataset
    from lorakit.network.file import read_lora_file
    from lorakit.network.merge import merge_lora
    from lorakit.train.trainer import train

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    results: dict = {"args": vars(args)}
    seeds = list(range(1000, 1000 + args.n_eval))

    base = load_demo_model()
    pipe = diffusers_pipeline(base)
    t = time.time()
    base_usu = draw(pipe, ["usu bear"] * len(seeds), seeds, args.sample_steps, args.guidance)
    dt = time.time() - t
    results["gen_images_per_s"] = round(len(seeds) / dt, 2)
    base_imgs = {"usu bear": base_usu}
    for prompt in EVAL_PROMPTS[1:]:
        base_imgs[prompt] = draw(pipe, [prompt] * len(seeds), seeds, args.sample_steps, args.guidance)
    results["base"] = {prompt: stats(imgs, "bear") for prompt, imgs in base_imgs.items()}
    print(json.dumps(results, indent=1), flush=True)

    train_dir = make_instance_dataset(work / "data", n=16, repeats=10)
    reg_dir = work / "data" / "reg" / "1_bear"
    t = time.time()
    reg_dir.mkdir(parents=True, exist_ok=True)
    reg_imgs = draw(pipe, ["bear"] * args.n_reg, list(range(args.n_reg)), args.sample_steps, args.guidance)
    for i, im in enumerate(reg_imgs):
        im.save(reg_dir / f"bear_{i:03d}.png")
    results["reg_draw_s"] = round(time.time() - t, 1)

    for name in ("noreg", "reg"):
        if args.only and args.only != name:
            continue
        flat = {
            "pretrained_model_name_or_path": str(DEMO_MODEL),
            "train_data_dir": str(train_dir),
            "resolution": "64",
            "output_dir": str(work / "out"),
            "output_name": f"usu-{name}",
            "network_dim": args.dim,
            "network_alpha": args.dim,
            "learning_rate": args.lr,
            "max_train_steps": args.steps,
            "train_batch_size": args.batch,
            "cache_latents": True,
            "seed": 42,
        }
        flat.update(json.loads(args.extra))
        if name == "reg":
            flat["reg_data_dir"] = str(reg_dir.parent)
        t = time.time()
        lora = train(TrainConfig.from_dict(flat, source="measure"))
        train_s = time.time() - t
        m = load_demo_model()
        tensors, _ = read_lora_file(lora)
        merge_lora(m.unet, m.text_encoder, tensors, 1.0, 1.0)
        lp = diffusers_pipeline(m)
        results[name] = {"train_s": round(train_s, 1)}
        rows = []
        for prompt in EVAL_PROMPTS:
            imgs = draw(lp, [prompt] * len(seeds), seeds, args.sample_steps, args.guidance)
            results[name][prompt] = stats(imgs, "bear")
            results[name][prompt]["pixel_drift_vs_base"] = round(pixel_distance(imgs, base_imgs[prompt]), 4)
            rows += [base_imgs[prompt], imgs]
        grid = np.concatenate([np.concatenate([np.asarray(im) for im in row[:12]], 1) for row in rows])
        from PIL import Image

        Image.fromarray(grid).save(work / f"grid-{name}.png")
        print(json.dumps(results[name], indent=1), flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
