"""Training speed of lorakit's own trainer: img/s, ms/step, peak GPU memory, time to the first step and
model-FLOP utilisation (MFU), per configuration.

The real `lorakit train` path (TrainConfig -> build_trainer -> Trainer.run: dataset scan, latent
caching, LoRA, optimizer, LoRA file saved) on a generated dataset (8 drawn PNGs at the target size,
`cache_latents`); only the checkpoint read is replaced by the architecture built straight on the
device with random weights (benchmarks/random_models.py): SD1.5 at 512x512 and SDXL base 1.0 at
1024x1024 from lorakit's shipped configs, or with --tiny the tests' tiny models at 64x64 on the CPU.
LoRA rank 32 / alpha 32, AdamW, bf16 mixed precision on CUDA (fp32 on the CPU).

A configuration is `family[:token...]`, family sd15 or sdxl; tokens:
    bN       train_batch_size N (default 1)
    te       the text encoder(s) trained too (default: network_train_unet_only)
    gc       gradient_checkpointing
    cte      cache_text_encoder_outputs
    8bit     optimizer AdamW8bit (Adafactor when bitsandbytes does not work here; the output says so)
    compile  torch_compile (when this lorakit has the option; else the row says "not available")
    graph    cuda_graph: the step recorded as CUDA graphs (a pass per batch shape, the update) and replayed
    key=val  any other `lorakit train` option, e.g. torch_compile_mode=max-autotune, network_dim=16
e.g. `sdxl:b4:gc:cte:8bit` is the "fits 12 GB" profile at batch 4. Or give a product with --family,
--batch, --te, --checkpointing, --compile (each comma-separated).

What is measured (each configuration in a fresh process unless --in_process):
    img/s, ms/step   steps warmup+1 .. steps (default 11-30): torch.cuda.synchronize at both ends for
                     the mean; CUDA events after every optimizer step for the median (no extra syncs)
    peak memory      torch.cuda.max_memory_allocated / _reserved while training (reset after setup;
                     setup = models + caching has its own peak), and the device's used memory
                     (cudaMemGetInfo: what nvidia-smi shows, CUDA context included) at the end
    start -> step 1  from the process's start to the end of the first optimizer step, split into
                     imports, model load (here: building the random model on the device; a real run
                     also reads and hashes the checkpoint), caching (latents, text-encoder outputs),
                     the rest of the setup (dataset scan, LoRA, optimizer) and the first step
                     (compilation included)
    TFLOP/img        the FLOPs of one training step (UNet and text-encoder forward and backward, as
                     torch.utils.flop_counter.FlopCounterMode counts them at the real architecture,
                     gradient checkpointing's recompute not counted) per image. A compiled
                     configuration takes its eager twin's count. On the CPU torch counts no
                     attention FLOPs (its CPU attention kernel has no formula): a GPU figure only.
    MFU              TFLOP/img x img/s / the GPU's peak dense bf16 TFLOP/s from its spec sheet
                     (PEAK_BF16_TFLOPS; --peak_tflops overrides); a bf16 matmul calibration on the
                     same GPU is printed beside it

Run (from the repository root, lorakit not installed):

    PYTHONPATH=src python benchmarks/train_speed.py --json $OUT/train_speed.json   # the GPU suite, ~8 min on an H100
    PYTHONPATH=src python benchmarks/train_speed.py --tiny                         # the same path on CPU, tiny models
    PYTHONPATH=src python benchmarks/train_speed.py --family sd15 --batch 1,4,8 --te off,on
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# The GPU suite, most wanted first (a spent --budget skips the rest); compiled ones last: they compile.
GPU_SUITE = (
    "sd15:b1", "sd15:b1:graph", "sd15:b1:te", "sd15:b1:te:graph", "sd15:b4", "sd15:b8", "sd15:b8:graph",
    "sd15:b1:gc", "sd15:b8:gc", "sdxl:b1:te", "sdxl:b1", "sdxl:b1:graph", "sdxl:b1:gc:cte:8bit",
    "sdxl:b4:gc:cte:8bit", "sd15:b1:compile", "sd15:b8:compile", "sdxl:b1:compile",
)  # fmt: skip
TINY_SUITE = ("sd15:b1", "sd15:b2:te:gc", "sdxl:b1")
RESOLUTION = {"sd15": 512, "sdxl": 1024}
TINY_RESOLUTION = 64
N_IMAGES = 8  # one batch of 8; 10 repeats make an epoch of 80 images
FLAGS = {"te": "te", "gc": "gc", "cte": "cte", "8bit": "adam8bit", "compile": "compile", "graph": "graph"}

# Peak dense bf16 tensor TFLOP/s (fp32 accumulate, no sparsity) from NVIDIA's spec sheets; the first
# name found in the GPU's name wins, so the longer names come first.
PEAK_BF16_TFLOPS = (
    ("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("GH200", 989.0), ("H200", 989.0), ("H100", 989.0),
    ("B200", 2250.0), ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("RTX 4090", 165.2),
)  # fmt: skip

# options that change how the step runs, not what it computes: a compiled run's eager twin may differ in them
HOW_IT_RUNS = (
    "torch_compile",
    "cuda_graph",
    "dynamo_backend",
    "deterministic",
    "gradient_checkpointing",
    "max_data_loader",
)
RESULT_TAG = "RESULT "
SAY_TAG = "SAY "  # a child's progress line that the parent echoes (the rest only with --verbose)
GIB = 2**30


IN_CHILD = False  # set by --child: progress lines are tagged for the parent to echo


def say(text: str) -> None:
    tag = SAY_TAG if IN_CHILD else ""
    print("\n".join(tag + line for line in text.splitlines()), flush=True)


# --------------------------------------------------------------------------- configurations


@dataclass
class Spec:
    text: str
    family: str
    batch: int = 1
    te: bool = False
    gc: bool = False
    cte: bool = False
    adam8bit: bool = False
    compile: bool = False
    graph: bool = False
    extra: dict[str, str] = field(default_factory=dict)

    def twin_key(self) -> tuple:
        """What the FLOPs per image depend on: a compiled run takes its eager twin's count."""
        model = {k: v for k, v in self.extra.items() if not k.startswith(HOW_IT_RUNS)}
        return (self.family, self.te, self.cte, tuple(sorted(model.items())))


def parse_spec(text: str) -> Spec:
    family, *tokens = [t.strip() for t in text.strip().split(":")]
    if family not in RESOLUTION:
        raise ValueError(f"configuration {text!r}: starts with the family, sd15 or sdxl (not {family!r})")
    spec = Spec(text.strip(), family)
    for token in tokens:
        if token in FLAGS:
            setattr(spec, FLAGS[token], True)
        elif token[:1] == "b" and token[1:].isdigit() and int(token[1:]) > 0:
            spec.batch = int(token[1:])
        elif "=" in token:
            key, value = token.split("=", 1)
            spec.extra[key.strip()] = value.strip()
        else:
            raise ValueError(
                f"configuration {text!r}: unknown token {token!r}; use bN, {', '.join(FLAGS)} or key=value"
            )
    return spec


def matrix_specs(families: str, batches: str, te: str, checkpointing: str, compile_: str) -> list[str]:
    """The product of the matrix flags as configuration strings."""

    def onoff(value: str, token: str, flag: str) -> list[str]:
        out = []
        for v in value.split(","):
            v = v.strip().lower()
            if v not in ("on", "off"):
                raise ValueError(f"--{flag} {value}: give on, off or on,off")
            out.append(f":{token}" if v == "on" else "")
        return out

    fams = [f.strip() for f in families.split(",") if f.strip()]
    sizes = [f":b{int(b)}" for b in batches.split(",") if b.strip()]
    return [
        "".join(parts)
        for parts in itertools.product(
            fams, sizes, onoff(te, "te", "te"), onoff(checkpointing, "gc", "checkpointing"),
            onoff(compile_, "compile", "compile"),
        )
    ]  # fmt: skip


def config_options(spec: Spec, mixed_precision: str, rank: int) -> tuple[dict, str | None]:
    """The `lorakit train` options of `spec` beyond the run's own (paths, steps), or (.., why not)."""
    from lorakit.config import field_index

    fields = field_index()
    flat: dict = {
        "train_batch_size": spec.batch,
        "network_train_unet_only": not spec.te,
        "gradient_checkpointing": spec.gc,
        "cache_text_encoder_outputs": spec.cte,
        "network_dim": rank,
        "network_alpha": rank,
        "mixed_precision": mixed_precision,
    }
    if spec.compile:
        if "torch_compile" not in fields:
            return flat, "not available: this lorakit has no torch_compile option"
        flat["torch_compile"] = True
    if spec.graph:
        if "cuda_graph" not in fields:
            return flat, "not available: this lorakit has no cuda_graph option"
        flat["cuda_graph"] = True
    flat.update(spec.extra)
    unknown = [k for k in flat if k not in fields]
    if unknown:
        return flat, f"not available: this lorakit has no option {', '.join(unknown)}"
    return flat, None


def peak_tflops(gpu: str | None) -> tuple[float | None, str]:
    """(peak dense bf16 TFLOP/s, where the figure comes from) for a GPU name."""
    for name, value in PEAK_BF16_TFLOPS:
        if gpu and name.lower() in gpu.lower():
            return value, f"{name} spec sheet, dense bf16"
    return None, "unknown GPU: give --peak_tflops"


# --------------------------------------------------------------------------- one configuration


def bitsandbytes_problem(device) -> str | None:
    """None when AdamW8bit imports and takes a step on `device`; else why not."""
    try:
        import bitsandbytes as bnb
        import torch

        p = torch.nn.Parameter(torch.zeros(4096, device=device))
        p.grad = torch.ones_like(p)
        bnb.optim.AdamW8bit([p], lr=1e-3).step()
    except Exception as e:  # ImportError, a CUDA library that does not load, ...
        return f"{type(e).__name__}: {str(e)[:200]}"
    return None


def make_inputs(work: Path, size: int) -> tuple[Path, Path]:
    """(train_data_dir, a stand-in base model file): the trainer checks that the file exists and
    hashes it for the metadata; its bytes are never loaded (see random_models)."""
    from lorakit.testing import draw_shapes

    train = work / f"data-{size}"
    for i in range(N_IMAGES):
        p = train / "10_bench subject" / f"img_{i:02d}.png"
        if not p.exists():
            draw_shapes(p, seed=i, colour=(20, 20, 20), size=size)
    base = work / "random-weights.safetensors"
    if not base.exists():
        base.write_bytes(b"random weights built in memory by benchmarks/train_speed.py\n")
    return train, base


def image_size(spec: Spec, args) -> int:
    return args.resolution or (TINY_RESOLUTION if args.tiny else RESOLUTION[spec.family])


@contextlib.contextmanager
def replaced(obj, name: str, new):
    old = getattr(obj, name)
    setattr(obj, name, new)
    try:
        yield old
    finally:
        setattr(obj, name, old)


def machine_info(cuda: bool) -> dict:
    import accelerate
    import diffusers
    import torch
    import transformers

    info = {
        "gpu": torch.cuda.get_device_name() if cuda else "CPU",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "accelerate": accelerate.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
    }
    if cuda:
        info["gpu_memory_GiB"] = round(torch.cuda.get_device_properties(0).total_memory / GIB, 1)
    return info


def first_image(batch):
    """`batch` cut to its first image (tensors and lists along the batch dimension)."""
    import dataclasses

    import torch

    def cut(v):
        if isinstance(v, torch.Tensor) and v.ndim >= 1 or isinstance(v, list):
            return v[:1]
        return v

    return dataclasses.replace(
        batch, **{f.name: cut(getattr(batch, f.name)) for f in dataclasses.fields(batch)}
    )


def count_image_flops(trainer, cuda: bool) -> float | None:
    """FLOPs of one training step (forward and backward of the UNet and text encoders) for one image,
    gradient checkpointing switched off for the count (its recompute is not model FLOPs); one image,
    so that this never needs more memory than the timed steps did. None when it does not fit."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    unet = trainer.base.unet
    if getattr(unet, "is_gradient_checkpointing", False):
        unet.disable_gradient_checkpointing()
    for te in trainer.text_encoders.values():  # transformers >= 5.24 renames these (the old names go in v6)
        disable = getattr(te, "activation_checkpointing_disable", None) or te.gradient_checkpointing_disable
        disable()
    batch = first_image(next(iter(trainer.dataset.batches(0))))
    try:
        with FlopCounterMode(display=False) as counter:
            loss = trainer.loss_of(batch, 0)
            trainer.acc.backward(loss)
        if cuda:
            torch.cuda.synchronize()
    except torch.OutOfMemoryError:
        say("the FLOP count ran out of GPU memory (checkpointing off, one image): no MFU for this one")
        return None
    finally:
        trainer.optimizer.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def step_profiler(args, cuda: bool):
    """torch.profiler over --profile steps after the timed ones: steps 1..steps wait (not recorded),
    one warm-up step, then the recorded ones. The trainer calls .step() after each optimizer step."""
    from torch.profiler import ProfilerActivity, profile, schedule

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    return profile(activities=activities, schedule=schedule(wait=args.steps, warmup=1, active=args.profile))


def profile_summary(profiler, cuda: bool, steps: int, rows: int = 15) -> str:
    """The ops that take the most time (self time, GPU then host), and the host-device syncs and
    copies per step: where a step still waits."""
    averages = profiler.key_averages()
    tables = []
    if cuda:
        tables.append(averages.table(sort_by="self_cuda_time_total", row_limit=rows))
    tables.append(averages.table(sort_by="self_cpu_time_total", row_limit=rows))
    waits = [
        f"{e.key}: {e.count / steps:.1f}/step, {e.cpu_time_total / 1e3 / steps:.2f} ms/step on the host"
        for e in averages
        if any(w in e.key for w in ("Synchronize", "Memcpy", "aten::item", "aten::_local_scalar_dense"))
    ]
    return "\n".join([*tables, "syncs and copies:", *(waits or ["none"])])


def run_config(spec: Spec, args, work: Path, t_spawn: float) -> dict:
    """Train `spec` for args.steps steps through build_trainer -> Trainer.run and measure it."""
    import logging

    import accelerate  # noqa: F401  (the heavy imports, timed as a real run makes them)
    import diffusers  # noqa: F401
    import torch
    import tqdm.auto
    import transformers  # noqa: F401

    import lorakit.models.loader as loader
    import lorakit.network.lycoris  # noqa: F401
    from lorakit.config import TrainConfig
    from lorakit.train import trainer as T

    imports_s = time.time() - t_spawn
    cuda = torch.cuda.is_available() and not (args.tiny or args.cpu)
    if not cuda and not (args.tiny or args.cpu):
        raise SystemExit("no CUDA device: the full-size benchmark needs a GPU (--tiny runs on the CPU)")
    device = torch.device("cuda" if cuda else "cpu")
    result: dict = {"config": spec.text, "batch": spec.batch, "imports_s": imports_s}
    precision = args.mixed_precision or ("bf16" if cuda else "no")
    flat, unavailable = config_options(spec, precision, args.rank)
    if unavailable:
        return dict(result, status=unavailable)
    if spec.adam8bit:
        flat["optimizer_type"] = "AdamW8bit"
        if problem := bitsandbytes_problem(device):
            flat["optimizer_type"] = "Adafactor"
            result["note"] = "Adafactor: no working bitsandbytes"
            say(f"{spec.text}: AdamW8bit replaced by Adafactor: bitsandbytes does not work here ({problem})")
    size = image_size(spec, args)
    train_dir, base = make_inputs(work, size)
    out = work / ("out-" + re.sub(r"[^A-Za-z0-9_.-]", "_", spec.text))
    flat.update(
        pretrained_model_name_or_path=str(base),
        train_data_dir=str(train_dir),
        resolution=f"{size},{size}",
        cache_latents=True,
        learning_rate=1e-4,
        max_train_steps=args.steps,
        progress_every_n_steps=args.steps,  # one host sync, at the end
        seed=0,
        output_dir=str(out),
        output_name="bench",
        overwrite=True,
    )
    if args.profile:  # profiled steps after the timed ones (and one profiler warm-up step)
        flat["max_train_steps"] = args.steps + 1 + args.profile
        flat["progress_every_n_steps"] = flat["max_train_steps"]
    cfg = TrainConfig.from_dict(flat, source=f"benchmarks/train_speed.py {spec.text}")
    from random_models import arch_of, random_base_loader

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    load = random_base_loader(spec.family, arch_of(spec.family, args.tiny), device, dtype)

    def sync():
        if cuda:
            torch.cuda.synchronize()

    profiler = None
    marks: dict[str, float] = {}
    events: list = []  # one per optimizer step: a CUDA event, or the host clock on the CPU

    def timed_load(*a, **k):
        t = time.perf_counter()
        base_model = load(*a, **k)
        sync()
        marks["load_s"] = time.perf_counter() - t
        return base_model

    def timed_caches(self):
        t = time.perf_counter()
        original_caches(self)
        sync()
        marks["cache_s"] = time.perf_counter() - t

    def timed_step(self, *a, **k):  # Trainer._advance: after every optimizer step, eager or replayed
        original_step(self, *a, **k)
        if cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            events.append(ev)
        else:
            events.append(time.perf_counter())
        step = self.pos.step
        if step in (1, args.warmup, args.steps):
            sync()
            marks.setdefault(f"step{step}", time.perf_counter())
            if step == 1:
                marks["first_step_wall"] = time.time()
        if profiler is not None:
            profiler.step()

    class QuietBar(tqdm.auto.tqdm):  # the trainer imports tqdm.auto.tqdm when it runs
        def __init__(self, *a, **k):
            super().__init__(*a, **{**k, "disable": True})

    lorakit_log = logging.getLogger("lorakit")
    level = lorakit_log.level
    if not args.verbose:
        lorakit_log.setLevel(logging.WARNING)
    with contextlib.ExitStack() as stack:
        stack.callback(lorakit_log.setLevel, level)
        stack.enter_context(replaced(tqdm.auto, "tqdm", QuietBar))
        stack.enter_context(replaced(loader, "load_base_model", timed_load))
        original_caches = stack.enter_context(replaced(T.Trainer, "_prepare_caches", timed_caches))
        original_step = stack.enter_context(replaced(T.Trainer, "_advance", timed_step))
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        t_build = time.perf_counter()
        trainer = T.build_trainer(cfg)
        sync()
        result["build_s"] = time.perf_counter() - t_build
        if cuda:
            result["setup_alloc_GiB"] = torch.cuda.max_memory_allocated() / GIB
            result["setup_reserved_GiB"] = torch.cuda.max_memory_reserved() / GIB
            torch.cuda.reset_peak_memory_stats()
        result["optimizer"] = trainer.optimizer_repr.split("(")[0].rsplit(".", 1)[-1]
        result["lora_params_M"] = sum(p.numel() for p in trainer.network.parameters()) / 1e6
        profiler = stack.enter_context(step_profiler(args, cuda)) if args.profile else None
        t_run = time.perf_counter()
        trainer.run()
        sync()
    if profiler is not None:
        result["profile"] = profile_summary(profiler, cuda, args.profile)
        say(f"{spec.text}: profile of {args.profile} steps after the timed ones\n{result['profile']}")
    timed = args.steps - args.warmup
    t_timed = marks[f"step{args.steps}"] - marks[f"step{args.warmup}"]
    if cuda:
        per_step = [events[k - 1].elapsed_time(events[k]) for k in range(args.warmup, args.steps)]
    else:
        per_step = [(events[k] - events[k - 1]) * 1e3 for k in range(args.warmup, args.steps)]
    per_step.sort()
    result.update(
        status="ok",
        img_per_s=timed * spec.batch / t_timed,
        ms_per_step=t_timed / timed * 1e3,
        ms_per_step_median=per_step[len(per_step) // 2],
        timed_steps=f"{args.warmup + 1}-{args.steps}",
        load_s=marks.get("load_s"),
        cache_s=marks.get("cache_s"),
        first_step_s=marks["step1"] - t_run,
        start_to_first_step_s=marks["first_step_wall"] - t_spawn,
        other_setup_s=result["build_s"] - marks.get("load_s", 0.0) - marks.get("cache_s", 0.0),
        resolution=size,
        precision=precision,
        options={k: v for k, v in flat.items() if k not in ("pretrained_model_name_or_path", "output_dir")}
        | {"train_data_dir": f"{N_IMAGES} drawn {size}x{size} PNGs"},
    )
    if cuda:
        free, total = torch.cuda.mem_get_info()
        result.update(
            train_alloc_GiB=torch.cuda.max_memory_allocated() / GIB,
            train_reserved_GiB=torch.cuda.max_memory_reserved() / GIB,
            used_GiB=(total - free) / GIB,
        )
    if (
        spec.compile or spec.graph
    ):  # compiled/replayed kernels are not dispatched one by one: the eager twin's
        result["flops_per_image"] = None
    else:
        result["flops_per_image"] = count_image_flops(trainer, cuda)
    del trainer
    if cuda:
        torch.cuda.empty_cache()
    return result


def run_child(args) -> None:
    global IN_CHILD
    IN_CHILD = True
    spec = parse_spec(args.child)
    result = run_config(spec, args, Path(args.work), args.t_spawn)  # the parent's folder: data made once
    import torch

    cuda = torch.cuda.is_available() and not (args.tiny or args.cpu)
    result["machine"] = machine_info(cuda)
    print(RESULT_TAG + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- the parent


def child_argv(args) -> list[str]:
    argv = ["--steps", str(args.steps), "--warmup", str(args.warmup), "--rank", str(args.rank)]
    argv += ["--resolution", str(args.resolution), "--profile", str(args.profile)]
    if args.mixed_precision:
        argv += ["--mixed_precision", args.mixed_precision]
    argv += [
        flag for flag, on in (("--tiny", args.tiny), ("--cpu", args.cpu), ("--verbose", args.verbose)) if on
    ]
    return argv


def run_in_child(spec: Spec, args, work: Path, timeout: float) -> dict:
    """One configuration in a fresh Python process (clean peak memory, a real start); its progress
    lines are echoed as they come."""
    cmd = [sys.executable, os.path.abspath(__file__), "--child", spec.text, "--work", str(work)]
    cmd += ["--t_spawn", repr(time.time()), *child_argv(args)]
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
                    print(f"[{spec.text}] {line[len(SAY_TAG) :]}", flush=True)
                elif args.verbose:
                    print(f"[{spec.text}] | {line}", flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        reader.join(5)
        return {"config": spec.text, "batch": spec.batch, "status": f"timed out after {timeout:.0f}s"}
    reader.join(5)
    if proc.returncode or not found:
        print(
            f"[{spec.text}] failed (exit {proc.returncode}); its last lines:", *tail, sep="\n  ", flush=True
        )
        last = next((t for t in reversed(tail) if "Error" in t), tail[-1] if tail else "no output")
        return {"config": spec.text, "batch": spec.batch, "status": "failed: " + last.strip()[:160]}
    return found


def calibrate_matmul(seconds: float = 2.0) -> float | None:
    """Measured bf16 TFLOP/s of a large matmul (8192^3) on this GPU; None without CUDA."""
    import torch

    if not torch.cuda.is_available():
        return None
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    iters, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        for _ in range(10):
            a @ b
        torch.cuda.synchronize()
        iters += 10
    return 2 * n**3 * iters / (time.perf_counter() - t) / 1e12


def git_commit() -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(ROOT), "rev-parse", "--short=10", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return (head or "unknown") + (" + local changes" if dirty else "")


def driver_version() -> str | None:
    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


def fill_mfu(results: list[dict], specs: dict[str, Spec], peak: float | None) -> None:
    """TFLOP/img (a compiled run: its eager twin's), achieved TFLOP/s and MFU."""
    counted = {
        specs[r["config"]].twin_key(): r["flops_per_image"]
        for r in results
        if r.get("status") == "ok" and r.get("flops_per_image")
    }
    for r in results:
        if r.get("status") != "ok":
            continue
        flops = r.get("flops_per_image") or counted.get(specs[r["config"]].twin_key())
        r["flops_per_image"] = flops
        r["tflops_achieved"] = flops * r["img_per_s"] / 1e12 if flops else None
        r["mfu"] = r["tflops_achieved"] / peak if peak and r["tflops_achieved"] else None


def fmt(value, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def table(results: list[dict], cuda: bool) -> str:
    head = ["config", "batch", "img/s", "ms/step (mean / median)"]
    head += ["peak alloc / reserved (GiB)", "device used (GiB)", "setup peak (GiB)"] if cuda else []
    head += ["start → step 1 (s): imports + load + cache + other + step 1", "TFLOP/img", "MFU"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        if r.get("status") != "ok":
            cells = [r["config"], str(r.get("batch", "-")), r.get("status", "failed")]
            lines.append("| " + " | ".join(cells) + " |" + " |" * (len(head) - len(cells)))
            continue
        row = [
            r["config"] + (f" ({r['note']})" if r.get("note") else ""), str(r["batch"]), f"{r['img_per_s']:.2f}",
            f"{r['ms_per_step']:.1f} / {r['ms_per_step_median']:.1f}",
        ]  # fmt: skip
        if cuda:
            row += [
                f"{fmt(r.get('train_alloc_GiB'), '.2f')} / {fmt(r.get('train_reserved_GiB'), '.2f')}",
                fmt(r.get("used_GiB"), ".2f"),
                fmt(r.get("setup_alloc_GiB"), ".2f"),
            ]
        parts = " + ".join(
            fmt(r.get(k), ".1f") for k in ("imports_s", "load_s", "cache_s", "other_setup_s", "first_step_s")
        )
        row.append(f"{r['start_to_first_step_s']:.1f}: {parts}")
        flops = r.get("flops_per_image")
        row.append(fmt(flops / 1e12 if flops else None, ".4g", "n/a"))
        row.append(
            fmt(r["mfu"] * 100 if r.get("mfu") else None, ".1f", "n/a") + ("%" if r.get("mfu") else "")
        )
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0].replace("\n", " "),
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Configurations: " + ", ".join(GPU_SUITE) + " (the GPU suite); " + ", ".join(TINY_SUITE)
        + " with --tiny. See the module docstring for the tokens.",
    )  # fmt: skip
    ap.add_argument("--configs", help="comma-separated configurations (default: the suite)")
    ap.add_argument("--family", help="matrix: sd15,sdxl")
    ap.add_argument("--batch", help="matrix: batch sizes, e.g. 1,4,8")
    ap.add_argument("--te", help="matrix: text encoder trained: off, on or off,on")
    ap.add_argument("--checkpointing", help="matrix: gradient checkpointing: off, on or off,on")
    ap.add_argument("--compile", help="matrix: torch_compile: off, on or off,on")
    ap.add_argument(
        "--tiny", action="store_true", help="CPU, the tests' tiny models at 64x64: checks the code path"
    )
    ap.add_argument(
        "--cpu", action="store_true", help="the full-size architectures on the CPU: slow, a check only"
    )
    ap.add_argument(
        "--resolution", type=int, default=0, help="image side (default 512 SD1.5, 1024 SDXL, 64 tiny)"
    )
    ap.add_argument("--rank", type=int, default=32, help="network_dim and network_alpha (default 32)")
    ap.add_argument(
        "--mixed_precision", choices=("no", "fp16", "bf16"), help="default bf16 on CUDA, no on the CPU"
    )
    ap.add_argument("--steps", type=int, default=30, help="optimizer steps per configuration (default 30)")
    ap.add_argument("--warmup", type=int, default=10, help="steps before the timed ones (default 10)")
    ap.add_argument("--timeout", type=float, default=240, help="seconds per configuration (default 240)")
    ap.add_argument(
        "--budget", type=float, default=480, help="seconds for all; later ones are skipped (default 480)"
    )
    ap.add_argument(
        "--in_process", action="store_true", help="all configurations in this process (no fresh start)"
    )
    ap.add_argument(
        "--peak_tflops", type=float, help="the GPU's peak dense bf16 TFLOP/s for MFU (default: by name)"
    )
    ap.add_argument("--no_calibrate", action="store_true", help="skip the bf16 matmul calibration")
    ap.add_argument(
        "--profile", type=int, default=0, metavar="N",
        help="also profile N steps after the timed ones (torch.profiler): top ops, syncs and copies per step",
    )  # fmt: skip
    ap.add_argument("--json", metavar="FILE", help="also write the results, machine and command as JSON")
    ap.add_argument("--verbose", action="store_true", help="echo the trainer's own lines")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--t_spawn", type=float, default=0.0, help=argparse.SUPPRESS)
    return ap


def main(argv: list[str] | None = None) -> list[dict]:
    t_start = time.time()
    ap = build_parser()
    args = ap.parse_args(argv)
    if not 1 <= args.warmup < args.steps:
        ap.error("need 1 <= --warmup < --steps")
    if args.child:
        run_child(args)
        return []
    if str(HERE) not in sys.path:
        sys.path.insert(0, str(HERE))  # random_models, for --in_process
    matrix = [args.family, args.batch, args.te, args.checkpointing, args.compile]
    try:
        if any(matrix):
            texts = matrix_specs(
                args.family or "sd15", args.batch or "1", args.te or "off", args.checkpointing or "off",
                args.compile or "off",
            )  # fmt: skip
        elif args.configs:
            texts = [t for t in args.configs.split(",") if t.strip()]
        else:
            texts = list(TINY_SUITE if args.tiny else GPU_SUITE)
        specs = {s.text: s for s in map(parse_spec, texts)}
    except ValueError as e:
        ap.error(str(e))
    command = shlex.join(["python", "benchmarks/train_speed.py", *(sys.argv[1:] if argv is None else argv)])
    where = "tiny models, CPU" if args.tiny else ("full size, CPU" if args.cpu else "full size, CUDA")
    print(
        f"lorakit training benchmark ({where}): rank {args.rank}/alpha {args.rank}, cache_latents, "
        f"{N_IMAGES} drawn images; steps {args.steps}, timed {args.warmup + 1}-{args.steps}\n$ {command}",
        flush=True,
    )
    results: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="lorakit-train-speed-") as tmp:
        for size in {image_size(s, args) for s in specs.values()}:  # drawn before any clock starts
            make_inputs(Path(tmp), size)
        for spec in specs.values():
            left = args.budget - (time.time() - t_start)
            if left < 30:
                print(f"[{spec.text}] skipped: {left:.0f}s of the {args.budget:.0f}s budget left", flush=True)
                results.append({"config": spec.text, "batch": spec.batch, "status": "skipped (time budget)"})
                continue
            t = time.time()
            unavailable = config_options(spec, "no", args.rank)[1]  # lorakit.config only: no child for it
            if unavailable:
                r = {"config": spec.text, "batch": spec.batch, "status": unavailable}
            elif args.in_process:
                r = run_config(spec, args, Path(tmp), t)
            else:
                r = run_in_child(spec, args, Path(tmp), min(args.timeout, left))
            results.append(r)
            if r.get("status") == "ok":
                mem = f", peak {r['train_alloc_GiB']:.2f} GiB allocated" if "train_alloc_GiB" in r else ""
                print(
                    f"[{spec.text}] {r['img_per_s']:.2f} img/s{mem} ({time.time() - t:.0f}s in all)",
                    flush=True,
                )
            else:
                print(f"[{spec.text}] {r.get('status')}", flush=True)
    machine = next((r.pop("machine") for r in results if "machine" in r), None)
    for r in results:
        r.pop("machine", None)
    cuda = any("train_alloc_GiB" in r for r in results)
    if machine is None:  # --in_process (torch imported already), or nothing ran
        machine = machine_info(cuda) if args.in_process else {"gpu": "unknown: no configuration ran"}
    machine["driver"] = driver_version() if cuda else None
    machine["lorakit_commit"] = git_commit()
    measured = None if args.no_calibrate or not cuda else calibrate_matmul()
    peak, source = (
        (args.peak_tflops, "--peak_tflops") if args.peak_tflops else peak_tflops(machine.get("gpu"))
    )
    if not cuda:
        peak, source = None, "no GPU: MFU not computed"
    fill_mfu(results, specs, peak)

    print(
        f"\n{machine.get('gpu')}; torch {machine.get('torch')}, CUDA {machine.get('cuda')}, driver "
        f"{machine.get('driver')}, diffusers {machine.get('diffusers')}, transformers {machine.get('transformers')}; "
        f"lorakit {machine['lorakit_commit']}; {time.strftime('%Y-%m-%d', time.gmtime())}, "
        f"total {time.time() - t_start:.0f}s"
    )
    print(
        f"MFU against {fmt(peak, '.0f', 'n/a')} TFLOP/s ({source})"
        + (f"; a bf16 8192^3 matmul measured {measured:.0f} TFLOP/s here" if measured else "")
        + ". Memory: peak while training (after a reset at the end of setup); device used = cudaMemGetInfo."
        + "\n",
        flush=True,
    )
    print(table(results, cuda), flush=True)
    if args.json:
        report = {
            "command": command,
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "machine": machine,
            "peak_bf16_tflops": {"assumed": peak, "source": source, "measured_matmul": measured},
            "steps": args.steps,
            "warmup": args.warmup,
            "results": results,
        }
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return results


if __name__ == "__main__":
    done = main()
    if any(str(r.get("status")).startswith(("failed", "timed out")) for r in done):
        sys.exit(1)
