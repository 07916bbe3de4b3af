"""Other processes, the same way on Windows and POSIX: start one detached, ask whether one is alive,
interrupt or end one.

Windows has no process signals: `os.kill(pid, sig)` there *terminates* the process for every sig but
CTRL_C_EVENT / CTRL_BREAK_EVENT (so `os.kill(pid, 0)`, POSIX's "are you there?", kills it), and
SIGKILL does not exist. Every Windows branch is here, small, chosen by `WINDOWS` (tests patch it).
"""

from __future__ import annotations

import functools
import os
import signal
import subprocess

WINDOWS = os.name == "nt"

# Win32 constants (subprocess defines the first two only on Windows)
CREATE_NEW_PROCESS_GROUP = getattr(subprocess, "CREATE_NEW_PROCESS_GROUP", 0x00000200)
CREATE_NO_WINDOW = getattr(subprocess, "CREATE_NO_WINDOW", 0x08000000)
PROCESS_QUERY_LIMITED_INFORMATION = 0x1000
STILL_ACTIVE = 259  # GetExitCodeProcess's answer while the process runs
ERROR_ACCESS_DENIED = 5


def detached_popen_kwargs() -> dict:
    """Popen arguments for a child that outlives its parent and is not hit by the parent's Ctrl-C.

    Windows: its own process group and a console of its own without a window (not DETACHED_PROCESS,
    which has no console at all, so every console program the child starts would open a window),
    so closing the terminal of the GUI does not end it. POSIX: a session of its own.
    """
    if WINDOWS:
        return {"creationflags": CREATE_NEW_PROCESS_GROUP | CREATE_NO_WINDOW}
    return {"start_new_session": True}


def pid_alive(pid: int | None) -> bool:
    """Whether a process with this id exists (and, on Linux, is not a zombie). Sends no signal.

    A pid can be reused after its process ends: callers that must know it is *their* process check
    something more (a job's heartbeat file, a lock file's contents).
    """
    if not pid or pid < 0:
        return False
    if WINDOWS:
        return _windows_pid_alive(pid)
    try:
        os.kill(pid, 0)  # POSIX only: signal 0 checks existence and permission, sends nothing
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, belongs to another user
    try:  # Linux: a finished child nobody has waited for still answers kill(pid, 0)
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except (OSError, IndexError):
        return True  # no /proc (macOS): trust kill


@functools.cache
def _kernel32():
    import ctypes

    k = ctypes.WinDLL("kernel32", use_last_error=True)  # type: ignore[attr-defined]
    k.OpenProcess.restype = ctypes.c_void_p  # a HANDLE is pointer-sized
    k.OpenProcess.argtypes = (ctypes.c_ulong, ctypes.c_int, ctypes.c_ulong)
    k.GetExitCodeProcess.argtypes = (ctypes.c_void_p, ctypes.POINTER(ctypes.c_ulong))
    k.CloseHandle.argtypes = (ctypes.c_void_p,)
    return k


def _last_error() -> int:
    import ctypes

    return ctypes.get_last_error()  # type: ignore[attr-defined]


def _windows_pid_alive(pid: int) -> bool:
    import ctypes

    kernel32 = _kernel32()
    handle = kernel32.OpenProcess(PROCESS_QUERY_LIMITED_INFORMATION, False, pid)
    if not handle:
        return _last_error() == ERROR_ACCESS_DENIED  # exists, but we may not look (another user's)
    try:
        code = ctypes.c_ulong()
        if not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)):
            return True  # opened, so it exists
        return code.value == STILL_ACTIVE  # an ended process's handle lives on while someone holds one
    finally:
        kernel32.CloseHandle(handle)


def interrupt(pid: int) -> bool:
    """POSIX: send SIGINT (Ctrl-C), which Python turns into KeyboardInterrupt. Windows: nothing, as
    any signal would terminate the process there; its stop file does the job. True when sent."""
    if WINDOWS:
        return False
    try:
        os.kill(pid, signal.SIGINT)
    except ProcessLookupError:
        return False
    return True


def terminate(pid: int) -> None:
    """End a process at once, the last resort: SIGKILL on POSIX, TerminateProcess on Windows (which is
    what os.kill does there with any signal but the console ones)."""
    try:
        os.kill(pid, getattr(signal, "SIGKILL", signal.SIGTERM))
    except OSError:
        if pid_alive(pid):  # gone already is fine (Windows says so with winerror 87, not ESRCH)
            raise
