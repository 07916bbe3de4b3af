"""How many CPU threads torch may use.

torch starts one thread per core. On a machine whose cores are already busy (another training
run, a build, a second lorakit), those threads wait on each other at every parallel section and
the same work takes 30-70x longer than with one thread; on an idle machine, all cores win. So
lorakit picks the count from the cores that are free when it starts (a quarter-second look at
the CPU counters), unless told.
"""

from __future__ import annotations

import logging
import os
import sys
import time

log = logging.getLogger("lorakit")

ENV = "LORAKIT_THREADS"
_AUTO_MARK = "LORAKIT_AUTO_OMP_NUM_THREADS"


def usable_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))  # honours taskset/cgroup pinning (not on Windows/macOS)
    except AttributeError:
        return os.cpu_count() or 1


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot, from Linux's /proc/stat."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # user nice system idle iowait irq softirq steal (guest is inside user)
    return total - idle, total


def busy_cores(sample_s: float = 0.25) -> float | None:
    """How many cores other programs keep busy now: measured over `sample_s` from /proc/stat on
    Linux (the load average lags a minute behind: right after a `pip install` it still says busy),
    else the one-minute load average; None where the OS tells neither (Windows)."""
    try:
        b0, t0 = _cpu_times()
        time.sleep(sample_s)
        b1, t1 = _cpu_times()
        if t1 > t0:
            return (b1 - b0) / (t1 - t0) * (os.cpu_count() or 1)
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):  # Windows has no load average
        return None


def auto_threads(cores: int | None = None, load: float | None = None) -> int:
    """One thread per core that is not busy, at least one."""
    cores = cores or usable_cores()
    if load is None:
        return cores
    return max(1, min(cores, round(cores - load)))


def parse_threads(value: str | int | None) -> int | None:
    """`N` (N >= 1) or `auto`/0/None (= choose); raises ValueError with a readable message."""
    if value is None or str(value).strip().lower() in ("", "auto", "0"):
        return None
    try:
        n = int(value)
    except ValueError:
        n = -1
    if n < 1:
        raise ValueError(f"threads: {value!r} is not a thread count; give a whole number >= 1, or 'auto'")
    return n


def choose_threads(requested: str | int | None = None) -> tuple[int, str]:
    """The thread count and why: the flag, then LORAKIT_THREADS, then OMP_NUM_THREADS, then auto."""
    for value, source in ((requested, "--threads"), (os.environ.get(ENV), ENV)):
        n = parse_threads(value)
        if n is not None:
            return n, source
    omp = os.environ.get("OMP_NUM_THREADS", "")
    chosen_by_parent = omp == os.environ.get(_AUTO_MARK)  # a lorakit parent's auto pick: choose again
    if omp.isdigit() and int(omp) > 0 and not chosen_by_parent:
        return int(omp), "OMP_NUM_THREADS"
    cores, load = usable_cores(), busy_cores()
    n = auto_threads(cores, load)
    why = f"{cores} cores" if load is None else f"{cores} cores, {load:.1f} busy"
    return n, f"auto: {why}"


def apply_threads(requested: str | int | None = None) -> int:
    """Set torch's thread count (before or after torch is imported) and log it once."""
    n, why = choose_threads(requested)
    # MKL's count is the user's unless it is unset or a lorakit parent's own earlier pick
    mkl_ours = os.environ.get("MKL_NUM_THREADS") in (None, os.environ.get(_AUTO_MARK))
    # read by torch (and numpy's BLAS) when they start; covers a torch imported later
    os.environ["OMP_NUM_THREADS"] = os.environ[_AUTO_MARK] = str(n)
    if mkl_ours:
        os.environ["MKL_NUM_THREADS"] = str(n)
    if "torch" in sys.modules:
        sys.modules["torch"].set_num_threads(n)
    log.info("CPU threads: %d (%s; set --threads N to change)", n, why)
    return n
