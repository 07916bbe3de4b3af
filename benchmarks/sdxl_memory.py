"""GPU memory and speed of lorakit's own SDXL LoRA trainer at 1024x1024: the defaults against the "fits 12 GB" set.

Real SDXL base 1.0 architecture (the shipped configs), random weights, batch 1, rank 32 / alpha 32,
bf16 mixed precision, 4 drawn 1024x1024 PNGs, cache_latents on. Profiles, each in a fresh process:

    defaults   U-Net + both text-encoder LoRAs trained, AdamW (fused), no checkpointing
    12gb       gradient_checkpointing + cache_text_encoder_outputs + network_train_unet_only
               + AdamW8bit (Adafactor when bitsandbytes is missing; the output says which)
    12gb_b4    12gb at batch 4 (skipped when the time budget is spent)

The models come from lorakit.models.families.sdxl.build_sdxl_empty (meta device), materialised
straight on the GPU in bf16 and given a cheap random init; `load_base_model` is swapped for that
one function, everything else is the real path: build_trainer(cfg) -> Trainer -> run(), latent
and text-encoder caching, LoRA file saving. So no 7 GB checkpoint is written or read, and the
fp32 CPU copy a real load makes never exists.

What is counted (torch.cuda.max_memory_allocated / max_memory_reserved):
    setup  from process start to the end of build_trainer: models on the GPU, latents (and
           text-encoder outputs) cached
    train  peak stats reset after build_trainer, so only the optimizer steps (the caching
           allocator keeps what setup reserved: a real run starts from there too)
    used   the device's used memory (cudaMemGetInfo) at the end of training: what nvidia-smi
           shows, CUDA context included
    img/s  steps warmup+1 .. steps (default 6-25), torch.cuda.synchronize at both ends
    first  seconds from build_trainer's call to the end of the first optimizer step (model init,
           caching, first step); `1st step` is that step alone

Run (from the repository root, lorakit not installed):

    PYTHONPATH=src python benchmarks/sdxl_memory.py              # the GPU run, under 5 minutes on an H100
    PYTHONPATH=src python benchmarks/sdxl_memory.py --tiny       # the same code path on CPU, tiny SDXL, 64x64

On a machine without diffusers / bitsandbytes / ftfy / requests, with their wheels in .whl/ (not in
git): each wheel whose module does not import is unpacked (no pip needed) into /tmp/site, then the
run; the log goes to $OUT (one line; the profiles stop within --budget seconds):

    set -o pipefail; mkdir -p /tmp/site; for w in .whl/*.whl; do m=$(basename $w | cut -d- -f1 | tr A-Z a-z); python3 -c "import $m" 2>/dev/null || python3 -m zipfile -e $w /tmp/site; done; PYTHONPATH=src:/tmp/site python3 benchmarks/sdxl_memory.py --budget 285 2>&1 | tee $OUT/sdxl_memory.log

Checked on CPU: `--tiny` (all three profiles, with and without bitsandbytes) and `--cpu --resolution 256
--profiles 12gb --steps 2 --warmup 1` (the full-size architecture: 85.1M LoRA parameters, finite loss).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

PROFILES = {
    "defaults": dict(train_batch_size=1),
    "12gb": dict(
        train_batch_size=1,
        gradient_checkpointing=True,
        cache_text_encoder_outputs=True,
        network_train_unet_only=True,
        optimizer_type="AdamW8bit",
    ),
}
PROFILES["12gb_b4"] = dict(PROFILES["12gb"], train_batch_size=4)
RESULT_TAG = "RESULT "
SAY_TAG = "SAY "  # a child's progress line that the parent echoes (the rest only with --verbose)
N_IMAGES = 4  # one batch of 4 for 12gb_b4


def bitsandbytes_found() -> bool:
    """Whether bitsandbytes is installed; not imported here, so the parent never opens a CUDA context."""
    import importlib.util

    return importlib.util.find_spec("bitsandbytes") is not None


def bitsandbytes_problem(device) -> str | None:
    """None when AdamW8bit imports and takes a step on `device`; else why not (the child then uses Adafactor)."""
    try:
        import bitsandbytes as bnb
        import torch

        p = torch.nn.Parameter(torch.zeros(4096, device=device))
        p.grad = torch.ones_like(p)
        bnb.optim.AdamW8bit([p], lr=1e-3).step()
    except Exception as e:  # ImportError, a CUDA library that does not load, ...
        return f"{type(e).__name__}: {str(e)[:200]}"
    return None


# --------------------------------------------------------------------------- the child process


def say(text: str) -> None:
    print(SAY_TAG + text, flush=True)


def make_inputs(work: Path, size: int) -> tuple[Path, Path]:
    """(train_data_dir, a stand-in base model file): the trainer checks that the file exists and
    hashes it for the metadata; its bytes are never loaded (see fast_sdxl_loader)."""
    from lorakit.testing import draw_shapes

    train = work / "train"
    for i in range(N_IMAGES):
        p = train / "10_bench subject" / f"img_{i:02d}.png"
        if not p.exists():
            draw_shapes(p, seed=i, colour=(20, 20, 20), size=size)
    base = work / "random-sdxl.safetensors"
    base.write_bytes(b"random weights built in memory by benchmarks/sdxl_memory.py\n")
    return train, base


def init_random_(module, generator) -> None:
    """Cheap init that keeps activations O(1) in bf16: weights ~ N(0, 1/fan_in) (embeddings 0.02),
    norm scales 1, biases 0. Values do not change speed or memory; they only must stay finite."""
    import torch

    with torch.no_grad():
        for name, p in module.named_parameters():
            if p.ndim >= 2:
                fan_in = p[0].numel()
                std = 0.02 if "embedding" in name else fan_in**-0.5
                p.normal_(0.0, std, generator=generator)
            elif name.endswith("weight"):
                p.fill_(1.0)
            else:
                p.zero_()


def fast_sdxl_loader(arch: dict, device, dtype):
    """A stand-in for lorakit.models.loader.load_base_model: the SDXL parts built on the meta device,
    materialised on `device` in `dtype` (the dtype the trainer casts the frozen base to anyway)."""
    import torch

    from lorakit.models.families.detect import Family
    from lorakit.models.families.sdxl import build_sdxl_empty, sdxl_tokenizers
    from lorakit.models.loader import BaseModel

    def load(path, *args, **kwargs):
        t = time.perf_counter()
        models = build_sdxl_empty(arch)
        g = torch.Generator(device=device).manual_seed(0)
        for m in models:
            torch.nn.Module.to(m, dtype=dtype)  # on meta: free; never an fp32 copy on the device
            buffers = {n: b.clone() for n, b in m.named_buffers()}  # real ones (CLIP's position_ids)
            m.to_empty(device=device)
            for n, b in m.named_buffers():
                b.copy_(buffers[n])
            init_random_(m, g)
            m.eval()
        unet, vae, te1, te2 = models
        say(f"models built on {device} in {dtype} in {time.perf_counter() - t:.1f}s")
        return BaseModel(
            unet, vae, (te1, te2), sdxl_tokenizers(), source=Path(path), arch=arch, kind="single_file",
            family=Family("sdxl", "SDXL base"),
        )  # fmt: skip

    return load


def run_child(args) -> None:
    import torch
    import tqdm.auto

    class QuietBar(tqdm.auto.tqdm):  # no progress bar in the log: the trainer imports tqdm.auto.tqdm late
        def __init__(self, *a, **k):
            super().__init__(*a, **{**k, "disable": True})

    tqdm.auto.tqdm = QuietBar

    import lorakit.models.loader as loader
    from lorakit.config import TrainConfig
    from lorakit.models.families.sdxl import sdxl_arch
    from lorakit.models.tiny import tiny_sdxl_arch
    from lorakit.train import trainer as T

    cuda = torch.cuda.is_available() and not (args.tiny or args.cpu)
    if not cuda and not (args.tiny or args.cpu):
        raise SystemExit("no CUDA device: the full-size benchmark needs a GPU (--tiny runs on CPU)")
    device = torch.device("cuda" if cuda else "cpu")
    size = args.resolution or (64 if args.tiny else 1024)
    work = Path(args.work)
    train_dir, base = make_inputs(work, size)

    profile = dict(PROFILES[args.child])
    optimizer = profile.pop("optimizer_type", "AdamW")
    if optimizer == "AdamW8bit" and (problem := bitsandbytes_problem(device)):
        optimizer = "Adafactor"
        say(f"AdamW8bit replaced by Adafactor: bitsandbytes does not work here ({problem})")
    batch = profile["train_batch_size"]
    flat = {
        "pretrained_model_name_or_path": str(base),
        "train_data_dir": str(train_dir),
        "resolution": f"{size},{size}",
        "cache_latents": True,
        "network_dim": 32,
        "network_alpha": 32,
        "mixed_precision": "bf16",
        "learning_rate": 1e-4,
        "optimizer_type": optimizer,
        "max_train_steps": args.steps,
        "progress_every_n_steps": args.steps,  # one host sync, after the timed steps
        "seed": 0,
        "output_dir": str(work / f"out-{args.child}"),
        "output_name": "bench",
        "overwrite": True,
        **profile,
    }
    cfg = TrainConfig.from_dict(flat, source="benchmarks/sdxl_memory.py")
    loader.load_base_model = fast_sdxl_loader(
        tiny_sdxl_arch() if args.tiny else sdxl_arch(), device, torch.bfloat16
    )

    def sync():
        if cuda:
            torch.cuda.synchronize()

    marks: dict[str, float] = {}
    original_step = T.Trainer._optimizer_step

    def timed_step(self, params):  # marks at step 1, the end of warm-up and the last step only
        original_step(self, params)
        step = self.pos.step
        if step in (1, args.warmup, args.steps):
            sync()
            now = time.perf_counter()
            marks.setdefault(f"step{step}", now)
            if step == 1:
                say(f"step 1 done: {now - marks['build']:.1f}s after build_trainer began")

    T.Trainer._optimizer_step = timed_step

    gib = 2**30
    marks["build"] = time.perf_counter()
    trainer = T.build_trainer(cfg)
    sync()
    marks["built"] = time.perf_counter()
    result = {
        "profile": args.child,
        "optimizer": trainer.optimizer_repr.split("(")[0].rsplit(".", 1)[-1],
        "batch": batch,
        "lora_params_M": sum(p.numel() for p in trainer.network.parameters()) / 1e6,
        "setup_s": marks["built"] - marks["build"],
    }
    if cuda:
        result["setup_alloc_GiB"] = torch.cuda.max_memory_allocated() / gib
        result["setup_reserved_GiB"] = torch.cuda.max_memory_reserved() / gib
        torch.cuda.reset_peak_memory_stats()
    say(
        f"trainer built in {result['setup_s']:.1f}s ({result['optimizer']}, "
        f"{result['lora_params_M']:.1f}M LoRA parameters)"
        + (f", setup peak {result['setup_alloc_GiB']:.2f} GiB allocated" if cuda else "")
    )
    marks["run"] = time.perf_counter()
    trainer.run()
    timed = args.steps - args.warmup
    t_timed = marks[f"step{args.steps}"] - marks[f"step{args.warmup}"]
    result.update(
        first_step_s=marks["step1"] - marks["build"],
        step1_s=marks["step1"] - marks["run"],
        s_per_step=t_timed / timed,
        img_per_s=timed * batch / t_timed,
        timed_steps=f"{args.warmup + 1}-{args.steps}",
    )
    if cuda:
        free, total = torch.cuda.mem_get_info()
        result.update(
            train_alloc_GiB=torch.cuda.max_memory_allocated() / gib,
            train_reserved_GiB=torch.cuda.max_memory_reserved() / gib,
            used_GiB=(total - free) / gib,
            gpu=torch.cuda.get_device_name(),
        )
    print(RESULT_TAG + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- the parent process


def run_profile(name: str, args, work: Path, timeout: float) -> dict:
    """One profile in a fresh Python process (clean peak memory); its lines are echoed as they come."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", name, "--work", str(work)]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--resolution", str(args.resolution)]
    cmd += [flag for flag, on in (("--tiny", args.tiny), ("--cpu", args.cpu)) if on]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    found: dict = {}
    tail: list[str] = []

    def read():
        for line in proc.stdout:
            line = line.rstrip()
            if line.startswith(RESULT_TAG):
                found.update(json.loads(line[len(RESULT_TAG) :]))
            elif line.strip():
                tail[:] = (tail + [line])[-15:]
                if line.startswith(SAY_TAG):
                    print(f"[{name}] {line[len(SAY_TAG) :]}", flush=True)
                elif args.verbose:
                    print(f"[{name}] | {line}", flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        reader.join(5)
        return {"profile": name, "error": f"timed out after {timeout:.0f}s"}
    reader.join(5)
    if proc.returncode or not found:
        print(f"[{name}] failed (exit {proc.returncode}); its last lines:", *tail, sep="\n  ", flush=True)
        last = next((t for t in reversed(tail) if "Error" in t), tail[-1] if tail else "no output")
        return {"profile": name, "error": last.strip()[:160]}
    return found


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def table(results: list[dict], cuda: bool) -> str:
    head = ["profile", "optimizer", "batch", "img/s", "s/step", "first (s)", "1st step (s)"]
    if cuda:
        head += ["setup alloc", "train alloc", "train reserved", "used (GiB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['profile']} | failed: {r['error']} |" + " |" * (len(head) - 2))
            continue
        row = [
            r["profile"], r["optimizer"], str(r["batch"]), fmt(r["img_per_s"], ".2f"), fmt(r["s_per_step"], ".3f"),
            fmt(r["first_step_s"], ".1f"), fmt(r["step1_s"], ".1f"),
        ]  # fmt: skip
        if cuda:
            row += [
                fmt(r.get(k), ".2f")
                for k in ("setup_alloc_GiB", "train_alloc_GiB", "train_reserved_GiB", "used_GiB")
            ]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument(
        "--tiny", action="store_true", help="CPU, tiny SDXL architecture, 64x64: checks the code path"
    )
    ap.add_argument(
        "--cpu", action="store_true", help="the full-size architecture on CPU: slow, only to check the path"
    )
    ap.add_argument("--resolution", type=int, default=0, help="image side (default 1024; 64 with --tiny)")
    ap.add_argument(
        "--profiles", default="defaults,12gb,12gb_b4", help="comma-separated, of " + ", ".join(PROFILES)
    )
    ap.add_argument("--steps", type=int, default=25, help="optimizer steps per profile")
    ap.add_argument("--warmup", type=int, default=5, help="steps before the timed ones")
    ap.add_argument("--timeout", type=float, default=150, help="seconds per profile")
    ap.add_argument(
        "--budget", type=float, default=285, help="seconds for all profiles; later ones are skipped"
    )
    ap.add_argument("--verbose", action="store_true", help="echo every line the profiles print")
    ap.add_argument("--child", choices=list(PROFILES), help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if not 1 <= args.warmup < args.steps:
        ap.error("need 1 <= --warmup < --steps")
    if args.child:
        return run_child(args)

    names = [p.strip() for p in args.profiles.split(",") if p.strip()]
    unknown = [n for n in names if n not in PROFILES]
    if unknown:
        ap.error(f"unknown profile(s) {unknown}: use {', '.join(PROFILES)}")
    start = time.perf_counter()
    side = args.resolution or (64 if args.tiny else 1024)
    bnb = bitsandbytes_found()
    print(
        f"lorakit SDXL LoRA benchmark ({'tiny SDXL' if args.tiny else 'SDXL base 1.0 shapes'}, "
        f"{'CPU' if args.tiny or args.cpu else 'GPU'}, {side}x{side}): "
        f"rank 32/alpha 32, bf16, cache_latents; steps {args.steps}, timed {args.warmup + 1}-{args.steps}; "
        f"bitsandbytes {'installed' if bnb else 'missing: the 12gb profiles use Adafactor instead of AdamW8bit'}",
        flush=True,
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="lorakit-sdxl-bench-") as tmp:
        for name in names:
            left = args.budget - (time.perf_counter() - start)
            if left < 30:
                print(f"[{name}] skipped: {left:.0f}s of the {args.budget:.0f}s budget left", flush=True)
                results.append({"profile": name, "error": "skipped (time budget)"})
                continue
            t = time.perf_counter()
            r = run_profile(name, args, Path(tmp), min(args.timeout, left))
            results.append(r)
            if "error" not in r:
                mem = (
                    f", train peak {r['train_alloc_GiB']:.2f} GiB allocated / {r['train_reserved_GiB']:.2f} reserved"
                    if "train_alloc_GiB" in r
                    else ""
                )
                print(
                    f"[{name}] {r['img_per_s']:.2f} img/s{mem} ({time.perf_counter() - t:.0f}s in all)",
                    flush=True,
                )
    cuda = any("train_alloc_GiB" in r for r in results)
    gpu = next((r["gpu"] for r in results if "gpu" in r), "CPU")
    print(f"\n{gpu}, total {time.perf_counter() - start:.0f}s. Memory in GiB: setup = models + caching; "
          "train = after a peak reset (allocated / reserved by torch); used = the device's, CUDA context included.\n")  # fmt: skip
    print(table(results, cuda), flush=True)
    if any("error" in r for r in results):
        sys.exit(1)


if __name__ == "__main__":
    main()
