"""What a LoRA costs at generation time: the same request with and without `<lora:bench:1>`.

LoRAs are merged into the weights, so the denoising steps cost the same; the one-off cost is
reading the file and merging (paid again only when the prompt's LoRAs change).

    python benchmarks/lora_generation_cost.py --arch sd15 --size 256 --steps 4   # real SD1.5 shapes
    python benchmarks/lora_generation_cost.py --arch tiny --size 64 --steps 20
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch


def build_base(arch_name: str, folder: Path) -> Path:
    from lorakit.models.loader import build_from_arch, save_ldm_checkpoint, sd15_arch
    from lorakit.models.tiny import tiny_arch

    arch = sd15_arch() if arch_name == "sd15" else tiny_arch()
    torch.manual_seed(0)
    unet, vae, te = build_from_arch(arch)  # random weights: speed does not depend on their values
    return save_ldm_checkpoint(folder / f"{arch_name}.safetensors", unet, vae, te, arch)


def build_lora(base: Path, lora_dir: Path, rank: int) -> Path:
    from lorakit.models.loader import load_base_model
    from lorakit.network.file import save_lora_file
    from lorakit.network.lora import LoRANetwork

    b = load_base_model(base)
    net = LoRANetwork(b.unet, b.text_encoder, dim=rank, alpha=rank)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.01)
    lora_dir.mkdir(parents=True, exist_ok=True)
    return save_lora_file(lora_dir / "bench.safetensors", net.kohya_state_dict(), {}, "fp16")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", choices=["sd15", "tiny"], default="tiny")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--sampler", default="DPM++ 2M")
    args = ap.parse_args()

    from lorakit.generate.params import GenerationParams
    from lorakit.generate.pipeline import Generator

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = build_base(args.arch, tmp)
        build_lora(base, tmp / "Lora", args.rank)
        gen = Generator.from_path(base, tmp / "Lora")
        device = gen.unet.device

        def run(prompt: str, seed: int) -> float:
            p = GenerationParams(
                prompt=prompt,
                steps=args.steps,
                width=args.size,
                height=args.size,
                seed=seed,
                sampler=args.sampler,
            )
            if device.type == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            gen.generate(p)
            if device.type == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t

        run("a bear", 0)  # warm-up
        t_merge = time.perf_counter()
        gen.apply_loras("a bear <lora:bench:1>")
        t_merge = time.perf_counter() - t_merge
        gen.restore_base()
        plain, with_lora = [], []
        for i in range(args.repeats):  # interleaved, so drift hits both alike
            gen.restore_base()
            plain.append(run("a bear", i))
            with_lora.append(run("a bear <lora:bench:1>", i))  # first of each pair re-merges
        steady = [run("a bear <lora:bench:1>", i) for i in range(args.repeats)]  # LoRA stays merged

    dev = (
        torch.cuda.get_device_name() if device.type == "cuda" else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(
        f"device: {dev}; arch {args.arch}, {args.size}x{args.size}, {args.steps} steps, {args.sampler}, LoRA rank {args.rank}"
    )
    print(f"  without LoRA:                  median {statistics.median(plain):.3f} s/image")
    print(f"  with LoRA (merge each time):   median {statistics.median(with_lora):.3f} s/image")
    print(f"  with LoRA (already merged):    median {statistics.median(steady):.3f} s/image")
    print(f"  one merge (file read + merge): {t_merge:.3f} s")


if __name__ == "__main__":
    main()
