"""One command, any OS: set up .venv with the test extras, then run the whole test suite.

    python scripts/test.py [pytest arguments]          (Windows: py scripts\\test.py)

CI runs exactly this (.ci/run). Under CI=true (the default on Linux, where set-up installs
Debian's chromium) a missing Chromium or Playwright fails the browser tests instead of skipping.
"""

import os
import shutil
import subprocess
import sys

from bootstrap import ROOT, report, run, setup

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
    cmd = [str(py), "-m", "pytest", "-q", "-p", "no:cacheprovider", *sys.argv[1:]]
    sys.exit(subprocess.call(cmd, cwd=ROOT, env=env))
