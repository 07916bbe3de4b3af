"""CPU thread choice: busy machines get fewer threads, the flag and the environment win."""

import os
import subprocess
import sys
import time

import pytest

from lorakit import threads


@pytest.mark.parametrize(
    "cores,load,expected",
    [(2, 0.0, 2), (2, 0.4, 2), (2, 1.0, 1), (2, 1.6, 1), (2, 7.0, 1), (16, 4.2, 12), (8, None, 8)],
)
def test_auto_threads_leaves_busy_cores_alone(cores, load, expected):
    assert threads.auto_threads(cores, load) == expected


def test_busy_cores_sees_a_busy_core_now():
    """Processes spinning right now count, whatever the load average says: one per usable core makes
    them all busy (whatever else runs, e.g. another pytest-xdist worker, which can only add)."""
    if not os.path.exists("/proc/stat"):
        pytest.skip("CPU counters are read from Linux's /proc/stat")
    cores = threads.usable_cores()
    code = "import time\nt = time.time()\nwhile time.time() - t < 5: pass"
    spinners = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(cores)]
    try:
        time.sleep(0.5)
        busy = threads.busy_cores()
    finally:
        for spin in spinners:
            spin.kill()
            spin.wait()
    assert busy >= cores - 0.5, (cores, busy)


def test_parse_threads_rejects_nonsense():
    assert threads.parse_threads("3") == 3
    assert threads.parse_threads("auto") is None and threads.parse_threads(None) is None
    for bad in ("x", "-2", "1.5"):
        with pytest.raises(ValueError, match="threads"):
            threads.parse_threads(bad)


def test_precedence_flag_then_env_then_omp_then_load(monkeypatch):
    monkeypatch.setattr(threads, "usable_cores", lambda: 4)
    monkeypatch.setattr(threads, "busy_cores", lambda: 3.0)
    monkeypatch.delenv("LORAKIT_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.delenv(threads._AUTO_MARK, raising=False)
    assert threads.choose_threads(None)[0] == 1  # 4 cores, 3 busy
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.choose_threads(None) == (3, "OMP_NUM_THREADS")
    monkeypatch.setenv("LORAKIT_THREADS", "2")
    assert threads.choose_threads(None) == (2, "LORAKIT_THREADS")
    assert threads.choose_threads("4") == (4, "--threads")
    # a child of a lorakit process that picked automatically picks again, from the load now
    monkeypatch.delenv("LORAKIT_THREADS")
    monkeypatch.setenv(threads._AUTO_MARK, "3")
    assert threads.choose_threads(None)[0] == 1


def test_cli_sets_torch_threads(tmp_path):
    code = (
        "import sys, torch; from lorakit.cli import main; "
        "rc = main(['inspect', '--threads', '3', sys.argv[1]]); print('threads', torch.get_num_threads())"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "LORAKIT_THREADS")}
    out = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "missing.safetensors")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert "threads 3" in out.stdout, out.stderr
    assert "CPU threads: 3 (--threads" in out.stderr
    bad = subprocess.run(
        [sys.executable, "-m", "lorakit", "inspect", "--threads", "zero", "x.safetensors"],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "threads: 'zero'" in bad.stderr


def test_mkl_count_follows_lorakits_own_pick_but_not_the_users(monkeypatch):
    """A child of a lorakit process inherits MKL_NUM_THREADS from the parent's automatic pick: it
    follows the child's own pick. A count the user set stays."""
    import torch

    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)  # this test process keeps its count
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    monkeypatch.setenv(threads._AUTO_MARK, "2")
    monkeypatch.setenv("MKL_NUM_THREADS", "2")  # the parent's pick, inherited
    monkeypatch.setenv("LORAKIT_THREADS", "1")
    assert threads.apply_threads() == 1
    assert os.environ["MKL_NUM_THREADS"] == "1" and os.environ["OMP_NUM_THREADS"] == "1"
    monkeypatch.setenv("MKL_NUM_THREADS", "5")  # the user's
    threads.apply_threads()
    assert os.environ["MKL_NUM_THREADS"] == "5"
    monkeypatch.delenv("MKL_NUM_THREADS")
    threads.apply_threads()
    assert os.environ["MKL_NUM_THREADS"] == "1"
