"""Drawing speed of lorakit's own Generator, SD1.5 and SDXL: it/s, s/image and peak GPU memory at batch
1 and 4, with 0 and 2 LoRAs merged (issue 12, "Drawing").

The architectures come from lorakit's shipped configs (SD1.5, SDXL base) with random weights, built
straight on the GPU in fp16 (VAE fp32, as Generator.from_path loads); two random rank-32 LoRAs on every
UNet and text-encoder module are written to a temporary models/Lora. Each row is the real path:
Generator.generate (prompt parsing, LoRA merge, text encoding, the sampler loop, VAE decode, PNG info)
after one warm-up call (merging the row's LoRAs, compiling when --compile), `--repeats` calls timed with
torch.cuda.synchronize at both ends. it/s = sampling steps per second of one batch (A1111's it/s);
s/image = wall time per image. Without CUDA (or with --tiny) the same path runs on the tiny test
configs at 64 px: a check that it works, not a figure.

    PYTHONPATH=src python benchmarks/generate_speed.py                      # CUDA: SD1.5 512², SDXL 1024²
    PYTHONPATH=src python benchmarks/generate_speed.py --compile inductor   # the UNet torch.compiled
    PYTHONPATH=src python benchmarks/generate_speed.py --tiny --steps 2     # CPU check (seconds)

Checked on a CPU (no GPU in that session): --tiny, and --full --families sd1 --size 64 --steps 1
--batches 1 --repeats 1 (the SD1.5 architecture, two rank-32 LoRAs merged).

Figures count only from a GPU; write them, with the machine, versions and command, in docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
import warnings
from pathlib import Path

PROMPT = "a photo of a bear in a forest, detailed fur"
NEGATIVE = "lowres, blurry"


def random_base(family: str, tiny: bool, device, dtype):
    """A BaseModel of `family` ("sd1"/"sdxl") with random weights (benchmarks/random_models.py: the
    shipped full-size configs, or the tiny test ones, built on the meta device and materialised on
    `device` in `dtype`; no checkpoint written or read, no fp32 copy on the CPU)."""
    import sys

    here = str(Path(__file__).resolve().parent)
    if here not in sys.path:
        sys.path.insert(0, here)
    from random_models import arch_of, random_base_loader

    key = "sdxl" if family == "sdxl" else "sd15"
    base = random_base_loader(key, arch_of(key, tiny), device, dtype)(f"random-{family}.safetensors")
    base.vae.float()  # as Generator.from_path: SD's VAE overflows in fp16
    return base


def write_random_lora(base, path: Path, rank: int, seed: int) -> Path:
    """A kohya LoRA on every UNet and text-encoder module of `base`, small random factors (fp16 file)."""
    import torch
    from safetensors.torch import save_file

    spec = base.spec
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for t in spec.lora_targets(
        base, rank, float(rank), rank, float(rank), {"unet", *spec.text_encoder_parts}
    ):
        w = t.module.weight
        down = torch.randn(rank, w.shape[1], *w.shape[2:], generator=g) * (w[0].numel() ** -0.5)
        up = torch.randn(w.shape[0], rank, *([1] * (w.ndim - 2)), generator=g) * 0.01
        tensors[f"{t.name}.lora_down.weight"] = down.half()
        tensors[f"{t.name}.lora_up.weight"] = up.half()
        tensors[f"{t.name}.alpha"] = torch.tensor(float(rank))
    save_file(tensors, str(path), metadata={"ss_base_model_version": spec.version_string(False)})
    return path


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def count_syncs(gen, p) -> int | None:
    """How many times one generate call makes the host wait for the GPU (torch's sync debug mode):
    the sampler loop itself makes none; what is left is diffusers' and the decode's."""
    import torch

    if gen.unet.device.type != "cuda":
        return None
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            gen.generate(p)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in seen)


def bench_family(family: str, args, device, dtype) -> list[dict]:
    import torch

    from lorakit.generate.params import GenerationParams
    from lorakit.generate.pipeline import Generator

    tiny = args.tiny or (device.type != "cuda" and not args.full)
    size = args.size or (64 if tiny else 1024 if family == "sdxl" else 512)
    with tempfile.TemporaryDirectory() as tmp:
        lora_dir = Path(tmp) / "Lora"
        lora_dir.mkdir()
        t = time.perf_counter()
        base = random_base(family, tiny, device, dtype)
        gen = Generator.from_base(base, lora_dir=lora_dir)
        gen.optimize(channels_last=args.channels_last, compile=args.compile, compile_mode=args.compile_mode)
        rank = 4 if tiny else args.rank
        for i in range(2):
            write_random_lora(base, lora_dir / f"bench{i}.safetensors", rank, seed=i)
        built = time.perf_counter() - t
        rows = []
        for batch in args.batches:
            for n_loras in (0, 2):
                tags = "".join(f" <lora:bench{i}:0.8>" for i in range(n_loras))
                p = GenerationParams(
                    prompt=PROMPT + tags, negative_prompt=NEGATIVE, steps=args.steps, cfg_scale=7,
                    width=size, height=size, seed=1, sampler=args.sampler, batch_size=batch, rng=args.rng,
                )  # fmt: skip
                first = time.perf_counter()
                gen.generate(p)  # warm-up: merges the LoRAs (and compiles)
                _sync(device)
                first = time.perf_counter() - first
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                t = time.perf_counter()
                for r in range(args.repeats):
                    p.seed = 2 + r
                    gen.generate(p)
                _sync(device)
                dt = (time.perf_counter() - t) / args.repeats
                peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
                row = dict(
                    family=family, size=size, batch=batch, loras=n_loras, steps=args.steps, sampler=args.sampler,
                    it_s=args.steps / dt, s_image=dt / batch, peak_gib=peak, first_s=first,
                    syncs=count_syncs(gen, p) if args.count_syncs else None,
                )  # fmt: skip
                rows.append(row)
                print(_format(row), flush=True)
        gen.restore_base()
        print(f"  ({family}: models and LoRA files built in {built:.1f}s)", flush=True)
    return rows


def _format(r: dict) -> str:
    peak = f"{r['peak_gib']:.2f}" if r["peak_gib"] is not None else "-"
    syncs = f", {r['syncs']} syncs/call" if r.get("syncs") is not None else ""
    return (
        f"{r['family']:5} {r['size']}² batch {r['batch']} LoRAs {r['loras']}: {r['it_s']:7.2f} it/s, "
        f"{r['s_image']:.3f} s/image, peak GiB {peak}, first call {r['first_s']:.2f}s{syncs}"
    )


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tiny", action="store_true", help="the tiny test configs (the default without CUDA)")
    ap.add_argument(
        "--full", action="store_true", help="the shipped configs even on a CPU (slow: a path check)"
    )
    ap.add_argument("--families", nargs="+", default=["sd1", "sdxl"], choices=["sd1", "sdxl"])
    ap.add_argument("--batches", nargs="+", type=int, default=[1, 4])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--size", type=int, default=None, help="default: 512 SD1.5, 1024 SDXL, 64 tiny")
    ap.add_argument("--sampler", default="DPM++ 2M")
    ap.add_argument("--rank", type=int, default=32)
    ap.add_argument("--rng", default="gpu", choices=["gpu", "cpu"])
    ap.add_argument("--channels_last", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument(
        "--compile", default=None, help="torch.compile backend for the UNet (inductor, aot_eager)"
    )
    ap.add_argument("--compile_mode", default=None, help="torch.compile mode (reduce-overhead: CUDA graphs)")
    ap.add_argument("--count_syncs", action="store_true", help="also count host waits per call (CUDA)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows here")
    return ap.parse_args(argv)


def main(argv=None) -> list[dict]:
    import torch

    import lorakit

    args = parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    name = (
        torch.cuda.get_device_name(device)
        if device.type == "cuda"
        else f"CPU ({torch.get_num_threads()} threads)"
    )
    print(
        f"device: {name}; torch {torch.__version__}, lorakit {lorakit.__version__}; {dtype}, sampler "
        f"{args.sampler}, {args.steps} steps, CFG 7, rng {args.rng}, channels_last {args.channels_last}, "
        f"compile {args.compile or 'off'}{' ' + args.compile_mode if args.compile_mode else ''}",
        flush=True,
    )
    rows = [r for family in args.families for r in bench_family(family, args, device, dtype)]
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
