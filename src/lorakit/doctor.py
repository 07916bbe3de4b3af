"""`lorakit doctor`: what this machine has for training, and each problem with its fix.

Every check is a plain function returning Check rows, so tests plant a problem by passing the
facts in (a GPU's compute capability, a torch build's CUDA archs, a page file's size) instead of
needing that machine.
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

GIB = 1024**3


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""  # what to run or change when not ok
    optional: bool = False  # something missing that only some runs need: shown, not a problem


# --- memory ---------------------------------------------------------------------------------------
def system_memory() -> dict[str, int] | None:
    """{ram_total, ram_free, commit_limit, commit_free} in bytes; the commit limit (RAM + page file)
    is what Windows' "paging file is too small" error runs into. None where unknown."""
    if os.name == "nt":
        return _windows_memory()
    try:
        info = {}
        with open("/proc/meminfo") as f:
            for line in f:
                key, value = line.split(":", 1)
                info[key] = int(value.split()[0]) * 1024
        swap_free = info.get("SwapFree", 0)
        return {
            "ram_total": info["MemTotal"],
            "ram_free": info.get("MemAvailable", info.get("MemFree", 0)),
            "commit_limit": info["MemTotal"] + info.get("SwapTotal", 0),
            "commit_free": info.get("MemAvailable", 0) + swap_free,
        }
    except (OSError, KeyError, ValueError):
        return None


class _MemoryStatusEx(ctypes.Structure):
    _fields_ = [  # noqa: RUF012 - ctypes wants a class attribute
        ("dwLength", ctypes.c_ulong),
        ("dwMemoryLoad", ctypes.c_ulong),
        ("ullTotalPhys", ctypes.c_ulonglong),
        ("ullAvailPhys", ctypes.c_ulonglong),
        ("ullTotalPageFile", ctypes.c_ulonglong),  # the commit limit: RAM + page files
        ("ullAvailPageFile", ctypes.c_ulonglong),
        ("ullTotalVirtual", ctypes.c_ulonglong),
        ("ullAvailVirtual", ctypes.c_ulonglong),
        ("ullAvailExtendedVirtual", ctypes.c_ulonglong),
    ]


def _windows_memory(kernel32=None) -> dict[str, int] | None:
    status = _MemoryStatusEx()
    status.dwLength = ctypes.sizeof(_MemoryStatusEx)
    kernel32 = kernel32 or ctypes.WinDLL("kernel32")  # type: ignore[attr-defined]
    if not kernel32.GlobalMemoryStatusEx(ctypes.byref(status)):
        return None
    return {
        "ram_total": status.ullTotalPhys,
        "ram_free": status.ullAvailPhys,
        "commit_limit": status.ullTotalPageFile,
        "commit_free": status.ullAvailPageFile,
    }


def memory_checks(mem: dict[str, int] | None, windows: bool = os.name == "nt") -> list[Check]:
    if mem is None:
        return [Check("memory", True, "unknown on this system")]
    ram = Check(
        "RAM",
        mem["ram_total"] >= 12 * GIB,
        f"{mem['ram_total'] / GIB:.1f} GiB, {mem['ram_free'] / GIB:.1f} GiB free",
        "an SD1.5 run wants 12 GB or more (SDXL 16+): close other programs, use cache_latents_to_disk",
    )
    # loading a checkpoint briefly needs about its size twice (file read + model); SDXL: ~14 GB
    page = mem["commit_limit"] - mem["ram_total"]
    name = "page file" if windows else "swap"
    commit = Check(
        f"RAM + {name} (commit limit)",
        # Linux overcommits: only Windows fails a load outright when RAM + page file run short
        not windows or mem["commit_limit"] >= 32 * GIB or page >= 16 * GIB,
        f"{mem['commit_limit'] / GIB:.1f} GiB ({page / GIB:.1f} GiB {name}), "
        f"{mem['commit_free'] / GIB:.1f} GiB free",
        (
            "Windows' 'paging file is too small' error comes from here: System Properties > Advanced > "
            "Performance Settings > Advanced > Virtual memory: 'System managed size' on a drive with "
            "30+ GB free, or at least 32768 MB"
            if windows
            else "add swap (e.g. 16 GB) if loading a model is killed for memory"
        ),
    )
    return [ram, commit]


# --- torch and the GPU ----------------------------------------------------------------------------
def gpu_checks(torch_module=None) -> list[Check]:
    """torch's build against the GPU: a CPU-only build beside an NVIDIA card, or a CUDA build that
    has no kernels for the card (an RTX 50 series needs a CUDA 12.8+ build: sm_120)."""
    torch = torch_module
    if torch is None:
        import torch
    version = torch.__version__
    cuda_build = torch.version.cuda
    if not torch.cuda.is_available():
        nvidia = shutil.which("nvidia-smi") is not None
        return [
            Check(
                "GPU",
                not nvidia,
                f"torch {version} ({'CUDA ' + cuda_build if cuda_build else 'CPU-only build'}); no usable CUDA GPU"
                + ("; nvidia-smi is here, so the machine has an NVIDIA card" if nvidia else ""),
                "install torch's CUDA build: python scripts/bootstrap.py (it picks PyTorch's CUDA index "
                "on Windows), or pip install torch --index-url https://download.pytorch.org/whl/cu128",
            )
        ]
    rows = []
    archs = set(torch.cuda.get_arch_list())
    for i in range(torch.cuda.device_count()):
        major, minor = torch.cuda.get_device_capability(i)
        name = torch.cuda.get_device_name(i)
        free, total = torch.cuda.mem_get_info(i)
        sm = f"sm_{major}{minor}"
        supported = sm in archs or any(a.startswith(f"sm_{major}") for a in archs)
        rows.append(
            Check(
                f"GPU {i}",
                supported,
                f"{name}, compute {major}.{minor}, {total / GIB:.1f} GiB ({free / GIB:.1f} free); "
                f"torch {version} CUDA {cuda_build} has kernels for {', '.join(sorted(archs))}",
                f"this torch has no kernels for {sm}: install a build with CUDA 12.8 or newer "
                "(pip install torch --index-url https://download.pytorch.org/whl/cu128)",
            )
        )
        rows.append(
            Check(
                f"GPU {i} memory",
                total >= 6 * GIB,
                f"{total / GIB:.1f} GiB",
                "under 6 GB: train_batch_size = 1, gradient_checkpointing, cache_latents, mixed_precision bf16/fp16",
            )
        )
    if os.name == "nt":  # a driver setting no API reads: say where it is
        rows.append(Check("NVIDIA sysmem fallback", True, SYSMEM_FALLBACK))
    return rows


SYSMEM_FALLBACK = (
    "not readable from here; check it: NVIDIA Control Panel > Manage 3D settings > 'CUDA - Sysmem "
    "Fallback Policy' = 'Prefer No Sysmem Fallback' for python.exe, or a full GPU makes training 10x "
    "slower instead of reporting out of memory"
)


# --- packages and folders -------------------------------------------------------------------------
OPTIONAL = {
    "bitsandbytes": "AdamW8bit (8-bit Adam): pip install bitsandbytes (0.43+ has Windows wheels)",
    "xformers": "memory-efficient attention (optional; torch's SDPA is used otherwise)",
    "gradio": 'the browser GUI: pip install "lorakit[gui]"',
    "prodigyopt": 'Prodigy optimizer: pip install "lorakit[optim]"',
    "lion_pytorch": 'Lion optimizer: pip install "lorakit[optim]"',
}


ONNXRUNTIME_USE = (
    'WD14 captioning (`lorakit caption` with a model.onnx tagger folder): pip install "lorakit[caption]" '
    "(onnxruntime-gpu instead to tag on an NVIDIA GPU)"
)


def package_checks(find_spec=None) -> list[Check]:
    find_spec = find_spec or importlib.util.find_spec
    rows = []
    for name, use in OPTIONAL.items():
        found = find_spec(name) is not None
        rows.append(
            Check(
                f"package {name}", True, "installed" if found else f"not installed: {use}", optional=not found
            )
        )
    rows.append(onnxruntime_check(find_spec))
    return rows


def onnxruntime_check(find_spec=None) -> Check:
    """onnxruntime runs WD14 taggers; its providers say whether it tags on the GPU."""
    find_spec = find_spec or importlib.util.find_spec
    name = "package onnxruntime"
    if find_spec("onnxruntime") is None:
        return Check(name, True, f"not installed: {ONNXRUNTIME_USE}", optional=True)
    try:
        import onnxruntime

        providers = onnxruntime.get_available_providers()
    except Exception as e:  # a broken install: say so rather than stop the report
        return Check(name, True, f"installed but does not load ({e}): {ONNXRUNTIME_USE}", optional=True)
    where = "CUDA" if "CUDAExecutionProvider" in providers else "CPU only"
    return Check(name, True, f"installed {onnxruntime.__version__} ({where}): WD14 captioning")


def folder_check(folder: str | Path, need_bytes: int = 2 * GIB) -> Check:
    """Can a run write here, with room for LoRAs, states and caches?"""
    from .train.preflight import UnwritableFolder, probe_folder

    try:
        free = probe_folder(folder)  # a folder not created yet: where it will be created
    except UnwritableFolder as e:
        return Check(
            f"output folder {folder}",
            False,
            f"cannot write in {e.folder}: {e.reason}",
            "choose another output_dir",
        )
    return Check(
        f"output folder {folder}",
        free >= need_bytes,
        f"writable, {free / GIB:.1f} GiB free",
        f"free some space: a run with states and latent caches wants {need_bytes / GIB:.0f} GiB or more",
    )


def run_checks(output_dir: str | Path = "output") -> list[Check]:
    rows = [
        Check("python", sys.version_info >= (3, 10), sys.version.split()[0], "lorakit needs Python 3.10+")
    ]
    rows += memory_checks(system_memory())
    rows += gpu_checks()
    rows.append(folder_check(output_dir))
    rows += package_checks()
    return rows


def format_report(rows: list[Check]) -> str:
    width = max(len(r.name) for r in rows)
    lines = []
    for r in rows:
        mark = "FIX" if not r.ok else "-  " if r.optional else "ok "
        lines.append(f"{mark}  {r.name:<{width}}  {r.detail}")
        if not r.ok and r.fix:
            lines.append(f"     {'':<{width}}  -> {r.fix}")
    problems = sum(not r.ok for r in rows)
    lines.append(f"\n{problems} problem(s)" if problems else "\nno problems found")
    return "\n".join(lines)
