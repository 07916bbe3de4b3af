"""One command, any OS: set up .venv, then run the whole demo workflow (`lorakit quickstart`).

python scripts/quickstart.py          (Windows: py scripts\\quickstart.py)
"""

import subprocess
import sys

from bootstrap import report, setup

if __name__ == "__main__":
    py = setup("gui")
    report(py)
    sys.exit(subprocess.call([str(py), "-m", "lorakit", "quickstart", *sys.argv[1:]]))
