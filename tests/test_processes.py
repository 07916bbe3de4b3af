"""Portable process handling (lorakit.processes) and the job's stop file and heartbeat, with the
Windows branches run here by patching `processes.WINDOWS` and mocking kernel32."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from lorakit import processes
from lorakit.config import TrainConfig
from lorakit.train import job as job_mod
from lorakit.train.job import HEARTBEAT_FILE, HEARTBEAT_STALE_S, Job, start_job
from lorakit.train.trainer import Trainer, train


@pytest.fixture
def no_signals(monkeypatch):
    """os.kill fails the test: proves a Windows branch sends no signal (there it would terminate)."""
    sent = []

    def kill(pid, sig):
        sent.append((pid, sig))
        raise AssertionError(f"os.kill({pid}, {sig}) on a Windows path")

    monkeypatch.setattr(os, "kill", kill)
    return sent


@pytest.fixture
def windows(monkeypatch):
    monkeypatch.setattr(processes, "WINDOWS", True)


def test_popen_kwargs_for_windows_and_posix(monkeypatch):
    monkeypatch.setattr(processes, "WINDOWS", True)
    # CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW, Win32's values; start_new_session means nothing there
    assert processes.detached_popen_kwargs() == {"creationflags": 0x00000200 | 0x08000000}
    monkeypatch.setattr(processes, "WINDOWS", False)
    assert processes.detached_popen_kwargs() == {"start_new_session": True}


def test_start_job_passes_the_windows_flags_to_popen(windows, monkeypatch, tmp_path):
    seen = {}

    class FakePopen:
        pid = 4242

        def __init__(self, args, **kwargs):
            seen.update(kwargs, args=args)

        def poll(self):
            return None

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    cfg = TrainConfig.from_dict(
        {"pretrained_model_name_or_path": "m.safetensors", "train_data_dir": str(tmp_path / "データ")}
    )
    job = start_job(cfg, tmp_path / "runs")
    assert seen["creationflags"] == processes.CREATE_NEW_PROCESS_GROUP | processes.CREATE_NO_WINDOW
    assert "start_new_session" not in seen
    assert seen["args"][1:] == ["-m", "lorakit.train.job", str(job.run_dir.absolute())]
    assert seen["env"]["PYTHONIOENCODING"] == "utf-8"  # Japanese folder names in the log
    assert job.status()["state"] == "running" and job.status()["pid"] == 4242
    job_mod._CHILDREN.pop(4242)


class FakeKernel32:
    """OpenProcess / GetExitCodeProcess / CloseHandle as Windows answers them."""

    def __init__(self, handle: int, exit_code: int = processes.STILL_ACTIVE):
        self.handle, self.exit_code = handle, exit_code
        self.opened, self.closed = [], []

    def OpenProcess(self, access, inherit, pid):  # noqa: N802 (Win32's names)
        self.opened.append((access, inherit, pid))
        return self.handle

    def GetExitCodeProcess(self, handle, code_ref):  # noqa: N802
        assert handle == self.handle
        code_ref._obj.value = self.exit_code  # ctypes.byref(c_ulong)
        return 1

    def CloseHandle(self, handle):  # noqa: N802
        self.closed.append(handle)
        return 1


@pytest.mark.parametrize(
    ("handle", "exit_code", "last_error", "alive"),
    [
        (0x1F4, processes.STILL_ACTIVE, 0, True),  # running
        (0x1F4, 0, 0, False),  # ended with code 0, a handle still open somewhere
        (0, None, 87, False),  # ERROR_INVALID_PARAMETER: no such process
        (0, None, 5, True),  # ERROR_ACCESS_DENIED: exists, another user's
    ],
)
def test_pid_alive_on_windows_asks_kernel32(
    windows, no_signals, monkeypatch, handle, exit_code, last_error, alive
):
    k = FakeKernel32(handle, exit_code if exit_code is not None else 0)
    monkeypatch.setattr(processes, "_kernel32", lambda: k)
    monkeypatch.setattr(processes, "_last_error", lambda: last_error)
    assert processes.pid_alive(1234) is alive
    assert k.opened == [(processes.PROCESS_QUERY_LIMITED_INFORMATION, False, 1234)]
    assert k.closed == ([handle] if handle else [])  # every handle opened is closed
    assert no_signals == []


def test_pid_alive_on_posix():
    assert processes.pid_alive(os.getpid())
    assert not processes.pid_alive(None) and not processes.pid_alive(0)
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    assert not processes.pid_alive(done.pid)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 30
    while processes.pid_alive(zombie.pid) and time.monotonic() < deadline:
        time.sleep(0.05)  # ends, and nobody waits for it: a zombie, which is not alive
    assert not processes.pid_alive(zombie.pid)
    assert zombie.poll() == 0  # it was indeed a zombie, reaped only now


def test_interrupt_sends_nothing_on_windows(windows, no_signals):
    assert processes.interrupt(1234) is False
    assert no_signals == []


def test_terminate_without_sigkill_uses_sigterm(monkeypatch):
    """Windows has no signal.SIGKILL; os.kill with SIGTERM is TerminateProcess there."""
    sent = []
    monkeypatch.delattr(signal, "SIGKILL")
    monkeypatch.setattr(os, "kill", lambda pid, sig: sent.append((pid, sig)))
    processes.terminate(1234)
    assert sent == [(1234, signal.SIGTERM)]

    def gone(pid, sig):  # Windows reports a pid that is gone as winerror 87 (EINVAL), not ESRCH
        raise OSError(errno.EINVAL, "The parameter is incorrect")

    monkeypatch.setattr(os, "kill", gone)
    monkeypatch.setattr(processes, "pid_alive", lambda pid: False)
    processes.terminate(1234)  # gone already: nothing to do
    monkeypatch.setattr(processes, "pid_alive", lambda pid: True)
    with pytest.raises(OSError):
        processes.terminate(1234)


# --- the job's heartbeat --------------------------------------------------------------------
def running_job(tmp_path, pid: int, heartbeat_age: float | None) -> Job:
    run_dir = tmp_path / "run"
    run_dir.mkdir(parents=True)
    status = {"state": "running", "message": "step 3/10", "lora_path": None, "pid": pid}
    (run_dir / "status.json").write_text(json.dumps(status))
    if heartbeat_age is not None:
        beat = run_dir / HEARTBEAT_FILE
        beat.touch()
        t = time.time() - heartbeat_age
        os.utime(beat, (t, t))
    return Job(run_dir)


def test_alive_means_process_and_fresh_heartbeat(tmp_path, monkeypatch):
    # this test's own process stands for a job found again by a restarted GUI (no Popen handle)
    assert running_job(tmp_path / "a", os.getpid(), heartbeat_age=1).state == "running"
    stale = running_job(tmp_path / "b", os.getpid(), heartbeat_age=HEARTBEAT_STALE_S + 5).status()
    assert stale["state"] == "error" and "no sign of life for" in stale["message"]
    assert running_job(tmp_path / "c", os.getpid(), heartbeat_age=None).state == "error"
    done = subprocess.Popen([sys.executable, "-c", "pass"])
    done.wait()
    dead = running_job(tmp_path / "d", done.pid, heartbeat_age=0).status()
    assert dead["state"] == "error" and "ended without a word" in dead["message"]


def test_heartbeat_thread_touches_the_file(tmp_path):
    stop = job_mod.start_heartbeat(tmp_path, every_s=0.05)
    try:
        beat = tmp_path / HEARTBEAT_FILE
        deadline = time.monotonic() + 10
        while not beat.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        first = beat.stat().st_mtime_ns
        while beat.stat().st_mtime_ns == first and time.monotonic() < deadline:
            time.sleep(0.02)
        assert beat.stat().st_mtime_ns > first
    finally:
        stop.set()


# --- the trainer's stop file -------------------------------------------------------------------
def test_stop_file_stops_at_the_step_boundary_and_saves(train_config, tmp_path, monkeypatch):
    """The file appears during step 2's first micro-batch: step 2 is finished, then the state saved."""
    stop_file = tmp_path / "stop_requested"
    real, calls = Trainer.loss_of, []

    def request_stop_at_the_third_micro_batch(self, batch, step):
        calls.append(step)
        if len(calls) == 3:
            stop_file.touch()
        return real(self, batch, step)

    monkeypatch.setattr(Trainer, "loss_of", request_stop_at_the_third_micro_batch)
    cfg = train_config(max_train_steps=6, gradient_accumulation_steps=2, reg_data_dir=None, save_state=True)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, stop_file=stop_file)
    state = json.loads((tmp_path / "out" / "tiny-state" / "train_state.json").read_text())
    assert state["step"] == 2 and state["batch_in_epoch"] == 4
    assert len(calls) == 4  # nothing after the step boundary
    assert not (tmp_path / "out" / "tiny.safetensors").exists()
