"""Measure what LoRA training on the usu bear does to the demo model (the numbers behind the thresholds
of tests/test_demo_lora.py and the table in src/lorakit/demo/assets/README.md).

Trains the demo LoRA without and with base-drawn regularization bears (the workflow's settings),
draws each evaluation prompt with and without it on the same seeds, and prints the metric's mean
instance score, the pixel drift from the base model's drawings, and the timings.

    python tools/measure_demo_lora.py --seeds 24 --threads 1          # --sdxl: the SDXL demo model
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

EVAL_PROMPTS = ["usu bear", "bear", "a bear", "a cat"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--work", default="/tmp/lorakit-demo-lora")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--seeds", type=int, default=24)
    p.add_argument("--first-seed", type=int, default=1000)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--sdxl", action="store_true", help="the SDXL-family demo model")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from lorakit.demo import workflow as W

    work = Path(args.work)
    model = W.demo_model(args.sdxl)
    gen = W.demo_generator(work / "Lora", model)
    (work / "Lora").mkdir(parents=True, exist_ok=True)
    t = time.time()
    base = {prompt: W.draw(gen, prompt, args.first_seed, args.seeds) for prompt in EVAL_PROMPTS}
    results: dict = {"images_per_s": round(len(EVAL_PROMPTS) * args.seeds / (time.time() - t), 2)}
    results["base"] = {prompt: round(W.instance_rate(imgs), 3) for prompt, imgs in base.items()}
    for name, with_reg in (("noreg", False), ("reg", True)):
        t = time.time()
        lora = W.train_demo_lora(
            work / name, with_reg=with_reg, gen=gen, model=model, max_train_steps=args.steps
        )
        results[f"{name}_train_s"] = round(time.time() - t, 1)
        (work / "Lora" / f"{name}.safetensors").write_bytes(lora.read_bytes())
        results[name] = {}
        for prompt in EVAL_PROMPTS:
            imgs = W.draw(gen, f"{prompt} <lora:{name}:1>", args.first_seed, args.seeds)
            drift = W.pixel_distance(imgs, base[prompt])
            results[name][prompt] = {
                "instance": round(W.instance_rate(imgs), 3),
                "pixel_drift": round(drift, 4),
            }
        gen.restore_base()
        print(json.dumps(results, indent=1), flush=True)
    (work / "results.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
