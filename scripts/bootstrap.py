"""Set up lorakit in ./.venv on Windows, Linux or macOS, with only the Python that runs this file.

Used by scripts/quickstart.py and scripts/test.py (and the bash wrappers beside them). Standard
library only, no shell features, so PowerShell runs it without an execution-policy change.

torch goes first, from our supported range: otherwise pip pulls whatever build it likes when a
dependency asks for torch. Which build: an NVIDIA GPU (nvidia-smi answers) on Windows or Linux
gets PyTorch's CUDA wheels (PyPI's Windows wheels are CPU-only); anything else gets the CPU build.
LORAKIT_TORCH (a pip requirement) and LORAKIT_TORCH_INDEX (an extra index URL, or "none")
override both choices.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VENV = ROOT / ".venv"
TORCH_RANGE = ((2, 6), (2, 15))  # as pyproject.toml: torch>=2.6,<2.15
TORCH_DEFAULT = "torch==2.13.0"  # in the range; a CPU wheel of it lies on the project's build machines
CUDA_INDEX = "https://download.pytorch.org/whl/cu128"
# pip says this for every configured package folder that a machine lacks: noise, not a problem
NOISE = ("WARNING: Location",)


def venv_python(venv_dir: Path = VENV, windows: bool = os.name == "nt") -> Path:
    """The venv's interpreter: Scripts\\python.exe on Windows, bin/python elsewhere."""
    if windows:
        return venv_dir / "Scripts" / "python.exe"
    return venv_dir / "bin" / "python"


def run(cmd: list[str], quiet: bool = True) -> None:
    """Run a command; show its output only if it fails (or always, unless quiet)."""
    out = subprocess.run(cmd, cwd=ROOT, capture_output=quiet, text=True)
    if quiet:
        text = "\n".join(
            line for line in (out.stdout + out.stderr).splitlines() if not line.startswith(NOISE)
        )
        if out.returncode != 0 and text:
            print(text, file=sys.stderr)
    if out.returncode != 0:
        raise SystemExit(f"set-up failed ({out.returncode}): {' '.join(cmd)}")


def has_nvidia_gpu() -> bool:
    exe = shutil.which("nvidia-smi")
    if not exe:
        return False
    try:
        return subprocess.run([exe, "-L"], capture_output=True, timeout=20).returncode == 0
    except (OSError, subprocess.SubprocessError):
        return False


def torch_install_command(py: Path, platform: str = sys.platform, nvidia: bool | None = None) -> list[str]:
    """pip's arguments for torch on this machine (see the module doc)."""
    spec = os.environ.get("LORAKIT_TORCH", TORCH_DEFAULT)
    index = os.environ.get("LORAKIT_TORCH_INDEX")
    if index is None:
        if nvidia is None:
            nvidia = has_nvidia_gpu()
        # Linux wheels on PyPI already carry CUDA; Windows ones do not
        index = CUDA_INDEX if nvidia and platform.startswith("win") else "none"
    cmd = [str(py), "-m", "pip", "install", "-q", spec]
    if index != "none":
        cmd += ["--extra-index-url", index]
    return cmd


def torch_in_range(py: Path) -> bool:
    lo, hi = TORCH_RANGE
    check = (
        "import sys, torch; v = tuple(int(x) for x in torch.__version__.split('+')[0].split('.')[:2]); "
        f"sys.exit(not ({lo} <= v < {hi}))"
    )
    return subprocess.run([str(py), "-c", check], capture_output=True).returncode == 0


def setup(extras: str = "gui") -> Path:
    """Create .venv (once), install torch from the range, then lorakit with `extras`; returns the
    venv's python. Idempotent: a second run installs nothing new."""
    py = venv_python()
    if not py.exists():
        print(f"creating {VENV}")
        venv.EnvBuilder(with_pip=True).create(VENV)
    run([str(py), "-m", "pip", "install", "-q", "--upgrade", "pip"])
    if not torch_in_range(py):
        cmd = torch_install_command(py)
        print(f"installing {cmd[5]}" + (f" from {cmd[-1]}" if "--extra-index-url" in cmd else ""))
        run(cmd)
    print(f"installing lorakit[{extras}]")
    run([str(py), "-m", "pip", "install", "-q", "-e", f".[{extras}]"])
    return py


def report(py: Path) -> None:
    run([str(py), "-c", "import lorakit, torch; print(f'lorakit {lorakit.__version__} with torch "
         "{torch.__version__} ready in .venv')"], quiet=False)  # fmt: skip


if __name__ == "__main__":
    report(setup(sys.argv[1] if len(sys.argv) > 1 else "gui"))
