"""One command, any OS: set up .venv with the test extras, then run the whole test suite.

    python scripts/test.py [pytest arguments]          (Windows: py scripts\\test.py)

CI runs exactly this (.ci/run). Under CI=true (the default on Linux, where set-up installs
Debian's chromium) a missing Chromium or Playwright fails the browser tests instead of skipping.

With more than one core the tests run in parallel (pytest-xdist): one worker per core, up to 4,
each test file whole in one worker (its module fixtures, such as a trained LoRA or the browser
tests' GUI server, are built once and its tests keep their order). tests/conftest.py splits the
torch threads between the workers. Any -n/--dist given (`-n 0`: one process) or
`-p no:xdist` overrides it.
"""

import os
import shutil
import subprocess
import sys

from bootstrap import ROOT, report, run, setup


def usable_cores() -> int:
    """As lorakit.threads.usable_cores (this script runs before lorakit is installed)."""
    try:
        return len(os.sched_getaffinity(0))  # honours taskset/cgroup pinning (not on Windows/macOS)
    except AttributeError:
        return os.cpu_count() or 1


if __name__ == "__main__":
    py = setup("test")
    # the tokenizer test compares ours with open_clip's; it needs torchvision only for models
    run([str(py), "-m", "pip", "install", "-q", "--no-deps", "open_clip_torch==3.3.0"])
    report(py)
    linux = sys.platform.startswith("linux")
    if linux and shutil.which("bash"):
        run(["bash", str(ROOT / "scripts" / "setup_gui_tests.sh")], quiet=False)
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    env.setdefault("CI", "true" if linux else "false")
    args = sys.argv[1:]
    workers = min(usable_cores(), 4)
    chosen = any(a.startswith(("-n", "--numprocesses", "--dist")) or a.endswith("no:xdist") for a in args)
    if workers > 1 and not chosen:
        args = ["-n", str(workers), "--dist", "loadfile", *args]
    cmd = [str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    sys.exit(subprocess.call(cmd, cwd=ROOT, env=env))
