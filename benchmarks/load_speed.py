"""Load time and peak host memory (RSS) of loading a base model the way `lorakit train` does.

Each measurement runs in a fresh process (a peak RSS cannot be reset), as one of:

    direct    load_base_model(path, dtype, device, vae_dtype): the trainer's load since issue 12.4,
              every tensor read into its own buffer, cast and moved, then freed
    via-fp32  load_base_model(path) in float32 on the CPU, then cast and moved per model, as the
              trainer did before (kept as a reference: callers that ask for fp32 still go this way)

Without --model it writes (once) an SD1.5-architecture single file with random fp16 weights from
the shipped configs, 2.1 GB, in --workdir. Run from the repository root:

    PYTHONPATH=src python benchmarks/load_speed.py                       # SD1.5 random, fp16 target, CPU
    PYTHONPATH=src python benchmarks/load_speed.py --device cuda --dtype bf16
    PYTHONPATH=src python benchmarks/load_speed.py --model my.safetensors --modes direct
    PYTHONPATH=src python benchmarks/load_speed.py --tiny                # the tiny model: proves it runs

Peak RSS comes from psutil (or `resource` on POSIX); on CUDA the peak GPU memory is printed too.
The page cache is warm after the first read: put the modes in the order you want, or drop caches.

Measured on a shared 2-core CPU machine (SD1.5 random fp16 file, 2.13 GB; times vary with the load
of the machine, peak RSS does not):

    fp16 target (VAE fp32)   before (fp32 then cast): 11-17 s, peak RSS 6.39 GiB
                             direct: 1.5-2.2 s, peak RSS 2.61 GiB (0.39 of it the imports)
    bf16 target              before: 3.5-5.1 s, 6.39 GiB; direct: 3.7-4.9 s (the fp16->bf16 cast
                             on one thread), 2.51 GiB
    a zip .ckpt, fp16        before: 11-14 s, 6.43 GiB; direct: 0.9-2.0 s, 2.76 GiB (mapped)
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

DTYPES = {"fp16": "float16", "bf16": "bfloat16", "fp32": "float32"}


def peak_rss_gib() -> float:
    try:
        import psutil

        info = psutil.Process().memory_info()
        peak = getattr(info, "peak_wset", None)  # Windows keeps the peak
        if peak is not None:
            return peak / 2**30
    except ImportError:
        pass
    import resource  # POSIX; ru_maxrss is KiB on Linux, bytes on macOS

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (2**30 if sys.platform == "darwin" else 2**20)


def rss_now_gib() -> dict[str, float]:
    """Linux: the RSS now, as anonymous memory and pages of mapped files (the page cache, which the
    system can take back); {} elsewhere."""
    try:
        lines = open("/proc/self/status").read().splitlines()
    except OSError:
        return {}
    kib = {
        k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in lines) if k in ("RssAnon", "RssFile")
    }
    return {k: round(v / 2**20, 2) for k, v in kib.items()}


def write_random_sd15(path: Path, tiny: bool = False) -> Path:
    """An SD1.5 (or tiny) LDM single file with random fp16 weights, built on the meta device and
    filled one tensor at a time (no fp32 model is ever made)."""
    import torch

    from lorakit.models.loader import _build_empty, save_ldm_checkpoint, sd15_arch
    from lorakit.models.tiny import tiny_arch

    arch = tiny_arch() if tiny else sd15_arch()
    models = _build_empty(arch)
    g = torch.Generator().manual_seed(0)
    for m in models:
        sd = {
            k: (torch.randn(v.shape, generator=g) * 0.02).to(torch.float16)
            if v.is_floating_point()
            else torch.zeros(v.shape, dtype=v.dtype)
            for k, v in m.state_dict().items()
        }
        m.load_state_dict(sd, assign=True, strict=False)
    path.parent.mkdir(parents=True, exist_ok=True)
    return save_ldm_checkpoint(path, *models, arch=arch if tiny else None, dtype=torch.float16)


def measure(model: str, mode: str, dtype_name: str, device: str) -> dict:
    """One load in this process; returns the figures."""
    started = time.perf_counter()
    import torch

    from lorakit.models.loader import load_base_model

    imported = time.perf_counter()
    rss_imports = peak_rss_gib()
    dtype = getattr(torch, DTYPES[dtype_name])
    # the trainer's VAE rule (trainer._vae_dtype): float32 under fp16 for the base's own VAE
    vae_dtype = torch.float32 if dtype == torch.float16 else dtype
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    if mode == "direct":
        base = load_base_model(model, dtype=dtype, device=device, vae_dtype=vae_dtype)
    else:
        base = load_base_model(model)
        torch.nn.Module.to(base.unet, device, dtype)
        for te in base.text_encoders:
            te.to(device, dtype)
        torch.nn.Module.to(base.vae, device, vae_dtype)
    if device == "cuda":
        torch.cuda.synchronize()
    loaded = time.perf_counter()
    # a CPU load may leave weights in the mapped file, read on first use: read one value per page
    with torch.no_grad():
        for m in (base.unet, base.vae, *base.text_encoders):
            for t in m.parameters():
                t.view(-1)[:: 4096 // t.element_size()].float().sum().item()
    done = time.perf_counter()
    out = {
        "mode": mode,
        "load_s": round(loaded - imported, 2),
        "touched_s": round(done - imported, 2),
        "import_s": round(imported - started, 2),
        "peak_rss_gib": round(peak_rss_gib(), 2),
        "rss_end": rss_now_gib(),
        "rss_imports_gib": round(rss_imports, 2),
        "unet_dtype": str(base.unet.dtype),
        "vae_dtype": str(base.vae.dtype),
        "device": str(base.unet.device),
    }
    if device == "cuda":
        out["peak_gpu_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", help="a base model file or diffusers folder (default: a random SD1.5 file)")
    p.add_argument("--workdir", default=str(Path.home() / ".cache" / "lorakit-bench"))
    p.add_argument("--tiny", action="store_true", help="the tiny model instead of SD1.5 (a fast check)")
    p.add_argument("--dtype", choices=list(DTYPES), default="fp16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--modes", default="direct,via-fp32", help="comma-separated: direct, via-fp32")
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: measure one mode in this process
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(measure(a.model, a.one, a.dtype, a.device)))
        return 0
    model = a.model
    if model is None:
        path = Path(a.workdir) / ("tiny-random.safetensors" if a.tiny else "sd15-random-fp16.safetensors")
        if not path.is_file():
            t = time.perf_counter()
            write_random_sd15(path, a.tiny)
            print(f"wrote {path} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - t:.0f} s")
        model = str(path)
    print(f"model {model}, target {a.dtype} on {a.device}")
    for mode in a.modes.split(","):
        cmd = [
            sys.executable,
            __file__,
            "--model",
            model,
            "--dtype",
            a.dtype,
            "--device",
            a.device,
            "--one",
            mode,
        ]
        run = subprocess.run(cmd, capture_output=True, text=True)
        if run.returncode != 0:
            print(run.stderr[-2000:], file=sys.stderr)
            return run.returncode
        r = json.loads(run.stdout.strip().splitlines()[-1])
        extra = f", peak GPU {r['peak_gpu_gib']} GiB" if "peak_gpu_gib" in r else ""
        print(
            f"{mode:9s} load {r['load_s']:6.2f} s, every weight read {r['touched_s']:6.2f} s (imports "
            f"{r['import_s']:.1f} s), peak RSS "
            f"{r['peak_rss_gib']:.2f} GiB ({r['rss_imports_gib']:.2f} after the imports; at the end "
            f"{r['rss_end'] or 'n/a'}){extra}; unet {r['unet_dtype']}, vae {r['vae_dtype']} on {r['device']}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
